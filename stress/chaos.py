"""Chaos: tasks flow while workers and browsers are SIGKILLed and SIGSTOPped at random.

    submitter (this thread) ── CPU tasks at every priority, browser fan-outs ──▶ DistributedExecutor
    chaos (this thread, every --every s) ── SIGKILL / SIGSTOP ──▶ a random worker or pinned browser
    checks, continuously ── stats add up, nothing submitted goes missing
    checks, at the end ── every task ended exactly once, nothing left behind

A stopped worker is found by its missing heartbeat and replaced; a stopped
browser by the next task that cannot reach it. Exits 1 on any broken invariant.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import time

from procpool import DistributedExecutor

from .common import add_run_arguments, leftovers, say, table, write_report
from .demo import Run, browsers_for, check, fanout, signal_random, stats_problem

BACKLOG = 20  # queued tasks per worker at most
FAULTS = {  # name -> (signal, sent to a browser rather than a worker)
    "worker SIGKILL": (signal.SIGKILL, False),
    "worker SIGSTOP": (signal.SIGSTOP, False),
    "browser SIGKILL": (signal.SIGKILL, True),
    "browser SIGSTOP": (signal.SIGSTOP, True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, duration=30.0, workers=3, what="chaos")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between faults (default 1)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.CRITICAL)  # every fault here is on purpose
    args.accounts = 2
    state = Run(args, random.Random(args.seed))
    site, options = browsers_for(args)
    broken: list[str] = []
    try:
        with DistributedExecutor(
            max_local_workers=args.workers, task_timeout=20, max_retries=3, kill_grace=0.3,
            heartbeat_timeout=2.0, **options,
        ) as ex:  # fmt: skip
            for event in ("task_complete", "task_failed", "task_cancelled"):
                ex.register_callback(event, state.count)
            state.site = site.url if site else ""
            broken += storm(ex, state)
            say("chaos over; waiting for the last tasks")
            ex.wait_for_tasks(list(state.kinds), timeout=180)
            ex.shutdown()
            stats = ex.get_stats()
            records = {task_id: ex.get_task(task_id) for task_id in state.kinds}
    finally:
        if site is not None:
            site.close()
    problems = broken + check(state.kinds, records, state.terminal, stats)
    problems += [f"left behind: {item}" for item in leftovers()]
    say("\n" + table(["fault injected", "count"], sorted(state.chaos.items())))
    say(f"\n{len(state.kinds)} tasks, {stats['retried_tasks']} retries, {stats['failed_tasks']} failed")
    report = {"tasks": len(state.kinds), "faults": dict(state.chaos), "stats": stats, "problems": problems}
    say(f"report: {write_report('chaos', report)}")
    for problem in problems:
        say(f"PROBLEM: {problem}")
    survived = sum(state.chaos.values())
    say("FAILED" if problems else f"OK: survived {survived} faults; every task ended exactly once")
    return 1 if problems else 0


def storm(ex: DistributedExecutor, state: Run) -> list[str]:
    """Keep tasks flowing and inject a fault every ``--every`` seconds; returns broken invariants."""
    args, rng = state.args, state.rng
    faults = sorted(name for name, (_, browser) in FAULTS.items() if state.site or not browser)
    end = time.monotonic() + args.duration
    next_fault = next_fanout = time.monotonic() + 1.0
    broken: list[str] = []
    while (now := time.monotonic()) < end:
        stats = ex.get_stats()
        unbalanced = stats_problem(stats, len(state.kinds))
        if unbalanced:
            broken.append(f"at {now - end + args.duration:.1f} s: {unbalanced}")
        if stats["pending_tasks"] < BACKLOG * args.workers:
            state.submit(ex, "cpu")
        else:
            time.sleep(0.005)
        if state.site and now >= next_fanout:
            fanout(ex, state)
            next_fanout = now + 2.0
        if now >= next_fault:
            name = rng.choice(faults)
            signum, browser = FAULTS[name]
            state.chaos[name] += signal_random(stats, rng, signum, browser)
            next_fault = now + args.every
    return broken[:10]
