"""The seed API, the concurrent.futures interface, asyncio, callbacks and bad input."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import faults
import pytest
from conftest import wait_until

import procpool
from procpool import (
    DistributedExecutor,
    ExecutorShutdownError,
    TaskPriority,
    TaskRecord,
    TaskStatus,
)

SEED_SCRIPT = """
import time
from procpool import get_distributed_executor, TaskPriority

def test_task(x):
    time.sleep(1)
    return x * 2

executor = get_distributed_executor(max_workers=3)
start = time.monotonic()
ids = [executor.submit_task(function=test_task, args=(i,), priority=TaskPriority.HIGH) for i in range(10)]
results = executor.wait_for_tasks(ids, timeout=30)
stats = executor.get_stats()
print(results, time.monotonic() - start, stats["completed_tasks"], stats["total_workers"])
"""


def test_the_seed_example_from_a_python_c_script() -> None:
    # Every DeprecationWarning shown: from 3.12, fork in a process with threads would warn here.
    command = [sys.executable, "-W", "default::DeprecationWarning", "-c", SEED_SCRIPT]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    results, elapsed, completed, workers = out.stdout.rsplit(" ", 3)
    assert eval(results) == [x * 2 for x in range(10)]
    assert (int(completed), int(workers)) == (10, 3)
    assert 3.9 < float(elapsed) < 7.0  # four rounds of 1 s tasks on 3 workers, plus start-up
    assert out.stderr == ""  # ended at interpreter exit, with nothing leaked or warned


def test_lambdas_and_closures_travel_by_value(executor: DistributedExecutor) -> None:
    offset = 10

    def add(x: int) -> int:
        return x + offset

    assert executor.wait_for_tasks([executor.submit_task(add, (1,)), executor.submit_task(lambda: 7)]) == [
        11,
        7,
    ]


def test_it_is_a_concurrent_futures_executor(executor: DistributedExecutor) -> None:
    future = executor.submit(faults.double, 4)
    assert future.result(timeout=10) == 8
    assert list(executor.map(faults.double, range(5), timeout=20)) == [0, 2, 4, 6, 8]


def test_asyncio_run_in_executor_and_run_async(executor: DistributedExecutor) -> None:
    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        a = loop.run_in_executor(executor, faults.double, 3)
        b = executor.run_async(faults.double, (5,), priority=TaskPriority.HIGH)
        c = asyncio.wrap_future(executor.submit(faults.double, 7))
        return list(await asyncio.gather(a, b, c))

    assert asyncio.run(main()) == [6, 10, 14]


def test_cancelling_the_awaiting_coroutine_kills_the_task(executor: DistributedExecutor) -> None:
    async def main() -> str:
        task = asyncio.ensure_future(executor.run_async(faults.hang))
        await asyncio.sleep(0)  # let it submit
        assert wait_until(lambda: executor.get_stats()["running_tasks"] == 1, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return "ok"

    assert asyncio.run(main()) == "ok"
    assert wait_until(lambda: executor.get_stats()["cancelled_tasks"] == 1, 10)


def test_get_task_result_waits_and_times_out(executor: DistributedExecutor, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    task_id = executor.submit_task(faults.wait_for_file, (str(gate),))
    assert executor.get_task_result(task_id, wait=False) is None
    with pytest.raises(TimeoutError, match=r"has not finished after 0\.1 s"):
        executor.get_task_result(task_id, timeout=0.1)
    gate.touch()
    assert executor.get_task_result(task_id) == str(gate)


def test_wait_for_tasks_puts_errors_in_place(executor: DistributedExecutor) -> None:
    ids = [executor.submit_task(faults.double, (1,)), executor.submit_task(faults.raise_value_error, ("x",))]
    ok, error = executor.wait_for_tasks(ids, timeout=20)
    assert ok == 2 and isinstance(error, ValueError)
    with pytest.raises(TimeoutError, match="1 of 1 tasks unfinished"):
        executor.wait_for_tasks([executor.submit_task(faults.sleep_then, (5,))], timeout=0.1)


def test_task_record_fields(executor: DistributedExecutor) -> None:
    task_id = executor.submit_task(function=faults.double, args=(10,), priority=TaskPriority.HIGH)
    executor.get_task_result(task_id, timeout=10)
    record = executor.get_task(task_id)
    assert (record.task_id, record.status, record.result, record.error) == (
        task_id,
        TaskStatus.COMPLETED,
        20,
        None,
    )
    assert record.attempts == 1 and record.worker in executor.get_stats()["workers"]
    assert record.submitted_at <= record.started_at <= record.finished_at  # type: ignore[operator]
    assert record.priority is TaskPriority.HIGH and record.done


def test_callbacks_fire_and_a_failing_one_changes_nothing(
    executor: DistributedExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def boom(record: TaskRecord) -> None:
        raise RuntimeError("callback bug")

    executor.register_callback("task_complete", boom)
    executor.register_callback("task_complete", lambda r: seen.append(("complete", r.task_id)))
    executor.register_callback("task_failed", lambda r: (seen.append(("failed", r.task_id)), done.set()))
    ok = executor.submit_task(faults.double, (1,))
    bad = executor.submit_task(faults.raise_value_error)
    assert done.wait(20)
    executor.shutdown()  # runs every queued callback before returning
    assert sorted(seen) == sorted([("complete", ok), ("failed", bad)])
    assert "callback bug" in caplog.text or any(r.levelno == logging.ERROR for r in caplog.records)


def test_bad_input_fails_at_the_call(executor: DistributedExecutor, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="callable"):
        executor.submit_task(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot pickle"):
        executor.submit_task(faults.double, (threading.Lock(),))
    with pytest.raises(ValueError, match="unknown priority"):
        executor.submit_task(faults.double, (1,), priority="SOON")  # type: ignore[arg-type]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="timeout"):
            executor.submit_task(faults.double, (1,), timeout=bad)
    with pytest.raises(ValueError, match="unknown callback event"):
        executor.register_callback("task_done", print)
    with pytest.raises(KeyError, match="unknown task id"):
        executor.get_task("task-999")
    with pytest.raises(KeyError):
        executor.cancel_task("task-999")
    with pytest.raises(TypeError, match="batch item 1"):
        executor.submit_batch([(faults.double, (1,), {}), (faults.double, (threading.Lock(),), {})])
    with pytest.raises(ValueError, match="batch item 0"):
        executor.submit_batch([faults.double])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="kwargs keys must be argument names"):
        executor.submit_task(faults.double, kwargs={1: 2})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"pass \['task-1'\]"):
        executor.wait_for_tasks("task-1")
    assert executor.get_stats()["total_tasks"] == 0  # nothing half-submitted


def test_submit_after_shutdown_is_refused(executor: DistributedExecutor) -> None:
    executor.shutdown()
    executor.shutdown()  # idempotent
    with pytest.raises(ExecutorShutdownError, match="after shutdown"):
        executor.submit_task(faults.double, (1,))
    with pytest.raises(RuntimeError):
        executor.submit(faults.double, 1)


def test_shutdown_runs_queued_tasks_unless_told_to_cancel(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1)
    ids = executor.submit_batch([(faults.sleep_then, (0.05, i)) for i in range(4)])
    executor.shutdown(wait=True)
    assert [executor.get_task(i).status for i in ids] == [TaskStatus.COMPLETED] * 4
    other = make_executor(max_local_workers=1)
    gate = tmp_path / "gate"
    first = other.submit_task(faults.wait_for_file, (str(gate),))
    rest = other.submit_batch([(faults.double, (i,)) for i in range(3)])
    assert wait_until(lambda: other.get_task(first).status is TaskStatus.RUNNING, 10)
    other.shutdown(wait=False, cancel_futures=True)
    assert wait_until(lambda: other.get_task(rest[-1]).status is TaskStatus.CANCELLED, 10)
    gate.touch()
    other.shutdown(wait=True)
    assert other.get_task(first).status is TaskStatus.COMPLETED
    assert {other.get_task(i).status for i in rest} == {TaskStatus.CANCELLED}
    stats = other.get_stats()
    assert stats["active_workers"] == 0 and stats["cancelled_tasks"] == 3


def test_the_default_executor_is_one_object() -> None:
    first = procpool.get_distributed_executor(max_workers=2)
    try:
        assert procpool.get_distributed_executor() is first
    finally:
        first.shutdown()
    second = procpool.get_distributed_executor(max_workers=1)
    second.shutdown()
    assert second is not first


def test_a_fresh_process_per_task(make_executor: Callable[..., DistributedExecutor]) -> None:
    import os

    executor = make_executor(max_local_workers=1, max_tasks_per_worker=1)
    ids = [executor.submit_task(os.getpid) for _ in range(4)]
    assert len(set(executor.wait_for_tasks(ids, timeout=20))) == 4
    assert executor.get_stats()["workers"]["local-worker-0"]["restarts"] >= 3


def test_spawn_start_method_runs_closures_and_kills_at_deadline(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    executor = make_executor(max_local_workers=1, start_method="spawn")
    base = 5
    assert executor.get_task_result(executor.submit_task(lambda x: x + base, (1,)), timeout=30) == 6
    with pytest.raises(TimeoutError):
        executor.get_task_result(executor.submit_task(faults.hang, timeout=0.5), timeout=30)
