"""Side by side, in one run: procpool against ProcessPoolExecutor, multiprocessing.Pool, pebble and loky.

Figures are ratios from the same run on the same machine; absolute times
are noise. Every pool gets 2 workers and the fork start method.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import loky  # the compare extra: pip install procpool[compare]
import pebble

from procpool import DistributedExecutor

from . import browsers, floor, pertask, tasks
from .common import OUT, call_cost_us, conclude, percentile, say, table
from .plot import plot_ratios

WORKERS = 2
FORK = multiprocessing.get_context("fork")
HANG_TIMEOUT = 0.2  # seconds; the deadline given to tasks that never end
RATE_RUNS = 3  # runs per throughput figure, the median kept
MAP_CALLS = 10  # the map figure makes 10x --tasks calls: a run long enough to time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks",
        type=int,
        default=10_000,
        help="tiny tasks per throughput run (x10 calls in the map figure)",
    )
    parser.add_argument("--repeat", type=int, default=10, help="runs per latency figure")
    parser.add_argument("--chunksize", type=int, default=100, help="items per chunk in the map figure")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)  # the SIGKILL escalations below are expected
    results: dict[str, dict[str, Any]] = {}
    measured: list[dict[str, dict[str, float]]] = []

    def per_task() -> dict[str, dict[str, float]]:  # both per-task figures come from one run
        if not measured:
            measured.append(pertask.measure(args.tasks // 3, args.repeat * 20, 3))
        return measured[0]

    for name, measure in [
        ("throughput one by one (tasks/s)", lambda: throughput(args.tasks, batched=False)),
        ("throughput batched (tasks/s)", lambda: throughput(args.tasks, batched=True)),
        (
            f"throughput map(chunksize={args.chunksize}) (tasks/s)",
            lambda: map_throughput(args.tasks * MAP_CALLS, args.chunksize),
        ),
        ("excess time per 1 ms task (us)", lambda: pertask.by_pool(per_task(), pertask.EXCESS)),
        ("submit to start, idle pool, median (us)", lambda: pertask.by_pool(per_task(), pertask.START)),
        (
            "deadline to reported, honours SIGTERM, p99 (ms)",
            lambda: deadline_latency(tasks.hang, args.repeat),
        ),
        (
            "deadline to reported, ignores SIGTERM, p99 (ms)",
            lambda: deadline_latency(tasks.ignore_sigterm_and_hang, 3),
        ),
        ("worker death to task reported, p99 (ms)", lambda: death_latency(args.repeat, "reported")),
        ("worker death to next task done, p99 (ms)", lambda: death_latency(args.repeat, "next")),
        ("stats read with 64 workers (us)", stats_cost),
        ("browser: warm get_session, median (ms)", lambda: browser_session(args.repeat)),
        ("browser: reconnect after a worker kill, median (ms)", lambda: browser_reconnect(args.repeat)),
    ]:
        say(f"measuring {name} ...")
        results[name] = measure()
    rows = []
    ratios: dict[str, float] = {}
    for name, figures in results.items():
        ours = figures.get("procpool")
        for peer, value in figures.items():
            if peer == "procpool":
                continue
            ratio = _ratio(name, ours, value)
            rows.append([name, peer, value, ours, "-" if ratio is None else f"{ratio:.2f}x"])
            if ratio is not None:
                ratios[f"{name.split(' (')[0].split(', median')[0]} vs {peer}"] = ratio
    image = plot_ratios(ratios, OUT / "compare.png")
    if image:
        say(f"chart: {image}")
    headers = ["figure", "peer", "peer", "procpool", "procpool better by"]
    return conclude("compare", results, table(headers, rows))


def _ratio(name: str, ours: Any, peer: Any) -> float | None:
    if not isinstance(ours, float) or not isinstance(peer, float) or not ours or not peer:
        return None
    higher_is_better = "tasks/s" in name
    return ours / peer if higher_is_better else peer / ours


# -- browsers (one implementation: stress.browsers) ------------------------------


def browser_session(repeat: int) -> dict[str, Any]:
    figures = browsers.session_costs(repeat)
    return {
        "procpool": figures["session: warm get_session, median (ms)"],
        "a browser launch": figures["session: first launch, median (ms)"],
    }


def browser_reconnect(repeat: int) -> dict[str, Any]:
    figures = browsers.pinned_costs(repeat)
    return {
        "procpool": figures["pinned: reconnect after a worker kill, median (ms)"],
        "a browser launch": figures["pinned: new browser (launch + connect), median (ms)"],
    }


# -- throughput ----------------------------------------------------------------


def throughput(n: int, batched: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with DistributedExecutor(max_local_workers=WORKERS, task_timeout=60) as ex:
        ex.wait_for_tasks(ex.submit_batch([(tasks.noop,)] * 100))
        out["procpool"] = _rate(n, lambda: _procpool_run(ex, n, batched))
    with cf.ProcessPoolExecutor(WORKERS, mp_context=FORK) as ppe:
        list(ppe.map(tasks.noop_arg, range(100)))
        out["ProcessPoolExecutor"] = _rate(n, lambda: _futures_run(ppe, n, batched))
    with FORK.Pool(WORKERS) as pool:
        pool.map(tasks.noop_arg, range(100))
        out["multiprocessing.Pool"] = _rate(n, lambda: floor.pool_run(pool, n, batched))
    out.update(_optional_peers(n, batched))
    return out


def map_throughput(n: int, chunksize: int) -> dict[str, Any]:
    """``map`` of tiny calls with the same chunksize everywhere it exists."""
    out: dict[str, Any] = {}
    with DistributedExecutor(max_local_workers=WORKERS, task_timeout=60) as ex:
        list(ex.map(tasks.noop_arg, range(100)))
        out["procpool"] = _rate(n, lambda: list(ex.map(tasks.noop_arg, range(n), chunksize=chunksize)))
    with cf.ProcessPoolExecutor(WORKERS, mp_context=FORK) as ppe:
        list(ppe.map(tasks.noop_arg, range(100)))
        out["ProcessPoolExecutor"] = _rate(
            n, lambda: list(ppe.map(tasks.noop_arg, range(n), chunksize=chunksize))
        )
    with FORK.Pool(WORKERS) as pool:
        pool.map(tasks.noop_arg, range(100))
        out["multiprocessing.Pool"] = _rate(
            n, lambda: pool.map(tasks.noop_arg, range(n), chunksize=chunksize)
        )
    return out


def _procpool_run(ex: DistributedExecutor, n: int, batched: bool) -> None:
    ids = ex.submit_batch([(tasks.noop,)] * n) if batched else [ex.submit_task(tasks.noop) for _ in range(n)]
    ex.wait_for_tasks(ids, timeout=600)


def _futures_run(executor: cf.Executor, n: int, batched: bool) -> None:
    if batched:
        list(executor.map(tasks.noop_arg, range(n)))
    else:
        for future in [executor.submit(tasks.noop) for _ in range(n)]:
            future.result()


def _optional_peers(n: int, batched: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with pebble.ProcessPool(WORKERS, context=FORK) as pool:
        pool.map(tasks.noop_arg, range(100)).result()
        if batched:
            out["pebble"] = _rate(n, lambda: list(pool.map(tasks.noop_arg, range(n), timeout=60).result()))
        else:
            out["pebble"] = _rate(
                n, lambda: [f.result() for f in [pool.schedule(tasks.noop, timeout=60) for _ in range(n)]]
            )
        pool.stop()
    executor = loky.get_reusable_executor(WORKERS)
    list(executor.map(tasks.noop_arg, range(100)))
    out["loky"] = _rate(n, lambda: _futures_run(executor, n, batched))
    executor.shutdown(wait=True, kill_workers=True)
    return out


def _rate(n: int, fn: Callable[[], object]) -> float:
    """Calls per second, the median of a few runs (one run of a fast pool lasts milliseconds)."""
    times = []
    for _ in range(RATE_RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


# -- deadlines -----------------------------------------------------------------


def deadline_latency(fn: Callable[[], None], repeat: int) -> dict[str, Any]:
    """From the task's deadline (submission + timeout, on an idle pool) to its future being done."""
    out: dict[str, Any] = {}
    with DistributedExecutor(max_local_workers=WORKERS, max_retries=0) as ex:
        samples = []
        for _ in range(repeat):
            start = time.monotonic()
            future = ex.future(ex.submit_task(fn, timeout=HANG_TIMEOUT))
            samples.append(_wait_done(future) - start - HANG_TIMEOUT)
        out["procpool"] = _p99_ms(samples)
    with pebble.ProcessPool(WORKERS, context=FORK) as pool:
        samples = []
        for _ in range(repeat):
            start = time.monotonic()
            future = pool.schedule(fn, timeout=HANG_TIMEOUT)
            samples.append(_wait_done(future) - start - HANG_TIMEOUT)
        out["pebble"] = _p99_ms(samples)
        pool.stop()
    for peer in ("ProcessPoolExecutor", "multiprocessing.Pool", "loky"):
        out[peer] = "no per-task timeout"
    return out


