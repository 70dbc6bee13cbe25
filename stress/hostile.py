"""Hostile: deadlines kept while the world misbehaves, deaths seen through live children, memory per task.

    stressor (one worker, or the manager) ── a frozen sender, huge results, a slow unpickle,
                                             a task holding the GIL, the manager SIGSTOPped
    probe (another worker) ── a task that records when it began, then hangs to its deadline
    lateness = probe's future done - (its start + timeout), p99 over --rounds per stressor

Big results are collected as they come and not kept (``max_finished_tasks=0``): a
caller that keeps gigabytes of results pays for it at every fork of a new worker
(its page tables are copied with the GIL held; start_method="forkserver" avoids it).

Then: a worker SIGKILLed while a daemon it left holds its fds (kill -> task reported),
and the caller's memory per finished task over --tasks no-op tasks whose results are
collected and dropped. Exit 1 on a p99 past --limit-ms, a GIL task run twice, growth
past --max-bytes per task, or anything left behind.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from procpool import DistributedExecutor

from . import tasks
from .common import conclude, figure_table, percentile, say

PROBE_TIMEOUT = 0.5  # seconds: the probe's deadline
HUGE_MB = 300
UNPICKLE_SECONDS = 6.0
GIL_SECONDS = 8.0
BATCH = 10_000  # no-op tasks per batch in the memory run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="deadline probes per stressor (default 10)")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks in the memory run (default 100k)")
    parser.add_argument("--limit-ms", type=float, default=50.0, help="p99 lateness allowed (default 50 ms)")
    parser.add_argument("--max-bytes", type=float, default=200.0, help="caller growth allowed per task")


def run(args: argparse.Namespace) -> int:
    figures: dict[str, Any] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="procpool-hostile-") as tmp:
        for name, stressor in STRESSORS.items():
            gc.collect()  # the last stressor's pool and its results: each starts from a lean caller
            say(f"deadlines while {name} ...")
            p99 = 1000 * percentile(sorted(stressor(args.rounds, tmp)), 99)
            figures[f"deadline to reported, {name}, p99 (ms)"] = round(p99, 1)
            if p99 > args.limit_ms:
                problems.append(f"a deadline was reported {p99:.0f} ms late (p99) while {name}")
        say("worker deaths with a live daemon holding their fds ...")
        figures["worker death to task reported, a daemon holds its fds, p99 (ms)"] = death_with_child(
            args.rounds, tmp
        )
    gil_runs = gil_task_runs()
    figures["runs of one task holding the GIL 8 s (heartbeat_timeout 3 s)"] = gil_runs
    if gil_runs != 1:
        problems.append(f"a task busy in one C call ran {gil_runs} times: taken for hung")
    say(f"memory over {args.tasks} finished tasks ...")
    memory = memory_per_task(args.tasks)
    figures.update(memory)
    per_task = memory["caller growth per finished task, second half (bytes)"]
    if per_task > args.max_bytes:
        problems.append(f"the caller grew {per_task:.0f} bytes per finished task")
    for problem in problems:
        say(f"PROBLEM: {problem}")
    return conclude("hostile", figures, figure_table(figures)) or int(bool(problems))


# -- deadline probes ---------------------------------------------------------------


def probe(ex: DistributedExecutor, tmp: str, i: int, during: Callable[[], None] | None = None) -> float:
    """Seconds from a hung task's deadline (from its own start) to its future being done."""
    marker = os.path.join(tmp, f"probe-{i}")
    future = ex.future(ex.submit_task(tasks.hang_marked, (marker,), timeout=PROBE_TIMEOUT))
    done: list[float] = []
    future.add_done_callback(lambda _: done.append(time.time()))
    while not os.path.exists(marker):
        time.sleep(0.001)
    if during is not None:
        during()
    try:
        future.result(timeout=60)
    except TimeoutError:
        pass
    while not done:  # done callbacks run on a lane of their own
        time.sleep(0.001)
    with open(marker) as f:
        began = float(f.read())
    os.unlink(marker)
    return done[0] - began - PROBE_TIMEOUT


def quiet(rounds: int, tmp: str) -> list[float]:
    with DistributedExecutor(max_local_workers=2, max_retries=0, kill_grace=0.2) as ex:
        return [probe(ex, tmp, i) for i in range(rounds)]


def frozen_sender(rounds: int, tmp: str) -> list[float]:
    """Each round: a worker stopped (SIGSTOP) while it sends a 300 MB result."""
    samples = []
    with DistributedExecutor(
        max_local_workers=2, max_retries=0, kill_grace=0.2, heartbeat_timeout=30, max_finished_tasks=0
    ) as ex:
        for i in range(rounds):
            big = ex.submit_task(tasks.huge, (HUGE_MB,), timeout=120)
            while ex.get_task(big).worker is None:
                time.sleep(0.001)
            name = ex.get_task(big).worker
            slot = ex.get_stats()["workers"][name]
            while ex.get_stats()["workers"][name]["completed"] == slot["completed"]:  # counted before sending
                time.sleep(0.001)
            os.kill(slot["pid"], signal.SIGSTOP)
            try:
                samples.append(probe(ex, tmp, i))
            finally:
                os.kill(slot["pid"], signal.SIGCONT)
            ex.wait_for_tasks([big], timeout=120)
    return samples


