"""The default scenario: a mixed workload with injected faults, checked end to end.

    submitter (this thread) ── submit_task / submit_batch ──▶ DistributedExecutor
    chaos (this thread, every few seconds) ── SIGKILL ──▶ a random worker
    callbacks ── count terminal events per task ──▶ the checks at the end

It fails (exit 1) if any task was lost or reported twice, ended in a state
its kind does not allow, if the stats do not add up, or if any process or
shared-memory block outlives the pool.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from procpool import (
    DistributedExecutor,
    TaskPriority,
    TaskRecord,
    TaskStatus,
    TaskTimeoutError,
    WorkerLostError,
)

from . import tasks
from .common import is_tty, leftovers, percentile, say, table, write_report

# kind -> (function, args, per-task timeout, the terminal states it may end in)
KINDS: dict[str, tuple[Any, tuple[Any, ...], float | None, set[TaskStatus]]] = {
    "cpu": (tasks.cpu, (20_000,), None, {TaskStatus.COMPLETED}),
    "hang": (tasks.hang, (), 0.5, {TaskStatus.CANCELLED}),
    "deaf": (tasks.ignore_sigterm_and_hang, (), 0.5, {TaskStatus.CANCELLED}),
    "crash": (tasks.crash, (), None, {TaskStatus.FAILED}),
    "sigkill": (tasks.kill_self, (), None, {TaskStatus.FAILED}),
    "raise": (tasks.fail, (), None, {TaskStatus.FAILED}),
}
FAULTS = ["hang", "deaf", "crash", "sigkill", "raise"]
BATCH_EVERY = 1.0  # seconds between HIGH batches
CHAOS_EVERY = 3.0  # seconds between SIGKILLs of a random worker from outside
BACKLOG = 40  # tasks per worker kept queued at most, so latency stays meaningful


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of submitting (default 30)")
    parser.add_argument("--workers", type=int, default=4, help="local workers (default 4)")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of tasks that misbehave")
    parser.add_argument("--no-chaos", action="store_true", help="do not SIGKILL workers from outside")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    rng = random.Random(args.seed)
    terminal: Counter[str] = Counter()
    lock = threading.Lock()

    def count(record: TaskRecord) -> None:
        with lock:
            terminal[record.task_id] += 1

    kinds: dict[str, str] = {}
    started = time.monotonic()
    with DistributedExecutor(
        max_local_workers=args.workers, task_timeout=10, max_retries=2, kill_grace=0.3
    ) as ex:
        for event in ("task_complete", "task_failed", "task_cancelled"):
            ex.register_callback(event, count)
        chaos_kills = drive(ex, args, rng, kinds)
        say("submitting done; waiting for the last tasks")
        ex.wait_for_tasks(list(kinds), timeout=120)
        ex.shutdown()
        elapsed = time.monotonic() - started
        stats = ex.get_stats()
        records = {task_id: ex.get_task(task_id) for task_id in kinds}
    problems = check(kinds, records, terminal, stats)
    problems += [f"left behind: {item}" for item in leftovers()]
    report = summarise(kinds, records, stats, elapsed, chaos_kills)
    report["problems"] = problems
    path = write_report("demo", report)
    say(f"\nreport: {path}")
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say("FAILED" if problems else "OK: every task ended exactly once, stats add up, nothing left behind")
    return 1 if problems else 0


def drive(
    ex: DistributedExecutor, args: argparse.Namespace, rng: random.Random, kinds: dict[str, str]
) -> int:
    """Submit the workload until the duration is over; returns how many workers chaos killed."""
    end = time.monotonic() + args.duration
    next_batch = next_chaos = next_view = time.monotonic()
    chaos_kills = 0
    view = Progress()
    while (now := time.monotonic()) < end:
        stats = ex.get_stats()
        if stats["pending_tasks"] < BACKLOG * args.workers:
            kind = rng.choice(FAULTS) if rng.random() < args.fault_rate else "cpu"
            fn, fn_args, timeout, _ = KINDS[kind]
            priority = rng.choice(list(TaskPriority))
            kinds[ex.submit_task(fn, fn_args, priority=priority, timeout=timeout)] = kind
        else:
            time.sleep(0.002)
        if now >= next_batch:
            for task_id in ex.submit_batch([(tasks.cpu, (5_000,))] * 20, priority=TaskPriority.HIGH):
                kinds[task_id] = "batch"
            next_batch = now + BATCH_EVERY
        if not args.no_chaos and now >= next_chaos and now > 1.0 + end - args.duration:
            chaos_kills += kill_random_worker(stats, rng)
            next_chaos = now + CHAOS_EVERY
        if now >= next_view:
            view.show(stats, end - now)
            next_view = now + (0.25 if is_tty() else 2.0)
    view.close()
    return chaos_kills


def kill_random_worker(stats: dict[str, Any], rng: random.Random) -> int:
    pids = [w["pid"] for w in stats["workers"].values() if w["active"] and w["pid"] > 0]
    if not pids:
        return 0
    try:
        os.kill(rng.choice(pids), signal.SIGKILL)
    except ProcessLookupError:
        return 0
    return 1


class Progress:
    """Live lines on a terminal; a plain log line every few seconds otherwise."""

    def __init__(self) -> None:
        self._lines = 0

    def show(self, stats: dict[str, Any], left: float) -> None:
        depth = stats["queue_depth"]
        head = (
            f"{left:5.1f}s left | done {stats['completed_tasks']} failed {stats['failed_tasks']} "
            f"cancelled {stats['cancelled_tasks']} running {stats['running_tasks']} "
            f"retries {stats['retried_tasks']} | queued " + " ".join(f"{k}:{v}" for k, v in depth.items())
        )
        if not is_tty():
            say(head)
            return
        workers = [
            f"  {name:16} {w['state']:8} {w['completed']:6} done {w['failed']:4} failed "
            f"restarts {w['restarts']:3} load {w['load']:.2f}"
            for name, w in stats["workers"].items()
        ]
        lines = [head, *workers]
        out = ("\x1b[F" * self._lines) + "\n".join("\x1b[2K" + line for line in lines)
        print(out, flush=True)
        self._lines = len(lines)

    def close(self) -> None:
        self._lines = 0


def check(
    kinds: dict[str, str], records: dict[str, TaskRecord], terminal: Counter[str], stats: dict[str, Any]
) -> list[str]:
    """The invariants of DESIGN.md, over the whole run."""
    problems = []
    for task_id, kind in kinds.items():
        record = records[task_id]
        if terminal[task_id] != 1:
            problems.append(f"{task_id} ({kind}) reported {terminal[task_id]} times")
        allowed = KINDS["cpu" if kind == "batch" else kind][3]
        # A task whose worker chaos killed may use up its retries that way: FAILED with WorkerLostError.
        lost_to_chaos = record.status is TaskStatus.FAILED and isinstance(record.error, WorkerLostError)
        if record.status not in allowed and not lost_to_chaos:
            problems.append(f"{task_id} ({kind}) ended {record.status.name}: {record.error!r}")
        if kind in ("hang", "deaf") and not isinstance(record.error, TaskTimeoutError):
            problems.append(f"{task_id} ({kind}) ended without a TaskTimeoutError: {record.error!r}")
        if (
            kind == "cpu"
            and record.status is TaskStatus.COMPLETED
            and record.result != tasks.expected_cpu(20_000)
        ):
            problems.append(f"{task_id} returned a wrong result")
    parts = ("pending_tasks", "running_tasks", "completed_tasks", "failed_tasks", "cancelled_tasks")
    if stats["total_tasks"] != len(kinds) or stats["total_tasks"] != sum(stats[p] for p in parts):
        problems.append(f"stats do not add up: {[(p, stats[p]) for p in ('total_tasks', *parts)]}")
    return problems


def summarise(
    kinds: dict[str, str], records: dict[str, TaskRecord], stats: dict[str, Any], elapsed: float, chaos: int
) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    for task_id, kind in kinds.items():
        record = records[task_id]
        by_kind[kind][record.status.name] += 1
        if record.status is TaskStatus.COMPLETED and record.finished_at:
            latency[record.priority.name].append(record.finished_at - record.submitted_at)
    states = ["COMPLETED", "FAILED", "CANCELLED"]
    say(
        "\n"
        + table(
            ["kind", *states, "total"],
            [[k, *(c[s] for s in states), sum(c.values())] for k, c in sorted(by_kind.items())],
        )
    )
    rows = [
        [
            p.name,
            len(latency[p.name]),
            1000 * percentile(latency[p.name], 50),
            1000 * percentile(latency[p.name], 99),
        ]
        for p in TaskPriority
    ]
    say("\n" + table(["priority", "completed", "p50 ms", "p99 ms"], rows))
    timeouts = sum(1 for r in records.values() if isinstance(r.error, TaskTimeoutError))
    say(
        f"\n{len(kinds)} tasks in {elapsed:.1f} s ({len(kinds) / elapsed:,.0f}/s), "
        f"{stats['retried_tasks']} retries, {timeouts} timeouts, {chaos} workers killed from outside"
    )
    return {
        "tasks": len(kinds),
        "seconds": elapsed,
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "latency_ms": {r[0]: {"p50": r[2], "p99": r[3], "n": r[1]} for r in rows},
        "retries": stats["retried_tasks"],
        "timeouts": timeouts,
        "chaos_kills": chaos,
        "stats": {k: v for k, v in stats.items() if k != "workers"},
        "workers": stats["workers"],
    }
