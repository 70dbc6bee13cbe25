"""Soak: a long steady run that watches for growth in memory, file descriptors and /dev/shm.

submitter (this thread) ── steady CPU tasks and browser fan-outs ──▶ DistributedExecutor
sampler (this thread, every --every s) ── USS of the manager, workers and browsers (psutil),
                                          open fds of this process and the manager, /dev/shm entries
verdict ── the last third of the run against the first third ──▶ exit 1 on growth past the limits
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from pathlib import Path

import psutil

from procpool import DistributedExecutor

from .common import OUT, add_run_arguments, leftovers, say, table, write_report
from .demo import Run, browsers_for, fanned_out, fanout
from .plot import plot_soak

RATE = 200  # CPU tasks submitted per second: steady, well below what the pool can take
WARM_UP = 0.3  # share of the samples, at the start, that the verdict ignores
_MB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, duration=120.0, workers=3, what="steady load")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--max-growth", type=float, default=0.25, help="allowed memory growth (default 25%%)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)
    args.accounts = 2
    state = Run(args, random.Random(args.seed))
    site, options = browsers_for(args)
    samples: list[dict[str, float]] = []
    try:
        with DistributedExecutor(
            max_local_workers=args.workers, memory_sample_interval=min(args.every, 2.0), **options
        ) as ex:
            state.site = site.url if site else ""
            manager = psutil.Process(ex._supervisor.manager._process.pid)  # type: ignore[union-attr]
            steady(ex, state, manager, samples)
            ex.wait_for_tasks(list(state.kinds), timeout=120)
    finally:
        if site is not None:
            site.close()
    problems = verdict(samples, args.max_growth) + [f"left behind: {item}" for item in leftovers()]
    image = plot_soak(samples, OUT / "soak.png")
    say(f"\n{len(state.kinds)} tasks, {len(samples)} samples" + (f", plot: {image}" if image else ""))
    say(f"report: {write_report('soak', {'samples': samples, 'problems': problems})}")
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say("FAILED" if problems else "OK: no growth past the limits, nothing left behind")
    return 1 if problems else 0


def steady(
    ex: DistributedExecutor, state: Run, manager: psutil.Process, samples: list[dict[str, float]]
) -> None:
    args = state.args
    begin = time.monotonic()
    end = begin + args.duration
    next_sample = next_fanout = begin
    submitted = 0
    while (now := time.monotonic()) < end:
        if submitted < (now - begin) * RATE:
            state.submit(ex, "cpu")
            submitted += 1
        else:
            time.sleep(0.002)
        if state.site and now >= next_fanout and fanned_out(ex, state):
            fanout(ex, state)
            next_fanout = now + 3.0
        if now >= next_sample:
            samples.append(measure(ex, manager, now - begin))
            say(_line(samples[-1]))
            next_sample = now + args.every


def measure(ex: DistributedExecutor, manager: psutil.Process, t: float) -> dict[str, float]:
    stats = ex.get_stats()
    workers = [w for w in stats["workers"].values() if w["active"]]
    return {
        "t": t,
        "manager_mb": manager.memory_full_info().uss / _MB,
        "workers_mb": sum(w["memory_mb"] or 0.0 for w in workers),
        "browsers_mb": sum(w["browser"]["memory_mb"] for w in workers if w["browser"]),
        "fds": float(psutil.Process().num_fds() + manager.num_fds()),
        "shm": float(len(list(Path("/dev/shm").iterdir()))),
        "tasks": float(stats["total_tasks"]),
    }


def _line(s: dict[str, float]) -> str:
    return (
        f"{s['t']:6.1f}s  manager {s['manager_mb']:6.1f} MB  workers {s['workers_mb']:6.1f} MB  "
        f"browsers {s['browsers_mb']:6.1f} MB  fds {s['fds']:.0f}  shm {s['shm']:.0f}  tasks {s['tasks']:.0f}"
    )


def verdict(samples: list[dict[str, float]], max_growth: float) -> list[str]:
    """Growth of the last third over the first third of the run after its warm-up, per figure."""
    settled = samples[int(len(samples) * WARM_UP) :]  # browsers starting, caches filling
    if len(settled) < 3:
        return []
    third = max(1, len(settled) // 3)
    first, last = settled[:third], settled[-third:]
    problems, rows = [], []
    for key, allowed in (("manager_mb", max_growth), ("workers_mb", max_growth), ("browsers_mb", max_growth)):
        before, after = statistics.mean(s[key] for s in first), statistics.mean(s[key] for s in last)
        growth = (after - before) / before if before else 0.0
        rows.append([key, before, after, f"{growth:+.0%}"])
        if growth > allowed and after - before > 5:  # and more than 5 MB: noise on small figures
            problems.append(f"{key} grew {growth:+.0%} ({before:.1f} -> {after:.1f} MB)")
    for key, slack in (("fds", 8.0), ("shm", 0.0)):
        before, after = max(s[key] for s in first), max(s[key] for s in last)
        rows.append([key, before, after, f"{after - before:+.0f}"])
        if after - before > slack:
            problems.append(f"{key} grew from {before:.0f} to {after:.0f}")
    say("\n" + table(["figure", "first third", "last third", "growth"], rows))
    return problems
