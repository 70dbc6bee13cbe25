"""What watching a pool costs: stats reads in and out of the pool's process, memory sampling, idle workers.

With 64 idle workers: ``get_stats()`` in the pool's process, a snapshot by a
watcher in another process (as ``python -m procpool top`` reads it), the CPU
time the manager's sampler spends per worker per sample, and the memory
(USS) of an idle worker and of the manager process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil

from procpool import DistributedExecutor
from procpool._memory import TreeSampler

from .common import call_cost_us, conclude, figure_table, say

_READER = """
import sys
from procpool._watch import Watcher
from stress.common import call_cost_us
print(call_cost_us(Watcher(sys.argv[1]).snapshot, int(sys.argv[2])))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=64, help="idle workers in the measured pool")
    parser.add_argument("--calls", type=int, default=2000, help="reads per stats figure")


def run(args: argparse.Namespace) -> int:
    say(f"starting a pool of {args.workers} workers ...")
    with DistributedExecutor(max_local_workers=args.workers) as ex:
        figures = measure(ex, args.workers, args.calls)
    return conclude("overhead", figures, figure_table(figures))


def measure(ex: DistributedExecutor, workers: int, calls: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while not all(w["memory_mb"] for w in ex.get_stats()["workers"].values()):
        if time.monotonic() > deadline:
            raise RuntimeError("workers were not sampled within 30 s")
        time.sleep(0.1)
    in_process = call_cost_us(ex.get_stats, calls)
    stats = ex.get_stats()
    reader = subprocess.run(
        [sys.executable, "-c", _READER, ex.metrics_block, str(calls)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    pids = [w["pid"] for w in stats["workers"].values()]
    idle = [w["memory_mb"] for w in stats["workers"].values()]
    manager = ex._supervisor.manager._process.pid  # type: ignore[union-attr]
    return {
        f"get_stats() with {workers} workers (us)": in_process,
        f"watcher snapshot from another process, {workers} workers (us)": float(reader.stdout),
        "sampler CPU per worker per sample (ms)": sampler_cost(pids),
        "idle worker USS, median (MB)": statistics.median(idle),
        "idle worker PSS, median (MB)": statistics.median(w["pss_mb"] for w in stats["workers"].values()),
        "manager process USS (MB)": psutil.Process(manager).memory_full_info().uss / 2**20,
    }


def sampler_cost(pids: list[int], rounds: int = 5) -> float:
    """CPU milliseconds to measure one worker's tree, as the manager's sampler does."""
    sampler = TreeSampler()
    start = time.process_time()
    for _ in range(rounds):
        sampler.scan()
        for pid in pids:
            sampler.sample(pid)
        sampler.prune()
    return (time.process_time() - start) / (rounds * len(pids)) * 1e3
