"""Chaos: tasks flow while workers and browsers are SIGKILLed and SIGSTOPped at random.

    submitter (this thread) ── CPU tasks at every priority, browser fan-outs ──▶ DistributedExecutor
    chaos (this thread, every --every s) ── SIGKILL / SIGSTOP ──▶ a random worker or pinned browser
                                         ── and with --remote: a remote agent, or a whole host down
    checks, continuously ── stats add up, nothing submitted goes missing
    checks, at the end ── every task ended exactly once, nothing left behind

A stopped worker is found by its missing heartbeat and replaced; a stopped
browser by the next task that cannot reach it; a stopped agent by its silent
connection. A host taken down comes back after a few seconds. Exits 1 on any
broken invariant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import cloudpickle
import psutil

from procpool import DistributedExecutor, TaskPriority

from . import sshd, tasks
from .common import add_run_arguments, leftovers, say, table, write_report
from .demo import KINDS, Run, browsers_for, check, fanout, signal_random, stats_problem

BACKLOG = 20  # queued tasks per worker at most
FAULTS = {  # name -> (signal, sent to a browser rather than a worker)
    "worker SIGKILL": (signal.SIGKILL, False),
    "worker SIGSTOP": (signal.SIGSTOP, False),
    "browser SIGKILL": (signal.SIGKILL, True),
    "browser SIGSTOP": (signal.SIGSTOP, True),
}
REMOTE_FAULTS = {"agent SIGKILL": signal.SIGKILL, "agent SIGSTOP": signal.SIGSTOP, "host down": None}
MANAGER_FREEZE = 0.5  # seconds the manager process stays stopped when chaos freezes it
HOSTILE = ("daemon", "fork", "huge")  # tasks that detach daemons, fork the worker, send 32 MB back
HOSTILE_RATE = 0.03  # share of submissions that are hostile tasks
HOST_DOWN = 3.0  # seconds a host taken down stays down


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, duration=30.0, workers=3, what="chaos")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between faults (default 1)")
    parser.add_argument(
        "--remote", type=int, default=0, metavar="HOSTS",
        help="also HOSTS sshd hosts on 127.0.0.1 of 2 slots each, faulted too (root, openssh-server)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.CRITICAL)  # every fault here is on purpose
    args.accounts = 2
    if args.remote:  # the hosts need not have stress/ (it is not installed): its tasks travel by value
        cloudpickle.register_pickle_by_value(tasks)
    state = Run(args, random.Random(args.seed))
    state.pid_dir = tempfile.mkdtemp(prefix="procpool-chaos-")
    site, options = browsers_for(args)
    broken: list[str] = []
    frozen: list[psutil.Process] = []  # agents stopped on purpose
    try:
        with (
            sshd.loopback_hosts(args.remote) as hosts,
            DistributedExecutor(
                max_local_workers=args.workers,
                task_timeout=20,
                max_retries=3,
                kill_grace=0.3,
                heartbeat_timeout=2.0,
                enable_remote=bool(hosts),
                max_finished_tasks=None,
                **options,
            ) as ex,
        ):  # fmt: skip  (every record is checked at the end)
            for event in ("task_complete", "task_failed", "task_cancelled"):
                ex.register_callback(event, state.count)
            for host in hosts:
                ex.add_remote_worker(**host.options(), slots=2, heartbeat_timeout=2.0, reconnect_max=1.0)
            state.site = site.url if site else ""
            broken += storm(ex, state, hosts, frozen)
            say("chaos over; waiting for the last tasks")
            ex.wait_for_tasks(list(state.kinds), timeout=180)
            ex.shutdown()
            broken += thaw(frozen)
            stats = ex.get_stats()
            records = {task_id: ex.get_task(task_id) for task_id in state.kinds}
    finally:
        if site is not None:
            site.close()
        thaw(frozen)  # again, if the run broke off: a stopped orphan would wait for ever
    problems = broken + check(state.kinds, records, state.terminal, stats) + escaped(state)
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


def submit_one(ex: DistributedExecutor, state: Run) -> None:
    """A CPU task, or now and then a hostile one."""
    if state.rng.random() >= HOSTILE_RATE:
        state.submit(ex, "cpu")
        return
    kind = state.rng.choice(HOSTILE)
    fn, fn_args, timeout, _ = KINDS[kind]
    if kind == "daemon":
        fn_args = (state.pid_dir,)
    priority = state.rng.choice(list(TaskPriority))
    state.add([ex.submit_task(fn, fn_args, priority=priority, timeout=timeout)], kind, priority)
    state.chaos[f"hostile task: {kind}"] += 1


def escaped(state: Run) -> list[str]:
    """Daemons that hostile tasks left and that outlived them (each wrote its pid)."""
    problems = []
    folder = Path(state.pid_dir)
    for path in folder.iterdir():
        pid = int(path.name)
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if alive:
            problems.append(f"daemon {pid} started by a task outlived it")
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)
    return problems


def storm(
    ex: DistributedExecutor, state: Run, hosts: list[sshd.SSHServer], frozen: list[psutil.Process]
) -> list[str]:
    """Keep tasks flowing and inject a fault every ``--every`` seconds; returns broken invariants."""
    args, rng = state.args, state.rng
    faults = sorted(name for name, (_, browser) in FAULTS.items() if state.site or not browser)
    faults += sorted(REMOTE_FAULTS) if hosts else []
    faults.append("manager SIGSTOP")
    manager = ex._supervisor.manager._process.pid  # type: ignore[union-attr]
    thaw_at = 0.0
    down: dict[sshd.SSHServer, float] = {}  # host -> when it comes back
    end = time.monotonic() + args.duration
    next_fault = next_fanout = time.monotonic() + 1.0
    broken: list[str] = []
    try:
        while (now := time.monotonic()) < end:
            stats = ex.get_stats()
            unbalanced = stats_problem(stats, len(state.kinds))
            if unbalanced:
                broken.append(f"at {now - end + args.duration:.1f} s: {unbalanced}")
            if stats["pending_tasks"] < BACKLOG * args.workers:
                submit_one(ex, state)
            else:
                time.sleep(0.005)
            if thaw_at and now >= thaw_at:
                os.kill(manager, signal.SIGCONT)
                thaw_at = 0.0
            if state.site and now >= next_fanout:
                fanout(ex, state)
                next_fanout = now + 2.0
            for host, back in list(down.items()):
                if now >= back:
                    host.start()
                    del down[host]
            if now >= next_fault:
                name = rng.choice(faults)
                if name == "manager SIGSTOP":
                    if not thaw_at:  # not while it is stopped already
                        os.kill(manager, signal.SIGSTOP)
                        thaw_at = now + MANAGER_FREEZE
                        state.chaos[name] += 1
                elif name in REMOTE_FAULTS:
                    state.chaos[name] += fault_host(hosts, down, rng, REMOTE_FAULTS[name], now, frozen)
                else:
                    signum, browser = FAULTS[name]
                    state.chaos[name] += signal_random(stats, rng, signum, browser)
                next_fault = now + args.every
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(manager, signal.SIGCONT)  # never left stopped, even if the storm broke off
    for host in down:
        host.start()  # so the pool ends with every host up
    return broken[:10]


def fault_host(
    hosts: list[sshd.SSHServer], down: dict[sshd.SSHServer, float], rng: random.Random,
    signum: int | None, now: float, frozen: list[psutil.Process],
) -> int:  # fmt: skip
    """Signal a random remote agent, or take a host down (``signum`` None); 1 if done."""
    up = [h for h in hosts if h not in down]
    if not up:
        return 0
    host = rng.choice(up)
    if signum is None:
        host.kill()
        down[host] = now + HOST_DOWN
        return 1
    agents = host.agents()
    if not agents:
        return 0
    agent = rng.choice(agents)
    try:
        agent.send_signal(signum)
    except psutil.NoSuchProcess:
        return 0
    if signum == signal.SIGSTOP:
        frozen.append(agent)
    return 1


def thaw(frozen: list[psutil.Process]) -> list[str]:
    """Continue the agents stopped on purpose: each must find its connection gone and end.

    Their sshd sessions ended meanwhile, so they belong to init now: no leak check would see them.
    """
    for agent in frozen:
        try:
            agent.send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(frozen, timeout=10)
    return [f"a remote agent (pid {p.pid}) stopped on purpose did not end once continued" for p in alive]
