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
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import sessions
from procpool import DistributedExecutor, TaskPriority

from .common import leftovers, say, table, write_report
from .demo import KINDS, Run, check, fanout
from .pages import PageServer

PARTS = ("pending_tasks", "running_tasks", "completed_tasks", "failed_tasks", "cancelled_tasks")
BACKLOG = 20  # queued tasks per worker at most


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of chaos (default 30)")
    parser.add_argument("--workers", type=int, default=3, help="local workers (default 3)")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between faults (default 1)")
    parser.add_argument("--no-browser", action="store_true", help="workers only, no browsers")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.CRITICAL)  # every fault here is on purpose
    args.accounts = 2
    state = Run(args, random.Random(args.seed))
    site = None if args.no_browser else PageServer()
    options: dict[str, Any] = {} if site is None else {"companion": sessions.pinned_browsers()}
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
    faults = _faults(bool(state.site))
    end = time.monotonic() + args.duration
    next_fault = next_fanout = time.monotonic() + 1.0
    broken: list[str] = []
    while (now := time.monotonic()) < end:
        stats = ex.get_stats()
        if stats["total_tasks"] != sum(stats[p] for p in PARTS) or stats["total_tasks"] != len(state.kinds):
            broken.append(f"stats did not add up at {now - end + args.duration:.1f} s: {stats}")
        if stats["pending_tasks"] < BACKLOG * args.workers:
            priority = rng.choice(list(TaskPriority))
            fn, fn_args, timeout, _ = KINDS["cpu"]
            state.add([ex.submit_task(fn, fn_args, priority=priority, timeout=timeout)], "cpu", priority)
        else:
            time.sleep(0.005)
        if state.site and now >= next_fanout:
            fanout(ex, state)
            next_fanout = now + 2.0
        if now >= next_fault:
            name = rng.choice(sorted(faults))
            state.chaos[name] += faults[name](stats, rng)
            next_fault = now + args.every
    return broken[:10]


def _faults(browsers: bool) -> dict[str, Callable[[dict[str, Any], random.Random], int]]:
    def pick(stats: dict[str, Any], rng: random.Random, browser: bool) -> int | None:
        views = [w for w in stats["workers"].values() if w["active"] and w["pid"] > 0]
        pids = [w["browser"]["pid"] for w in views if w["browser"]] if browser else [w["pid"] for w in views]
        return rng.choice(pids) if pids else None

    def send(signum: int, browser: bool) -> Callable[[dict[str, Any], random.Random], int]:
        def inject(stats: dict[str, Any], rng: random.Random) -> int:
            pid = pick(stats, rng, browser)
            if pid is None:
                return 0
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return 0
            return 1

        return inject

    faults = {"worker SIGKILL": send(signal.SIGKILL, False), "worker SIGSTOP": send(signal.SIGSTOP, False)}
    if browsers:
        faults |= {
            "browser SIGKILL": send(signal.SIGKILL, True),
            "browser SIGSTOP": send(signal.SIGSTOP, True),
        }
    return faults
