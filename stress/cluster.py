"""Cluster: tasks flow through PostgreSQL to several hosts while hosts and the database fail.

    submitter (this process) ── submit_batch at every priority ──▶ PostgreSQL (throwaway server)
    hosts (python -m procpool host, subprocesses) ── claim for idle slots, finish (fenced)
    chaos (every --every s) ── a host SIGKILLed (a new one starts), a host SIGSTOPped for
                               2 leases, or the database restarted
    checks, at the end ── every task ended exactly once, with its own result; nothing left behind

First, with no faults, no-op tasks measure claims+finishes per second and
submit -> start latency on the cluster, beside the local pool with the same
number of slots. Exits 1 on any broken invariant.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from procpool import DistributedExecutor, TaskPriority, TaskStatus

from . import pg, tasks
from .common import leftovers, say, table, write_report

ROOT = Path(__file__).resolve().parents[1]
LEASE = 1.0  # seconds: faults are noticed within about a lease
BACKLOG = 40  # queued tasks at most while faults fly
FAULTS = ("host SIGKILL", "host SIGSTOP", "database restart")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of faults (default 20)")
    parser.add_argument("--hosts", type=int, default=3, help="host processes (default 3)")
    parser.add_argument("--slots", type=int, default=2, help="slots per host (default 2)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between faults (default 2)")
    parser.add_argument(
        "--min-faults", type=int, default=0, help="faults injected at least, past --duration if need be"
    )
    parser.add_argument("--tasks", type=int, default=2000, help="no-op tasks for the figures (default 2000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")


class Hosts:
    """The host processes, by name; a killed one is replaced by a new name."""

    def __init__(self, dsn: str, slots: int) -> None:
        self.dsn, self.slots = dsn, slots
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self._count = 0

    def start(self) -> str:
        name = f"host-{self._count}"
        self._count += 1
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", "procpool", "host", "--queue", self.dsn, "--slots", str(self.slots),
             "--lease", str(LEASE), "--name", name],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return name

    def close(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
        for process in self.running.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.CRITICAL)
    if not pg.available():
        say("PostgreSQL is not installed (apt-get install postgresql)")
        return 1
    rng = random.Random(args.seed)
    problems: list[str] = []
    with pg.Server("procpool-cluster-") as server:
        hosts = Hosts(server.dsn, args.slots)
        try:
            for _ in range(args.hosts):
                hosts.start()
            with DistributedExecutor(max_local_workers=0, queue=server.dsn, max_retries=8) as ex:
                cluster = figures(ex, args.tasks)
                faults, expected, problems = storm(ex, hosts, server, args, rng)
        finally:
            hosts.close()
    local = local_figures(args.hosts * args.slots, args.tasks)
    problems += [f"left behind: {item}" for item in leftovers()]
    say("\n" + table(["figure", "cluster", "local pool"], [
        ["slots", args.hosts * args.slots, args.hosts * args.slots],
        ["no-op tasks/s (claims + finishes)", cluster["tasks_per_s"], local["tasks_per_s"]],
        ["submit -> start median, ms", cluster["start_ms"], local["start_ms"]],
        ["submit -> start p99, ms", cluster["start_p99_ms"], local["start_p99_ms"]],
    ]))  # fmt: skip
    say("\n" + table(["fault injected", "count"], sorted(faults.items())))
    report = {
        "cluster": cluster,
        "local": local,
        "faults": dict(faults),
        "tasks": expected,
        "problems": problems,
    }
    say(f"report: {write_report('cluster', report)}")
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say(
        "FAILED"
        if problems
        else f"OK: {expected} tasks through {sum(faults.values())} faults; each ended once"
    )
    return 1 if problems else 0


def figures(ex: DistributedExecutor, count: int) -> dict[str, float]:
    """Throughput and submit -> start of ``count`` no-op tasks on a quiet pool."""
    begin = time.perf_counter()
    ids = ex.submit_batch([(tasks.noop, ()) for _ in range(count)])
    ex.wait_for_tasks(ids, timeout=300)
    elapsed = time.perf_counter() - begin
    single = []
    for _ in range(50):  # one at a time on an idle pool: the latency a lone task sees
        record = ex.get_task(ex.submit_task(tasks.noop))
        ex.get_task_result(record.task_id, timeout=30)
        record = ex.get_task(record.task_id)
        assert record.started_at is not None
        single.append((record.started_at - record.submitted_at) * 1000)
    return _figures(count / elapsed, single)


def local_figures(slots: int, count: int) -> dict[str, float]:
    with DistributedExecutor(max_local_workers=slots) as ex:
        return figures(ex, count)


def _figures(rate: float, single: list[float]) -> dict[str, float]:
    single.sort()
    return {
        "tasks_per_s": round(rate),
        "start_ms": round(statistics.median(single), 2),
        "start_p99_ms": round(single[min(len(single) - 1, int(len(single) * 0.99))], 2),
    }


def storm(
    ex: DistributedExecutor, hosts: Hosts, server: pg.Server, args: argparse.Namespace, rng: random.Random
) -> tuple[Counter[str], int, list[str]]:
    """Submit while faults fly; then check every task ended once with its own result."""
    ended: Counter[str] = Counter()
    for event in ("task_complete", "task_failed", "task_cancelled"):
        ex.register_callback(event, lambda record: ended.update([record.task_id]))
    keys: dict[str, int] = {}
    faults: Counter[str] = Counter()
    frozen: list[tuple[float, subprocess.Popen[bytes]]] = []
    end = time.monotonic() + args.duration
    next_fault = time.monotonic() + args.every
    while time.monotonic() < end or sum(faults.values()) < args.min_faults:
        pending = ex.get_stats()["pending_tasks"]
        if pending < BACKLOG:
            priority = rng.choice(list(TaskPriority))
            batch = [(len(keys) + i, rng.uniform(1, 30)) for i in range(10)]
            try:
                ids = ex.submit_batch([(tasks.cluster_job, b) for b in batch], priority=priority)
            except ConnectionError:
                time.sleep(0.1)  # the database is restarting: nothing was queued, try again
                continue
            keys.update(zip(ids, (key for key, _ in batch), strict=True))
        for thawed in [f for f in frozen if f[0] <= time.monotonic()]:
            os.kill(thawed[1].pid, signal.SIGCONT)
            frozen.remove(thawed)
        if time.monotonic() >= next_fault:
            faults[fault(rng, hosts, server, frozen)] += 1
            next_fault = time.monotonic() + args.every
        time.sleep(0.02)
    for _, process in frozen:
        os.kill(process.pid, signal.SIGCONT)
    say(f"faults over; waiting for {len(keys)} tasks")
    results = ex.wait_for_tasks(list(keys), timeout=300)
    problems = [
        f"{task_id}: {result!r} instead of {key}"
        for (task_id, key), result in zip(keys.items(), results, strict=True)
        if result != key
    ]
    records = [ex.get_task(task_id) for task_id in keys]
    problems += [f"{r.task_id} ended {r.status}" for r in records if r.status is not TaskStatus.COMPLETED]
    deadline = time.monotonic() + 10
    while sum(ended.values()) < len(keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    problems += [f"{task_id} reported {ended[task_id]} times" for task_id in keys if ended[task_id] != 1]
    retried = sum(1 for r in records if r.attempts > 1)
    say(f"{len(keys)} tasks, {retried} ran more than one attempt (lost hosts' tasks), all checked")
    return faults, len(keys), problems


def fault(rng: random.Random, hosts: Hosts, server: pg.Server, frozen: list[Any]) -> str:
    busy = {p.pid for _, p in frozen}
    alive = [n for n, p in hosts.running.items() if p.poll() is None and p.pid not in busy]
    kind = rng.choice(FAULTS) if len(alive) >= 2 else "database restart"  # keep one host serving
    if kind == "database restart":
        server.stop("fast")
        time.sleep(0.5)
        server.start()
        return kind
    name = rng.choice(alive)
    process = hosts.running[name]
    if kind == "host SIGKILL":
        process.kill()
        process.wait()
        hosts.start()
    else:
        os.kill(process.pid, signal.SIGSTOP)
        frozen.append((time.monotonic() + 2 * LEASE, process))
    return kind
