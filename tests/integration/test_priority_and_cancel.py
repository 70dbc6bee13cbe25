"""Priority order, FIFO within a level, retries in place, cancellation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import faults
import pytest
from conftest import wait_until

from procpool import (
    DistributedExecutor,
    TaskCancelledError,
    TaskPriority,
    TaskStatus,
)


def hold_worker(executor: DistributedExecutor, gate: Path) -> str:
    """Occupy the only worker until ``gate`` exists; returns the task id once it runs."""
    task_id = executor.submit_task(faults.wait_for_file, (str(gate),))
    assert wait_until(lambda: executor.get_task(task_id).status is TaskStatus.RUNNING, 10)
    return task_id


def test_priorities_then_submission_order(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1)
    gate, log = tmp_path / "gate", tmp_path / "log"
    hold_worker(executor, gate)
    plan = [("low-1", "LOW"), ("normal-1", "NORMAL"), ("urgent-1", "URGENT"), ("high-1", "HIGH"),
            ("low-2", "LOW"), ("urgent-2", "URGENT"), ("normal-2", "NORMAL")]  # fmt: skip
    ids = [executor.submit_task(faults.record_order, (str(log), label), priority=p) for label, p in plan]
    assert executor.get_stats()["queue_depth"] == {"URGENT": 2, "HIGH": 1, "NORMAL": 2, "LOW": 2}
    gate.touch()
    executor.wait_for_tasks(ids, timeout=20)
    order = log.read_text().split()
    assert order == ["urgent-1", "urgent-2", "high-1", "normal-1", "normal-2", "low-1", "low-2"]


def test_a_retried_task_keeps_its_place(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1, max_retries=2)
    gate, log, marks = tmp_path / "gate", tmp_path / "log", tmp_path / "marks"
    marks.mkdir()
    hold_worker(executor, gate)
    flaky = executor.submit_task(faults.fail_until, (str(marks), 1, str(log)))
    later = [executor.submit_task(faults.record_order, (str(log), f"n{i}")) for i in range(3)]
    seen: list[str] = []
    executor.register_callback("task_retrying", lambda rec: seen.append(rec.status.name))
    gate.touch()
    assert executor.get_task_result(flaky, timeout=20) == "ok after 1"
    executor.wait_for_tasks(later, timeout=20)
    assert log.read_text().split() == ["flaky-0", "flaky-1", "n0", "n1", "n2"]
    assert executor.get_task(flaky).attempts == 2
    executor.shutdown()
    assert seen == ["RETRYING"]
    assert executor.get_stats()["retried_tasks"] == 1


def test_cancel_a_queued_task(make_executor: Callable[..., DistributedExecutor], tmp_path: Path) -> None:
    executor = make_executor(max_local_workers=1)
    gate = tmp_path / "gate"
    hold_worker(executor, gate)
    queued = executor.submit_task(faults.double, (1,))
    assert executor.cancel_task(queued) is True
    assert executor.cancel_task(queued) is False
    with pytest.raises(TaskCancelledError):
        executor.get_task_result(queued, timeout=5)
    (error,) = executor.wait_for_tasks([queued], timeout=5)  # a cancelled future wakes waiters
    assert isinstance(error, TaskCancelledError)
    gate.touch()
    assert executor.get_task(queued).status is TaskStatus.CANCELLED
    stats = executor.get_stats()
    assert stats["cancelled_tasks"] == 1 and stats["pending_tasks"] == 0


def test_cancel_a_running_task_kills_it(executor: DistributedExecutor) -> None:
    task_id = executor.submit_task(faults.hang)
    assert wait_until(lambda: executor.get_task(task_id).status is TaskStatus.RUNNING, 10)
    worker = executor.get_task(task_id).worker
    assert executor.cancel_task(task_id) is True
    record = executor.get_task(task_id)
    assert record.status is TaskStatus.CANCELLED and isinstance(record.error, TaskCancelledError)
    assert wait_until(lambda: executor.get_stats()["workers"][worker]["restarts"] == 1, 10)
    assert executor.get_task_result(executor.submit_task(faults.double, (4,)), timeout=10) == 8


def test_cancel_a_finished_task_returns_false(executor: DistributedExecutor) -> None:
    task_id = executor.submit_task(faults.double, (2,))
    assert executor.get_task_result(task_id, timeout=10) == 4
    assert executor.cancel_task(task_id) is False
    assert executor.get_task(task_id).status is TaskStatus.COMPLETED


def test_urgent_work_is_not_stuck_behind_a_batch(
    make_executor: Callable[..., DistributedExecutor], tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1)
    gate, log = tmp_path / "gate", tmp_path / "log"
    hold_worker(executor, gate)
    batch = executor.submit_batch(
        [(faults.record_order, (str(log), f"b{i}")) for i in range(20)], TaskPriority.LOW
    )
    urgent = executor.submit_task(faults.record_order, (str(log), "urgent"), priority=TaskPriority.URGENT)
    gate.touch()
    executor.wait_for_tasks([*batch, urgent], timeout=20)
    assert log.read_text().split()[0] == "urgent"