def flowing(fn: Callable[..., object], args: tuple[Any, ...]) -> Callable[[int, str], list[float]]:
    """Probes while a stream of ``fn(*args)`` tasks keeps the other worker busy.

    Their results are collected as they come and not kept after (``max_finished_tasks=0``),
    as a service that streams big results would run it.
    """

    def stressor(rounds: int, tmp: str) -> list[float]:
        with DistributedExecutor(
            max_local_workers=2, max_retries=0, kill_grace=0.2, max_finished_tasks=0
        ) as ex:
            load = [ex.submit_task(fn, args, timeout=120) for _ in range(2)]
            samples = []
            for i in range(rounds):
                samples.append(probe(ex, tmp, i))
                finished = [t for t in load if ex.get_task(t).done]
                ex.wait_for_tasks(finished, timeout=10)  # collected, as a user would: let go of
                load = [t for t in load if t not in finished] + [ex.submit_task(fn, args, timeout=120)]
            ex.wait_for_tasks(load, timeout=300)
            return samples

    return stressor


def frozen_manager(rounds: int, tmp: str) -> list[float]:
    """Each round: the probe has started, then the manager process is SIGSTOPped until it is reported."""
    samples = []
    with DistributedExecutor(max_local_workers=2, max_retries=0, kill_grace=0.2) as ex:
        manager = ex._supervisor.manager._process.pid  # type: ignore[union-attr]
        for i in range(rounds):
            with stopped(manager):
                samples.append(probe(ex, tmp, i, during=lambda: os.kill(manager, signal.SIGSTOP)))
    return samples


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


STRESSORS: dict[str, Callable[[int, str], list[float]]] = {
    "nothing else happens": quiet,
    "a worker is frozen mid-result (300 MB)": frozen_sender,
    f"{HUGE_MB} MB results flow": flowing(tasks.huge, (HUGE_MB,)),
    f"results take {UNPICKLE_SECONDS:g} s to unpickle": flowing(tasks.slow_to_unpickle, (UNPICKLE_SECONDS,)),
    f"tasks hold the GIL {GIL_SECONDS:g} s": flowing(tasks.hold_gil, (GIL_SECONDS,)),
    "the manager is frozen (SIGSTOP)": frozen_manager,
}


# -- deaths, busy tasks, memory --------------------------------------------------------


def death_with_child(rounds: int, tmp: str) -> float:
    """From a worker's SIGKILL, while a daemon it left holds its fds, to its task's failure reported."""
    samples = []
    marker = os.path.join(tmp, "died")
    with DistributedExecutor(max_local_workers=2, max_retries=0, heartbeat_timeout=30) as ex:
        for i in range(rounds):
            pid_dir = os.path.join(tmp, f"daemon-{i}")
            os.mkdir(pid_dir)
            future = ex.submit(tasks.daemon_then_die_at, pid_dir, marker)
            done: list[float] = []
            future.add_done_callback(lambda _, done=done: done.append(time.monotonic()))
            try:
                future.result(timeout=60)
            except Exception:  # noqa: BLE001 - the WorkerLostError is what we wait for
                pass
            while not done:
                time.sleep(0.001)
            with open(marker) as f:
                samples.append(done[0] - float(f.read()))
    return round(1000 * percentile(sorted(samples), 99), 1)


def gil_task_runs() -> int:
    """How many times a task that holds the GIL for 8 s is started, with heartbeat_timeout=3."""
    with DistributedExecutor(max_local_workers=1, heartbeat_timeout=3.0, max_retries=2) as ex:
        task_id = ex.submit_task(tasks.hold_gil, (GIL_SECONDS,), timeout=120)
        ex.wait_for_tasks([task_id], timeout=120)
        return ex.get_task(task_id).attempts


def memory_per_task(total: int) -> dict[str, Any]:
    """The caller's USS as batches of no-op tasks finish, their results collected and dropped."""
    me = psutil.Process()
    uss: list[float] = []
    with DistributedExecutor(max_local_workers=2) as ex:
        done = 0
        while done < total:
            n = min(BATCH, total - done)
            ids = ex.submit_batch([(tasks.noop, ())] * n)
            ex.wait_for_tasks(ids, timeout=300)
            del ids
            done += n
            uss.append(me.memory_full_info().uss)
        kept = ex.get_stats()["total_tasks"], len(ex._tasks)
    half = len(uss) // 2
    per_task = (uss[-1] - uss[half - 1]) / max(1, total - half * BATCH) if half else float("nan")
    return {
        "tasks finished": kept[0],
        "records kept at the end": kept[1],
        "caller USS after the first batch (MB)": round(uss[0] / 2**20, 1),
        "caller USS at the end (MB)": round(uss[-1] / 2**20, 1),
        "caller growth per finished task, second half (bytes)": round(per_task, 1),
    }
