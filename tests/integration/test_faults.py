"""The catalogue of misbehaving tasks against real workers."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import faults
import pytest
from conftest import pid_alive, wait_until

from procpool import (
    DistributedExecutor,
    RemoteTaskError,
    RemoteTraceback,
    TaskStatus,
    TaskTimeoutError,
    WorkerLostError,
)

DEADLINE = 0.3  # seconds; short, so these tests take little time


@pytest.mark.parametrize(
    "fn", [faults.hang, faults.ignore_sigterm_and_hang, faults.busy_loop_python, faults.busy_loop_c]
)
def test_a_task_past_its_deadline_is_killed_and_cancelled(executor: DistributedExecutor, fn: object) -> None:
    task_id = executor.submit_task(fn, timeout=DEADLINE)  # type: ignore[arg-type]
    with pytest.raises(TaskTimeoutError, match="deadline") as caught:
        executor.get_task_result(task_id, timeout=10)
    assert isinstance(caught.value, TimeoutError)
    record = executor.get_task(task_id)
    assert record.status is TaskStatus.CANCELLED and record.attempts == 1
    # The pool goes on: the slot was refilled and takes work.
    assert executor.get_task_result(executor.submit_task(faults.double, (21,)), timeout=10) == 42
    assert wait_until(lambda: executor.get_stats()["workers"][record.worker]["restarts"] == 1, 10)


@pytest.mark.parametrize(
    ("fn", "words"),
    [
        (faults.exit_abruptly, "exited with code 3"),
        (faults.kill_self, "SIGKILL"),
        (faults.segfault, "SIGSEGV"),
    ],
)
def test_a_dead_worker_fails_only_its_task_after_the_retries(
    executor: DistributedExecutor, fn: object, words: str
) -> None:
    bystander = executor.submit_task(faults.sleep_then, (0.5, "fine"))
    task_id = executor.submit_task(fn)  # type: ignore[arg-type]
    with pytest.raises(WorkerLostError, match=words) as caught:
        executor.get_task_result(task_id, timeout=10)
    assert "attempt 2 of 2" in str(caught.value)
    assert executor.get_task(task_id).status is TaskStatus.FAILED
    assert executor.get_task(task_id).attempts == 2
    assert executor.get_task_result(bystander, timeout=10) == "fine"


def test_the_task_s_own_exception_arrives_with_the_worker_traceback(executor: DistributedExecutor) -> None:
    task_id = executor.submit_task(faults.raise_value_error, ("no good",))
    with pytest.raises(ValueError, match="no good") as caught:
        executor.get_task_result(task_id, timeout=10)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "raise_value_error" in cause.traceback_text
    assert executor.get_task(task_id).attempts == 2  # retried once, as max_retries=1 says


@pytest.mark.parametrize("fn", [faults.raise_unpicklable, faults.raise_needs_two_args])
def test_an_exception_that_cannot_travel_becomes_a_readable_error(
    executor: DistributedExecutor, fn: object
) -> None:
    task_id = executor.submit_task(fn)  # type: ignore[arg-type]
    with pytest.raises(RemoteTaskError) as caught:
        executor.get_task_result(task_id, timeout=10)
    error = caught.value
    assert error.type_name.startswith("faults.") and "Traceback" in error.traceback_text


def test_an_unpicklable_result_fails_that_task_only_without_retries(executor: DistributedExecutor) -> None:
    task_id = executor.submit_task(faults.return_unpicklable)
    with pytest.raises(
        TypeError, match="pickle"
    ) as caught:  # pickle's own error, as concurrent.futures gives
        executor.get_task_result(task_id, timeout=10)
    assert any("could not be pickled to send it back" in note for note in caught.value.__notes__)
    assert executor.get_task(task_id).attempts == 1
    assert executor.get_task_result(executor.submit_task(faults.double, (1,)), timeout=10) == 2


def test_a_huge_result_arrives_whole(executor: DistributedExecutor) -> None:
    result = executor.get_task_result(executor.submit_task(faults.return_huge, (96,)), timeout=30)
    assert len(result) == 96 * 1024 * 1024


@pytest.mark.parametrize("fn", [faults.spawn_grandchild_and_hang, faults.spawn_escapee_and_hang])
def test_children_of_a_killed_task_die_with_it(
    executor: DistributedExecutor, tmp_path: Path, fn: object
) -> None:
    pid_file = tmp_path / "child.pid"
    task_id = executor.submit_task(fn, (str(pid_file),), timeout=1.0)  # type: ignore[arg-type]
    with pytest.raises(TaskTimeoutError):
        executor.get_task_result(task_id, timeout=10)
    child = int(pid_file.read_text())
    assert wait_until(lambda: not pid_alive(child), 5), f"child {child} outlived its task"


def test_a_worker_killed_from_outside_is_replaced_and_its_task_retried(
    executor: DistributedExecutor, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    task_id = executor.submit_task(faults.wait_for_file, (str(gate),))
    assert wait_until(lambda: executor.get_task(task_id).status is TaskStatus.RUNNING, 10)
    worker = executor.get_stats()["workers"][executor.get_task(task_id).worker]
    os.kill(worker["pid"], signal.SIGKILL)
    assert wait_until(lambda: executor.get_task(task_id).attempts == 2, 10)
    gate.touch()
    assert executor.get_task_result(task_id, timeout=10) == str(gate)
    assert isinstance(executor.get_task(task_id).error, WorkerLostError)


def test_a_start_on_a_pool_quiet_for_a_while_is_seen_and_its_deadline_kept(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    # Workers send no "started": the supervisor reads starts from their slots, and stops
    # looking once the pool has been quiet. With no health checks to wake it, the next
    # submission must, or a hung task would never reach its deadline.
    executor = make_executor(heartbeat_timeout=None, memory_sample_interval=None, max_retries=0)
    assert executor.get_task_result(executor.submit_task(faults.double, (2,)), timeout=10) == 4
    assert wait_until(lambda: not executor._supervisor.scanning, 5)  # quiet: the scan has stopped
    marker = tmp_path / "began"
    task_id = executor.submit_task(faults.write_time_then_hang, (str(marker),), timeout=3)
    future = executor.future(task_id)
    assert wait_until(future.running, 2.5)  # seen running before its deadline
    record = executor.get_task(task_id)
    assert wait_until(marker.exists, 10)
    began = float(marker.read_text())
    assert record.status is TaskStatus.RUNNING and record.worker is not None
    assert record.started_at is not None and record.started_at <= began + 0.5  # the worker's own time
    with pytest.raises(TaskTimeoutError):
        executor.get_task_result(task_id, timeout=20)


def test_long_tasks_with_nothing_queued_cost_the_supervisor_no_polling(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    # Once both workers' starts are known, none can start another before its "done":
    # the supervisor stops reading the slots until something changes.
    executor = make_executor(heartbeat_timeout=None, memory_sample_interval=None)
    ids = [executor.submit_task(faults.sleep_then, (1.5, n)) for n in range(2)]
    assert wait_until(lambda: all(executor.get_task(i).status is TaskStatus.RUNNING for i in ids), 10)
    assert wait_until(lambda: not executor._supervisor.scanning, 1.0)
    assert executor.wait_for_tasks(ids, timeout=20) == [0, 1]
    assert executor.get_task_result(executor.submit_task(faults.double, (4,)), timeout=10) == 8
