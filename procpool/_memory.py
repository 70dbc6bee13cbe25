"""Real memory of process trees with psutil, sampled by the manager process.

    manager process: Sampler thread ── reads ──▶ metrics block: active slots and their worker pids
                                    ── psutil ─▶ /proc of each worker and all its descendants,
                                                 and of the slot's companion (a browser), if any
                                    ── writes ─▶ each slot's memory section (its only writer)

- USS is what killing the tree would give back; PSS shares pages out fairly.
  Summed RSS counts shared pages once per process and overstates a tree
  several times over: it is used only where USS and PSS cannot be read, and
  then the slot says so.
- A tree costs tens of milliseconds to measure (smaps_rollup per process), so
  it runs on this thread, never on the task path. Processes that vanish mid
  sample are skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import psutil

from ._companions import Companions
from ._metrics import MemoryWriter

__all__ = ("Sampler", "TreeMemory", "TreeSampler", "own_uss")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TreeMemory:
    """Memory of a process and all its descendants, in bytes."""

    uss: int
    pss: int
    rss: int
    processes: int
    cpu_percent: float  # summed over the tree; 100.0 is one core
    exact: bool  # False: USS and PSS were not readable and hold RSS


class TreeSampler:
    """Measures process trees; keeps each psutil.Process so CPU percent has a base.

    ``scan()`` reads every process's parent once per round; a tree is then
    walked from that map (``Process.children`` would scan /proc once per tree).
    """

    def __init__(self) -> None:
        self._known: dict[psutil.Process, psutil.Process] = {}  # keyed by (pid, create time)
        self._seen: set[psutil.Process] = set()
        self._children: dict[int, list[int]] = {}

    def scan(self) -> None:
        """Read the parent of every process (call once per round of samples)."""
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            children.setdefault(proc.info["ppid"], []).append(proc.pid)
        self._children = children

    def sample(self, pid: int) -> TreeMemory | None:
        """Measure ``pid`` and its descendants as of the last ``scan``; None if ``pid`` is gone."""
        pids = [pid]
        for parent in pids:  # grows as it goes: a breadth-first walk
            pids.extend(self._children.get(parent, ()))
        uss = pss = rss = count = 0
        cpu = 0.0
        exact = True
        for child in pids:
            try:
                found = psutil.Process(child)
            except psutil.Error:
                if child == pid:
                    return None
                continue
            proc = self._known.setdefault(found, found)
            self._seen.add(proc)
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    try:
                        full = proc.memory_full_info()
                        uss, pss, rss = uss + full.uss, pss + full.pss, rss + full.rss
                    except psutil.AccessDenied:
                        plain = proc.memory_info()
                        uss, pss, rss, exact = uss + plain.rss, pss + plain.rss, rss + plain.rss, False
            except psutil.Error:
                continue  # it ended mid-sample
            count += 1
        return TreeMemory(uss, pss, rss, count, cpu, exact) if count else None

    def prune(self) -> None:
        """Forget processes not seen since the last prune."""
        self._known = {p: p for p in self._seen}
        self._seen = set()


def own_uss() -> int:
    """USS of this process and its descendants, in bytes; 0 if any of it cannot be read.

    A worker measures itself once, before its first task: that is its fresh size,
    the baseline of its memory limit (a first sample by the manager may come while
    the first task already holds much memory).
    """
    try:
        me = psutil.Process()
        return sum(proc.memory_full_info().uss for proc in [me, *me.children(recursive=True)])
    except psutil.Error:  # a child that ended meanwhile, or smaps not readable: the manager decides
        return 0


class Sampler(threading.Thread):
    """Samples every active worker's tree each ``interval`` seconds into the block."""

    def __init__(self, shm_name: str, interval: float, companions: Companions | None = None) -> None:
        super().__init__(name="procpool-memory", daemon=True)
        self._companions = companions
        self._writer = MemoryWriter(shm_name)
        self._interval = interval
        self._trees = TreeSampler()
        self._baselines: dict[int, int] = {}  # worker pid -> its fresh USS (own_uss), else its first sample
        self._stop = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                self.sample_all()
        except Exception:  # the block is gone: the pool is ending
            log.debug("memory sampler stopped", exc_info=True)
        finally:
            self._writer.close()

    def sample_all(self) -> None:
        """One round over every active slot."""
        live = set()
        self._trees.scan()
        companions = self._companions.pids() if self._companions is not None else {}
        for slot, pid, started, fresh in self._writer.targets():
            tree = self._trees.sample(pid)
            if tree is None:
                continue
            live.add(pid)
            baseline = self._baselines.setdefault(pid, fresh or tree.uss) if started else 0
            other = companions.get(slot, 0)
            extra = self._trees.sample(other) if other else None
            self._writer.write(
                slot, pid, tree.uss, tree.pss, tree.rss, tree.processes, tree.cpu_percent,
                time.monotonic(), baseline, int(tree.exact),
                *((other, extra.uss, extra.pss, extra.processes) if extra else (0, 0, 0, 0)),
            )  # fmt: skip
        self._baselines = {pid: b for pid, b in self._baselines.items() if pid in live}
        self._trees.prune()

    def stop(self) -> None:
        self._stop.set()
