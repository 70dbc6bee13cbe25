"""The default scenario: a mixed workload with browsers and injected faults, checked end to end.

    pages (127.0.0.1) ◀── each worker's pinned browser ── multi-account fan-out, HIGH batches
    submitter (this thread) ── submit_task / submit_batch ──▶ DistributedExecutor (companion: browsers)
                            ── sync_session ──▶ SessionPool (an incognito context per account, here)
    chaos (this thread) ── SIGKILL ──▶ a random worker every few seconds, a browser now and then
    callbacks ── count terminal events per task ──▶ the checks at the end
    timeline ── get_stats() twice a second ──▶ summary, JSON report and PNG plot

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
from dataclasses import dataclass, field
from typing import Any

import sessions
from procpool import (
    DistributedExecutor,
    TaskPriority,
    TaskRecord,
    TaskStatus,
    TaskTimeoutError,
    WorkerLostError,
)

from . import tasks
from .common import (
    OUT,
    StderrWatch,
    add_run_arguments,
    is_tty,
    leftovers,
    percentile,
    say,
    table,
    write_report,
)
from .pages import PageServer
from .plot import plot_timeline

# kind -> (function, args, per-task timeout, the terminal states it may end in)
KINDS: dict[str, tuple[Any, tuple[Any, ...], float | None, set[TaskStatus]]] = {
    "cpu": (tasks.cpu, (20_000,), None, {TaskStatus.COMPLETED}),
    "hang": (tasks.hang, (), 0.5, {TaskStatus.CANCELLED}),
    "deaf": (tasks.ignore_sigterm_and_hang, (), 0.5, {TaskStatus.CANCELLED}),
    "crash": (tasks.crash, (), None, {TaskStatus.FAILED}),
    "sigkill": (tasks.kill_self, (), None, {TaskStatus.FAILED}),
    "raise": (tasks.fail, (), None, {TaskStatus.FAILED}),
    # A browser killed mid-task may fail its attempts, a frozen one holds its task to the deadline:
    # FAILED and CANCELLED are allowed; ending twice, or never, is not.
    "browse": (tasks.browse, (), 20.0, {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    # Hostile ones that chaos adds (the daemon's pid folder is given at submission):
    "daemon": (tasks.daemon_then_hang, (), 0.5, {TaskStatus.CANCELLED}),
    "fork": (tasks.fork_and_return, (7,), None, {TaskStatus.COMPLETED}),
    "huge": (tasks.huge, (32,), None, {TaskStatus.COMPLETED}),
}
FAULTS = ["hang", "deaf", "crash", "sigkill", "raise"]
BATCH_EVERY = 1.0  # seconds between HIGH batches of CPU tasks
FANOUT_EVERY = 3.0  # seconds between multi-account browser fan-outs
CHAOS_EVERY = 3.0  # seconds between SIGKILLs of a random worker from outside
BROWSER_KILL_EVERY = 10.0  # seconds between SIGKILLs of a random pinned browser
SESSION_EVERY = 2.0  # seconds between uses of the in-process session pool
SAMPLE_EVERY = 0.5  # seconds between timeline samples
BACKLOG = 40  # tasks per worker kept queued at most, so latency stays meaningful
PARTS = ("pending_tasks", "running_tasks", "completed_tasks", "failed_tasks", "cancelled_tasks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, duration=45.0, workers=4, what="submitting")
    parser.add_argument("--accounts", type=int, default=4, help="accounts in each browser fan-out")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of tasks that misbehave")
    parser.add_argument("--no-chaos", action="store_true", help="do not SIGKILL workers or browsers")


@dataclass
class Run:
    """What one run submitted, saw and measured."""

    args: argparse.Namespace
    rng: random.Random
    site: str = ""  # the page server's base URL, with browsers
    kinds: dict[str, str] = field(default_factory=dict)
    submitted: Counter[str] = field(default_factory=Counter)  # by priority
    done: Counter[str] = field(default_factory=Counter)  # by priority
    terminal: Counter[str] = field(default_factory=Counter)  # by task id
    lock: threading.Lock = field(default_factory=threading.Lock)
    chaos: Counter[str] = field(default_factory=Counter)  # faults injected from outside
    timeline: list[dict[str, Any]] = field(default_factory=list)
    peak_mb: dict[str, float] = field(default_factory=dict)  # per worker and per browser
    pid_dir: str = ""  # where chaos's daemon tasks write their daemons' pids
    fanning: list[str] = field(default_factory=list)  # the browser fan-out in flight

    def count(self, record: TaskRecord) -> None:
        with self.lock:
            self.terminal[record.task_id] += 1
            self.done[record.priority.name] += 1

    def submit(self, ex: DistributedExecutor, kind: str) -> None:
        """One task of ``kind`` at a random priority."""
        fn, fn_args, timeout, _ = KINDS[kind]
        priority = self.rng.choice(list(TaskPriority))
        self.add([ex.submit_task(fn, fn_args, priority=priority, timeout=timeout)], kind, priority)

    def add(self, ids: list[str], kind: str, priority: TaskPriority) -> None:
        for task_id in ids:
            self.kinds[task_id] = kind
        self.submitted[priority.name] += len(ids)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    state = Run(args, random.Random(args.seed))
    watch = StderrWatch()
    site, options = browsers_for(args)
    pool = None if site is None else sessions.SessionPool(max_sessions=2, isolation="context")
    started = time.monotonic()
    try:
        with DistributedExecutor(
            max_local_workers=args.workers,
            max_finished_tasks=None,  # every record is checked at the end
            task_timeout=10,
            max_retries=2,
            kill_grace=0.3,
            memory_sample_interval=SAMPLE_EVERY,
            **options,
        ) as ex:
            for event in ("task_complete", "task_failed", "task_cancelled"):
                ex.register_callback(event, state.count)
            state.site = site.url if site else ""
            stop = threading.Event()
            user = None
            if pool is not None:
                user = threading.Thread(target=use_sessions, args=(pool, state, stop), name="sessions-user")
                user.start()
            try:
                drive(ex, state)
            finally:
                stop.set()
                if user is not None:
                    user.join()
            say("submitting done; waiting for the last tasks")
            ex.wait_for_tasks(list(state.kinds), timeout=120)
            sample(ex, state, started)
            ex.shutdown()
            stats = ex.get_stats()
            records = {task_id: ex.get_task(task_id) for task_id in state.kinds}
        pool_stats = pool.get_stats() if pool else None
    finally:
        if pool is not None:
            pool.close()
        if site is not None:
            site.close()
    elapsed = time.monotonic() - started
    problems = check(state.kinds, records, state.terminal, stats)
    problems += [f"left behind: {item}" for item in leftovers()]
    tracebacks = watch.close()
    if tracebacks:
        problems.append(f"{tracebacks} tracebacks were printed to stderr")
    report = summarise(state, records, stats, elapsed, pool_stats)
    report["tracebacks on stderr"] = tracebacks
    say(f"tracebacks on stderr: {tracebacks}")
    report["problems"] = problems
    image = plot_timeline(state.timeline, OUT / "demo.png", f"python -m stress: {len(state.kinds)} tasks")
    say(f"\nreport: {write_report('demo', report)}" + (f", plot: {image}" if image else ""))
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say("FAILED" if problems else "OK: every task ended exactly once, stats add up, nothing left behind")
    return 1 if problems else 0


def browsers_for(args: argparse.Namespace) -> tuple[PageServer | None, dict[str, Any]]:
    """The page server and the executor options for pinned browsers; nothing with --no-browser."""
    if args.no_browser:
        return None, {}
    return PageServer(), {"companion": sessions.pinned_browsers()}


def drive(ex: DistributedExecutor, state: Run) -> None:
    """Submit the workload until the duration is over, injecting faults from outside."""
    args, rng = state.args, state.rng
    begin = time.monotonic()
    end = begin + args.duration
    due = dict.fromkeys(("batch", "fanout", "chaos", "browser", "view", "sample"), begin + 1.0)
    view = Progress()
    while (now := time.monotonic()) < end:
        stats = ex.get_stats()
        if stats["pending_tasks"] < BACKLOG * args.workers:
            state.submit(ex, rng.choice(FAULTS) if rng.random() < args.fault_rate else "cpu")
        else:
            time.sleep(0.002)
        if now >= due["batch"]:
            ids = ex.submit_batch([(tasks.cpu, (5_000,))] * 20, priority=TaskPriority.HIGH)
            state.add(ids, "batch", TaskPriority.HIGH)
            due["batch"] = now + BATCH_EVERY
        if state.site and now >= due["fanout"] and fanned_out(ex, state):
            fanout(ex, state)
            due["fanout"] = now + FANOUT_EVERY
        if not args.no_chaos and now >= due["chaos"]:
            state.chaos["workers killed"] += signal_random(stats, rng, signal.SIGKILL)
            due["chaos"] = now + CHAOS_EVERY
        if state.site and not args.no_chaos and now >= due["browser"] and now > begin + 5:
            state.chaos["browsers killed"] += signal_random(stats, rng, signal.SIGKILL, browser=True)
            due["browser"] = now + BROWSER_KILL_EVERY
        if now >= due["sample"]:
            sample(ex, state, begin, stats)
            due["sample"] = now + SAMPLE_EVERY
        if now >= due["view"]:
            view.show(stats, state, end - now)
            due["view"] = now + (0.25 if is_tty() else 5.0)
    view.close()


def fanout(ex: DistributedExecutor, state: Run) -> None:
    """One task per account, each driving its worker's browser: the seed's multi-account fan-out."""
    accounts = [f"account-{i}" for i in range(state.args.accounts)]
    fn, _, timeout, _ = KINDS["browse"]
    ids = ex.submit_batch(
        [(fn, (state.site, a)) for a in accounts], priority=TaskPriority.HIGH, timeout=timeout
    )
    state.add(ids, "browse", TaskPriority.HIGH)
    state.fanning = ids


def fanned_out(ex: DistributedExecutor, state: Run) -> bool:
    """Whether the last fan-out has ended: a new one starts only then, as a caller that waits for
    its accounts' results would (fan-outs every 3 s whatever happens would pile up HIGH work, each
    task taking a worker about a second, and starve every lower priority)."""
    return all(ex.get_task(task_id).done for task_id in state.fanning)


def use_sessions(pool: sessions.SessionPool, state: Run, stop: threading.Event) -> None:
    """The in-process session pool, on its own thread, from plain code: contexts reused, evicted LRU."""
    rng = random.Random(state.args.seed)
    while not stop.wait(SESSION_EVERY):
        with pool.sync_session(f"account-{rng.randrange(3)}") as browser:
            page = browser.newPage()
            try:
                page.goto(f"{state.site}/whoami")
            finally:
                page.close()


def sample(ex: DistributedExecutor, state: Run, begin: float, stats: dict[str, Any] | None = None) -> None:
    """One point of the timeline, and the peak memory of every worker and browser."""
    stats = stats or ex.get_stats()
    workers_mb = browsers_mb = 0.0
    for name, w in stats["workers"].items():
        workers_mb += w["memory_mb"] or 0.0
        state.peak_mb[name] = max(state.peak_mb.get(name, 0.0), w["memory_mb"] or 0.0)
        if w["browser"]:
            browsers_mb += w["browser"]["memory_mb"]
            key = f"{name} browser"
            state.peak_mb[key] = max(state.peak_mb.get(key, 0.0), w["browser"]["memory_mb"])
    finished = stats["completed_tasks"] + stats["failed_tasks"] + stats["cancelled_tasks"]
    state.timeline.append(
        {"t": time.monotonic() - begin, "finished": finished, "depth": stats["queue_depth"],
         "workers_mb": workers_mb, "browsers_mb": browsers_mb}
    )  # fmt: skip


def signal_random(stats: dict[str, Any], rng: random.Random, signum: int, browser: bool = False) -> int:
    """Send ``signum`` to a random live worker (or its pinned browser); 1 if one got it."""
    views = [w for w in stats["workers"].values() if w["active"] and w["pid"] > 0]
    pids = [w["browser"]["pid"] for w in views if w["browser"]] if browser else [w["pid"] for w in views]
    if not pids:
        return 0
    try:
        os.kill(rng.choice(pids), signum)
    except ProcessLookupError:
        return 0
    return 1


class Progress:
    """A bar per priority and a line per worker on a terminal; a plain log line otherwise."""

    def __init__(self) -> None:
        self._lines = 0

    def show(self, stats: dict[str, Any], state: Run, left: float) -> None:
        head = (
            f"{left:5.1f}s left | done {stats['completed_tasks']} failed {stats['failed_tasks']} "
            f"cancelled {stats['cancelled_tasks']} running {stats['running_tasks']} "
            f"retries {stats['retried_tasks']} | memory {stats['memory_mb']:.0f} MB"
        )
        if not is_tty():
            say(head + " | queued " + " ".join(f"{k}:{v}" for k, v in stats["queue_depth"].items()))
            return
        with state.lock:
            bars = [_bar(p.name, state.done[p.name], state.submitted[p.name]) for p in TaskPriority]
        workers = [_worker_line(name, w) for name, w in stats["workers"].items()]
        lines = [head, *bars, *workers]
        out = ("\x1b[F" * self._lines) + "\n".join("\x1b[2K" + line for line in lines)
        print(out, flush=True)
        self._lines = len(lines)

    def close(self) -> None:
        self._lines = 0


def _bar(name: str, done: int, submitted: int, width: int = 30) -> str:
    filled = int(width * done / submitted) if submitted else 0
    return f"  {name:6} [{'#' * filled}{'.' * (width - filled)}] {done}/{submitted}"


def _worker_line(name: str, w: dict[str, Any]) -> str:
    memory = f"{w['memory_mb']:6.1f} MB" if w["memory_mb"] is not None else "     - MB"
    browser = f" browser {w['browser']['memory_mb']:6.1f} MB" if w["browser"] else ""
    return (
        f"  {name:16} {w['state']:8} {w['completed']:6} done {w['failed']:4} failed "
        f"restarts {w['restarts']:3} {memory}{browser}"
    )


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
        if kind in ("hang", "deaf", "daemon") and not isinstance(record.error, TaskTimeoutError):
            problems.append(f"{task_id} ({kind}) ended without a TaskTimeoutError: {record.error!r}")
        if (
            kind == "cpu"
            and record.status is TaskStatus.COMPLETED
            and record.result != tasks.expected_cpu(20_000)
        ):
            problems.append(f"{task_id} returned a wrong result")
        expected = {"fork": 7, "huge": 32 << 20}.get(kind)
        got = len(record.result) if kind == "huge" and record.result is not None else record.result
        if expected is not None and record.status is TaskStatus.COMPLETED and got != expected:
            problems.append(f"{task_id} ({kind}) returned a wrong result")
        if kind == "browse" and record.status is TaskStatus.COMPLETED and record.result != tasks.TABLE_ROWS:
            problems.append(f"{task_id} saw {record.result!r} table rows, not {tasks.TABLE_ROWS}")
        if kind == "browse" and "not isolated" in str(record.error):
            problems.append(f"{task_id}: {record.error}")
    unbalanced = stats_problem(stats, len(kinds))
    return problems + ([unbalanced] if unbalanced else [])


def stats_problem(stats: dict[str, Any], submitted: int) -> str | None:
    """Invariant 4: total = submitted = pending + running + completed + failed + cancelled."""
    if stats["total_tasks"] == submitted == sum(stats[p] for p in PARTS):
        return None
    return f"stats do not add up ({submitted} submitted): {[(p, stats[p]) for p in ('total_tasks', *PARTS)]}"


def summarise(
    state: Run, records: dict[str, TaskRecord], stats: dict[str, Any], elapsed: float, pool: Any
) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    for task_id, kind in state.kinds.items():
        record = records[task_id]
        by_kind[kind][record.status.name] += 1
        if record.status is TaskStatus.COMPLETED and record.finished_at:
            latency[record.priority.name].append(record.finished_at - record.submitted_at)
    states = ["COMPLETED", "FAILED", "CANCELLED"]
    kinds = [[k, *(c[s] for s in states), sum(c.values())] for k, c in sorted(by_kind.items())]
    say("\n" + table(["kind", *states, "total"], kinds))
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
    say("\n" + table(["peak memory (USS)", "MB"], sorted(state.peak_mb.items())))
    timeouts = sum(1 for r in records.values() if isinstance(r.error, TaskTimeoutError))
    injected = ", ".join(f"{n} {what}" for what, n in state.chaos.items()) or "no faults from outside"
    say(
        f"\n{len(state.kinds)} tasks in {elapsed:.1f} s ({len(state.kinds) / elapsed:,.0f}/s), "
        f"{stats['retried_tasks']} retries, {timeouts} timeouts; {injected}"
    )
    if pool:
        say(f"session pool: {pool['total_requests']} requests, {pool['total_errors']} errors")
    return {
        "tasks": len(state.kinds),
        "seconds": elapsed,
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "latency_ms": {r[0]: {"p50": r[2], "p99": r[3], "n": r[1]} for r in rows},
        "retries": stats["retried_tasks"],
        "timeouts": timeouts,
        "chaos": dict(state.chaos),
        "peak_memory_mb": state.peak_mb,
        "session_pool": pool,
        "stats": {k: v for k, v in stats.items() if k != "workers"},
        "workers": stats["workers"],
        "timeline": state.timeline,
    }
