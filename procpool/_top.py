"""``python -m procpool top``: a live view of a running pool from another process.

    Watcher (read-only mmap of the pool's block) ── snapshot every interval ──▶ frame ──▶ stdout

On a terminal the screen is redrawn in place; otherwise each frame is printed
after the last, plainly. ``--once --json`` prints one snapshot as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from collections import deque
from typing import Any, TextIO

from ._watch import SHM_DIR, PoolInfo, Watcher, age, list_pools

__all__ = ("Throughput", "main", "render")

_WINDOW = 5.0  # seconds of history behind the throughput figure
_CLEAR = "\x1b[H\x1b[2J"
_COLUMNS = (
    ("WORKER", "<"), ("STATE", "<"), ("PID", ">"), ("TASK", "<"), ("DONE", ">"), ("FAIL", ">"),
    ("LOAD", ">"), ("USS MB", ">"), ("PSS MB", ">"), ("PROCS", ">"), ("CPU%", ">"), ("BEAT", ">"),
    ("HEALTH", "<"),
)  # fmt: skip


class Throughput:
    """Tasks finished per second over the last few seconds, from successive snapshots."""

    def __init__(self, window: float = _WINDOW) -> None:
        self._window = window
        self._points: deque[tuple[float, int]] = deque()

    def add(self, now: float, stats: dict[str, Any]) -> float | None:
        """Record a snapshot taken at ``now``; the rate, once two snapshots are apart in time."""
        done = stats["completed_tasks"] + stats["failed_tasks"] + stats["cancelled_tasks"]
        self._points.append((now, done))
        while len(self._points) > 2 and now - self._points[0][0] > self._window:
            self._points.popleft()
        (t0, d0), (t1, d1) = self._points[0], self._points[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


def render(stats: dict[str, Any], rate: float | None) -> str:
    """One frame of text for a snapshot."""
    depth = "  ".join(f"{k} {v}" for k, v in stats["queue_depth"].items())
    lines = [
        f"{stats['metrics_block']}  creator pid {stats['creator_pid']}  up {_clock(age(stats['created']))}  "
        f"workers {stats['active_workers']}/{stats['total_workers']}  memory {stats['memory_mb']:.1f} MB",
        f"tasks {stats['total_tasks']}  pending {stats['pending_tasks']}  running {stats['running_tasks']}  "
        f"completed {stats['completed_tasks']}  failed {stats['failed_tasks']}  "
        f"cancelled {stats['cancelled_tasks']}  retried {stats['retried_tasks']}  "
        f"throughput {'-' if rate is None else f'{rate:.1f}/s'}",
        f"queue  {depth}",
        "",
    ]
    rows = [[name for name, _ in _COLUMNS]]
    rows += [_row(name, w) for name, w in stats["workers"].items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        cells = [
            f"{cell:{align}{width}}" for cell, (_, align), width in zip(row, _COLUMNS, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row(name: str, w: dict[str, Any]) -> list[str]:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    health = "ok" if w["healthy"] else ("down" if not w["active"] else "HUNG")
    return [
        name, w["state"], str(w["pid"] or "-"), w["current_task"] or "-", str(w["completed"]),
        str(w["failed"]), f"{w['load']:.0%}", num(w["memory_mb"], ".1f"), num(w["pss_mb"], ".1f"),
        num(w["processes"], "d"), num(w["cpu_percent"], ".0f"), num(w["heartbeat_age"], ".1f"), health,
    ]  # fmt: skip


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _print_pools(pools: list[PoolInfo], as_json: bool, out: TextIO) -> None:
    if as_json:
        json.dump([dataclasses.asdict(p) for p in pools], out, indent=1)
        out.write("\n")
        return
    if not pools:
        out.write("no running procpool pools found in /dev/shm\n")
        return
    for p in pools:
        state = "running" if p.alive else "creator gone"
        out.write(
            f"{p.name}  creator pid {p.creator_pid} ({state})  up {_clock(age(p.created))}  "
            f"workers {p.workers}  tasks {p.total_tasks}\n"
        )


def watch(name: str, interval: float, once: bool, as_json: bool, out: TextIO) -> int:
    """Show ``name`` until Ctrl-C or until the pool ends; 1 if it cannot be read."""
    try:
        watcher = Watcher(name)
    except FileNotFoundError:
        sys.stderr.write(f"no pool named {name!r}: run `python -m procpool top` to list running pools\n")
        return 1
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    rates = Throughput()
    live = out.isatty() and not as_json
    try:
        while True:
            stats = watcher.snapshot()
            rate = rates.add(time.monotonic(), stats)
            if as_json:
                out.write(json.dumps(stats) + "\n")
            else:
                out.write((_CLEAR if live else "") + render(stats, rate) + "\n\n")
            out.flush()
            if once:
                return 0
            time.sleep(interval)
            if not (SHM_DIR / watcher.name).exists():
                out.write("the pool has ended\n")
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        watcher.close()


def _cluster_cli(parser: argparse.ArgumentParser) -> types.ModuleType:
    """The cluster commands' module; without psycopg (the postgres extra), exit saying so."""
    from ._executor import cluster_executor

    try:
        cluster_executor()
    except RuntimeError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    from ._cluster import cli

    return cli


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m procpool`` and the ``procpool`` script."""
    about = "Watch running procpool pools; serve a cluster queue."
    parser = argparse.ArgumentParser(prog="procpool", description=about)
    commands = parser.add_subparsers(dest="command", required=True)
    top = commands.add_parser("top", help="a live view of a pool; lists running pools without a name")
    top.add_argument("name", nargs="?", help="the pool's metrics block (its get_stats()['metrics_block'])")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="print snapshots as JSON, one per line")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--queue", help="a cluster's PostgreSQL DSN: its hosts and queue instead of a pool")
    commands.add_parser("host", help="serve a cluster queue (PostgreSQL): see python -m procpool host -h")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["host"]:
        host = argparse.ArgumentParser(prog="procpool host", description="Serve a cluster queue.")
        cli = _cluster_cli(host)
        cli.add_host_arguments(host)
        code: int = cli.run_host(host.parse_args(argv[1:]))
        return code
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be above zero")
    if args.queue is not None:
        code = _cluster_cli(parser).top_queue(args.queue, args.interval, args.once, args.json, sys.stdout)
        return int(code)
    if args.name is None:
        _print_pools(list_pools(), args.json, sys.stdout)
        return 0
    return watch(args.name, args.interval, args.once, args.json, sys.stdout)
