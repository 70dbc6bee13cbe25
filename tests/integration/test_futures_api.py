"""The concurrent.futures side of the executor, as a ProcessPoolExecutor user writes it."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import faults
import pytest
from conftest import wait_until

from procpool import BrokenPoolError, DistributedExecutor, TaskStatus

START_METHODS = ["fork", "forkserver", "spawn"]


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_raising_callable_runs_once_under_submit_and_retries_under_submit_task(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    executor = make_executor(max_retries=3)
    once, retried = tmp_path / "once", tmp_path / "retried"
    once.mkdir()
    retried.mkdir()
    with pytest.raises(RuntimeError, match="fails on purpose"):
        executor.submit(faults.fail_until, str(once), 10).result(timeout=20)
    assert len(list(once.iterdir())) == 1
    task_id = executor.submit_task(faults.fail_until, (str(retried), 10))
    with pytest.raises(RuntimeError):
        executor.get_task_result(task_id, timeout=20)
    assert len(list(retried.iterdir())) == 4  # the first run and max_retries more


def test_a_worker_death_under_submit_is_still_retried(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    executor = make_executor(max_retries=2)
    assert executor.submit(faults.die_until, str(tmp_path), 1).result(timeout=20) == "ok after 1"


def test_map_ships_chunks_and_keeps_order(make_executor: Callable[..., DistributedExecutor]) -> None:
    executor = make_executor()
    assert list(executor.map(faults.double, range(100), chunksize=7)) == [2 * i for i in range(100)]
    assert executor.get_stats()["total_tasks"] == 15  # ceil(100 / 7) tasks, not 100
    assert list(executor.map(pow, range(5), range(5))) == [pow(i, i) for i in range(5)]
    assert executor.get_stats()["total_tasks"] == 20
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(faults.double, range(3), chunksize=0)


def test_chunked_map_calls_as_the_builtin_map_does(make_executor: Callable[..., DistributedExecutor]) -> None:
    executor = make_executor()
    pairs = [(1, 2), (3,), (), (4, 5, 6), (7,)]
    # One iterable of tuples: each tuple is one argument, never spread.
    assert list(executor.map(len, pairs, chunksize=2)) == list(map(len, pairs))
    # Several iterables, one shorter (and one a generator): calls stop at the shortest.
    tens = (10 * i for i in range(1, 9))
    got = list(executor.map(divmod, tens, [3, 4, 6, 7, 9, 11, 13], chunksize=3))
    assert got == list(map(divmod, (10 * i for i in range(1, 9)), [3, 4, 6, 7, 9, 11, 13]))
    assert list(executor.map(divmod, [], [1], chunksize=4)) == []


def test_map_raises_the_first_error_in_order_and_times_out(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    executor = make_executor()
    results = executor.map(divmod, [1, 1, 1], [2, 0, 5])
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)
    slow = executor.map(faults.sleep_then, [0, 5], timeout=1)
    assert next(slow) is None
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        next(slow)
    assert time.monotonic() - start < 3


def test_cancel_futures_cancels_only_what_never_began(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    # Whatever the timing, a task that ran is never reported cancelled, and one cancelled never ran.
    log = tmp_path / "ran"
    executor = make_executor(max_local_workers=3)
    futures = [executor.submit(faults.record_order, str(log), f"t{i}", 0.01) for i in range(300)]
    assert wait_until(lambda: len(_lines(log)) >= 3, 10)
    executor.shutdown(wait=True, cancel_futures=True)
    ran = set(_lines(log))
    cancelled = {f"t{i}" for i, f in enumerate(futures) if f.cancelled()}
    completed = {f.result() for f in futures if not f.cancelled()}
    assert cancelled and completed == ran and not cancelled & ran
    assert len(cancelled) + len(completed) == 300


def test_a_submit_future_follows_concurrent_futures_on_cancel(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1)
    gate = tmp_path / "gate"
    running = executor.submit(faults.wait_for_file, str(gate))
    queued = executor.submit(faults.double, 1)
    assert wait_until(running.running, 10)
    assert running.cancel() is False  # it has begun: it runs on
    assert queued.cancel() is True and queued.cancelled()
    gate.touch()
    assert running.result(timeout=10) == str(gate)


def test_finished_submit_tasks_are_let_go_and_say_so(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    executor = make_executor()
    future = executor.submit(faults.double, 4)
    assert future.result(timeout=10) == 8
    assert wait_until(lambda: future.task_id not in executor._tasks, 5)  # type: ignore[attr-defined]
    with pytest.raises(KeyError, match="released"):
        executor.get_task(future.task_id)  # type: ignore[attr-defined]
    with pytest.raises(KeyError, match="unknown task id 'task-999'"):
        executor.get_task("task-999")
    kept = executor.submit_task(faults.double, (1,))
    executor.get_task_result(kept, timeout=10)
    assert executor.get_task(kept).status is TaskStatus.COMPLETED
    assert executor.get_stats()["completed_tasks"] == 2


@pytest.mark.parametrize("method", START_METHODS)
def test_an_initializer_that_keeps_raising_breaks_the_pool(
    make_executor: Callable[..., DistributedExecutor], method: str
) -> None:
    executor = make_executor(
        start_method=method, initializer=faults.raise_value_error, initargs=("bad init",)
    )
    future = executor.submit(faults.double, 1)
    queued = executor.submit_task(faults.double, (2,))
    with pytest.raises(BrokenPoolError, match="initializer") as caught:
        future.result(timeout=30)
    assert isinstance(caught.value.__cause__, ValueError) and "bad init" in str(caught.value.__cause__)
    with pytest.raises(BrokenPoolError):
        executor.get_task_result(queued, timeout=5)
    with pytest.raises(concurrent.futures.BrokenExecutor):
        executor.submit(faults.double, 3)
    assert executor._broken  # ProcessPoolExecutor's flag, read by its users and tests
    start = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("method", START_METHODS)
def test_initargs_may_hold_multiprocessing_queues(
    make_executor: Callable[..., DistributedExecutor], method: str
) -> None:
    context = multiprocessing.get_context(method)
    channel = context.Queue()
    executor = make_executor(mp_context=context, initializer=faults.send_pid, initargs=(channel,))
    pids = {channel.get(timeout=30) for _ in range(2)}
    assert pids == {w["pid"] for w in executor.get_stats()["workers"].values()}
    assert executor.submit(faults.double, 21).result(timeout=30) == 42
    channel.close()
    channel.join_thread()


@pytest.mark.parametrize("method", START_METHODS)
def test_every_start_method_runs_kills_and_counts(
    make_executor: Callable[..., DistributedExecutor], method: str
) -> None:
    executor = make_executor(start_method=method, kill_grace=0.2)
    base = 5
    assert executor.submit(lambda x: x + base, 1).result(timeout=30) == 6  # a closure, by value
    hung = executor.submit_task(faults.ignore_sigterm_and_hang, timeout=0.5)
    with pytest.raises(TimeoutError):
        executor.get_task_result(hung, timeout=30)
    stats = executor.get_stats()
    assert stats["completed_tasks"] == 1 and stats["cancelled_tasks"] == 1
    assert stats["total_workers"] == 2


def test_processpoolexecutor_names_work_and_their_errors_name_them() -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        DistributedExecutor(max_workers=-1)
    with pytest.raises(ValueError, match="max_tasks_per_child must be greater than 0"):
        DistributedExecutor(max_tasks_per_child=0)
    with pytest.raises(ValueError, match="not both"):
        DistributedExecutor(max_workers=2, max_local_workers=4)
    with DistributedExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as executor:
        assert executor.get_stats()["total_workers"] == 1
        assert executor.submit(faults.double, 2).result(timeout=10) == 4
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(faults.double, 1)


def test_a_submit_after_interpreter_shutdown_says_so() -> None:
    script = textwrap.dedent("""
        import atexit
        from procpool import DistributedExecutor

        @atexit.register  # registered first, so it runs after the executor's own exit hook
        def run_last():
            try:
                executor.submit(id, None)
            except RuntimeError as error:
                print(error)

        executor = DistributedExecutor(max_workers=2)
        print(executor.submit(abs, -42).result(timeout=30))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["42", "cannot schedule new futures after interpreter shutdown"]
    assert done.returncode == 0 and done.stderr == ""


def test_finished_records_are_kept_until_collected_then_within_bounds(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    executor = make_executor(max_finished_tasks=3)
    ids = executor.submit_batch([(faults.double, (i,)) for i in range(10)])
    assert wait_until(lambda: executor.get_stats()["completed_tasks"] == 10, 20)
    assert executor.wait_for_tasks(ids, timeout=10) == [2 * i for i in range(10)]  # none collected: all kept
    more = executor.submit_batch([(faults.double, (i,)) for i in range(3)])
    executor.wait_for_tasks(more, timeout=10)
    assert wait_until(lambda: ids[0] not in executor._tasks, 5)  # type: ignore[attr-defined]
    with pytest.raises(KeyError, match="was released"):
        executor.get_task_result(ids[0])
    assert len(executor._tasks) <= 4  # type: ignore[attr-defined]
    stats = executor.get_stats()
    assert stats["completed_tasks"] == stats["total_tasks"] == 13  # the counts stay exact
