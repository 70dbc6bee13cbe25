"""Watching a running pool from another process: read-only, by name, no IPC.

    pool (any process) ── writes ──▶ /dev/shm/procpool-<pid>-<hex> ◀── mmap, read-only ── Watcher

The block is opened read-only straight from /dev/shm, not with
``SharedMemory``: that would register it with this process's resource
tracker, which unlinks it when the watcher exits and so breaks the pool's
block for every later watcher.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._metrics import NAME_PREFIX, check_layout
from ._process import pid_alive
from ._snapshot import read_snapshot

__all__ = ("PoolInfo", "Watcher", "list_pools")

SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A pool's block as ``list_pools`` finds it."""

    name: str
    creator_pid: int
    alive: bool  # its creator still runs
    created: float  # wall clock
    workers: int
    total_tasks: int


class Watcher:
    """A read-only view of one pool's metrics block.

    Raises:
        FileNotFoundError: no block of that name (the pool has ended?).
        ValueError: the block is not a procpool block of this layout version.
    """

    def __init__(self, name: str) -> None:
        self.name = name.lstrip("/")
        fd = os.open(SHM_DIR / self.name, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._buf = memoryview(self._map)
        try:
            check_layout(self._buf, self.name)
        except ValueError:
            self.close()
            raise

    def snapshot(self) -> dict[str, Any]:
        """The same figures as the pool's ``get_stats()``, without its task records."""
        stats = read_snapshot(self._buf)
        stats["metrics_block"] = self.name
        return stats

    def close(self) -> None:
        self._buf.release()
        self._map.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_pools() -> list[PoolInfo]:
    """Every procpool block in /dev/shm that this user can read, oldest first."""
    pools = []
    for path in SHM_DIR.glob(f"{NAME_PREFIX}*"):
        try:
            with Watcher(path.name) as watcher:
                stats = watcher.snapshot()
        except (OSError, ValueError):
            continue  # ended meanwhile, not ours to read, or another release
        pid = stats["creator_pid"]
        pools.append(
            PoolInfo(
                path.name, pid, pid_alive(pid), stats["created"], stats["total_workers"], stats["total_tasks"]
            )
        )
    return sorted(pools, key=lambda p: p.created)


def age(created: float) -> float:
    """Seconds since a wall-clock time."""
    return max(0.0, time.time() - created)