def _wait_done(future: cf.Future[Any]) -> float:
    done: list[float] = []
    future.add_done_callback(lambda _: done.append(time.monotonic()))
    try:
        future.result(timeout=30)
    except BaseException:  # noqa: BLE001 - the timeout error is what we wait for
        pass
    return done[0]


def _p99_ms(samples: list[float]) -> float:
    return 1000 * percentile(sorted(samples), 99)


# -- worker deaths -------------------------------------------------------------


def death_latency(repeat: int, until: str) -> dict[str, Any]:
    """From a worker's SIGKILL (time written by its task) to the failure reported, or the next task done."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "died")
        with DistributedExecutor(max_local_workers=WORKERS, max_retries=0) as ex:
            samples = []
            for _ in range(repeat):
                doomed = ex.submit(tasks.kill_self_at, marker)
                after = ex.submit(tasks.noop)
                samples.append(_death_sample(doomed, after, marker, until))
            out["procpool"] = _p99_ms(samples)
        out.update(_peer_deaths(marker, repeat, until))
    return out


def _death_sample(doomed: cf.Future[Any], after: cf.Future[Any] | None, marker: str, until: str) -> float:
    reported = _wait_done(doomed)
    with open(marker) as f:
        died = float(f.read())
    if until == "reported" or after is None:
        return reported - died
    return _wait_done(after) - died


def _peer_deaths(marker: str, repeat: int, until: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with pebble.ProcessPool(WORKERS, context=FORK) as pool:
        samples = []
        for _ in range(repeat):
            doomed = pool.schedule(tasks.kill_self_at, (marker,))
            samples.append(_death_sample(doomed, pool.schedule(tasks.noop), marker, until))
        out["pebble"] = _p99_ms(samples)
        pool.stop()
    samples = []
    for _ in range(repeat):  # a broken ProcessPoolExecutor must be replaced to run the next task
        ppe = cf.ProcessPoolExecutor(WORKERS, mp_context=FORK)
        doomed = ppe.submit(tasks.kill_self_at, marker)
        reported = _wait_done(doomed)
        ppe.shutdown(wait=True)
        if until == "next":
            with cf.ProcessPoolExecutor(WORKERS, mp_context=FORK) as fresh:
                reported = _wait_done(fresh.submit(tasks.noop))
        with open(marker) as f:
            samples.append(reported - float(f.read()))
    out["ProcessPoolExecutor"] = _p99_ms(samples)
    out["multiprocessing.Pool"] = "never (the caller hangs)"
    out["loky"] = "breaks the whole executor"
    return out


# -- stats ---------------------------------------------------------------------


def stats_cost() -> dict[str, Any]:
    """get_stats() with 64 workers, against one call on a Manager proxy."""
    calls = 2000
    with DistributedExecutor(max_local_workers=64) as ex:
        ours = call_cost_us(ex.get_stats, calls)
        stats = ex.get_stats()
        assert stats["total_workers"] == 64 and stats["pending_tasks"] == 0
    with FORK.Manager() as manager:
        shared = manager.dict(x=1)
        proxy = call_cost_us(lambda: shared.get("x"), calls)
    return {"procpool": ours, "one Manager proxy call": proxy}
