"""What a task costs beyond its own work, side by side: procpool, ProcessPoolExecutor, multiprocessing.Pool,
pebble and loky, 2 workers each, fork.

- excess per 1 ms task: tasks that each burn 1 ms of CPU, submitted at once;
  wall time / tasks - 1 ms / workers (efficiency = 0.5 ms / (0.5 ms + excess)).
  On a 2-core machine every microsecond the pool spends in its caller or
  helper processes is taken from the workers.
- submit -> start: on an idle warm pool, from before the submit call to the
  task's first line (``time.monotonic`` is one clock for all processes), median.
- CPU per task, per process (procpool only): psutil CPU times of the caller,
  the manager and the workers over a run of no-op tasks.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from procpool import DistributedExecutor

from . import tasks
from .common import conclude, say, table

WORKERS = 2
FORK = multiprocessing.get_context("fork")
SPIN_MS = 1.0
CPU_TASKS_MIN = 10_000  # CPU times count in 10 ms ticks: a worker needs well over one of them
EXCESS = "excess per 1 ms task (us)"
START = "submit -> start, median (us)"

Submit = Callable[..., Callable[[], Any]]  # submit(fn, *args) -> a function that waits for the result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=4000, help="1 ms tasks per excess run")
    parser.add_argument("--starts", type=int, default=300, help="samples of submit -> start")
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure (the median is kept)")


def run(args: argparse.Namespace) -> int:
    figures = measure(args.tasks, args.starts, args.rounds)
    say("measuring procpool's CPU per task ...")
    cpu = cpu_per_task(max(args.tasks * 5, CPU_TASKS_MIN))
    rows = [[name, f[EXCESS], f[START]] for name, f in figures.items()]
    shown = table(["pool", EXCESS, START], rows)
    shown += "\n\nprocpool CPU per no-op task (us)\n" + table(["process", "us"], list(cpu.items()))
    return conclude("pertask", {"pools": figures, "procpool cpu per task (us)": cpu}, shown)


def measure(n: int, starts: int, rounds: int) -> dict[str, dict[str, float]]:
    """Both figures for every pool: {pool: {figure: value}}."""
    figures: dict[str, dict[str, float]] = {}
    for name, pool in POOLS.items():
        say(f"  {name} ...")
        with pool() as submit:
            figures[name] = {
                EXCESS: _median(rounds, lambda: excess_us(submit, n)),
                START: _median(rounds, lambda: start_us(submit, starts)),
            }
    return figures


def by_pool(figures: dict[str, dict[str, float]], figure: str) -> dict[str, Any]:
    """One figure of ``measure``'s, as {pool: value}."""
    return {name: values[figure] for name, values in figures.items()}


def _median(rounds: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(rounds))


def excess_us(submit: Submit, n: int) -> float:
    for wait in [submit(tasks.spin, SPIN_MS) for _ in range(20)]:
        wait()
    start = time.perf_counter()
    waits = [submit(tasks.spin, SPIN_MS) for _ in range(n)]
    for wait in waits:
        wait()
    wall = time.perf_counter() - start
    return (wall / n - SPIN_MS / 1000 / WORKERS) * 1e6


def start_us(submit: Submit, n: int) -> float:
    samples = []
    for _ in range(n):
        time.sleep(0.002)  # idle again: both workers wait for work
        before = time.monotonic()
        began = submit(tasks.started_at)()
        samples.append(began - before)
    return statistics.median(samples) * 1e6


# -- the pools, each as "submit one call, get a waiter" ----------------------------------


@contextmanager
def procpool() -> Iterator[Submit]:
    with DistributedExecutor(max_local_workers=WORKERS, task_timeout=60) as ex:
        yield lambda fn, *args: ex.submit(fn, *args).result


@contextmanager
def process_pool_executor() -> Iterator[Submit]:
    with cf.ProcessPoolExecutor(WORKERS, mp_context=FORK) as ppe:
        yield lambda fn, *args: ppe.submit(fn, *args).result


@contextmanager
def mp_pool() -> Iterator[Submit]:
    with FORK.Pool(WORKERS) as pool:
        yield lambda fn, *args: pool.apply_async(fn, args).get


@contextmanager
def pebble_pool() -> Iterator[Submit]:
    import pebble

    with pebble.ProcessPool(WORKERS, context=FORK) as pool:
        yield lambda fn, *args: pool.schedule(fn, args, timeout=60).result
        pool.stop()


@contextmanager
def loky_pool() -> Iterator[Submit]:
    import loky

    executor = loky.get_reusable_executor(WORKERS)
    try:
        yield lambda fn, *args: executor.submit(fn, *args).result
    finally:
        executor.shutdown(wait=True, kill_workers=True)


POOLS: dict[str, Callable[[], Any]] = {
    "procpool": procpool,
    "ProcessPoolExecutor": process_pool_executor,
    "multiprocessing.Pool": mp_pool,
    "pebble": pebble_pool,
    "loky": loky_pool,
}


def cpu_per_task(n: int) -> dict[str, float]:
    """CPU microseconds per no-op task in each of procpool's processes (one by one, then waited for)."""
    with DistributedExecutor(max_local_workers=WORKERS, task_timeout=60) as ex:
        ex.wait_for_tasks(ex.submit_batch([(tasks.noop,)] * 200))
        me = psutil.Process()
        manager = psutil.Process(ex._supervisor.manager._process.pid)  # type: ignore[union-attr]
        workers = [psutil.Process(w["pid"]) for w in ex.get_stats()["workers"].values()]
        procs = {"caller": [me], "manager": [manager], "workers (together)": workers}
        before = {name: _cpu(ps) for name, ps in procs.items()}
        ex.wait_for_tasks([ex.submit_task(tasks.noop) for _ in range(n)], timeout=600)
        return {name: (_cpu(ps) - before[name]) / n * 1e6 for name, ps in procs.items()}


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total
