"""Task moves in isolation: counters, futures and callbacks follow every move."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from procpool import TaskPriority, TaskStatus
from procpool._callbacks import Callbacks, Lane
from procpool._errors import RemoteTaskError, RemoteTraceback
from procpool._ledger import Ledger, rebuild_error
from procpool._metrics import MetricsBlock
from procpool._task import Task, TaskFuture, TaskRecord, changed_record


class NoExecutor:
    """Stands in for the executor a TaskFuture refers to (never called here)."""

    def cancel(self, task_id: str, kill: bool) -> bool:
        raise AssertionError("not called in these tests")


EXECUTOR = NoExecutor()


class FakeCallbacks(Callbacks):
    def __init__(self) -> None:
        super().__init__()
        self.fired: list[tuple[str | None, Any]] = []

    def count(self, event: str) -> int:
        return 1  # every event has a callback here

    def fire(self, event: str | None, record: Any) -> int:
        self.fired.append((event, record.status))
        return 1


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    block = MetricsBlock(slots=1)
    lane = Lane("test-futures")
    yield Ledger(block, FakeCallbacks(), {}, lane)
    lane.close()
    block.close()


def new_task(ledger: Ledger, priority: TaskPriority = TaskPriority.HIGH) -> Task:
    task = Task("task-1", priority, 1, "f", b"", 5.0, TaskFuture("task-1", EXECUTOR.cancel), 0.0)
    counters = ledger.metrics.counters
    counters.total += 1
    counters.states[0] += 1
    counters.depth[priority] += 1
    return task


def test_a_task_through_a_retry_to_completion(ledger: Ledger) -> None:
    task = new_task(ledger)
    ledger.move(task, TaskStatus.RUNNING, worker="w")
    assert task.future.running()  # as concurrent.futures shows a started call
    assert ledger.metrics.counters.depth[TaskPriority.HIGH] == 0 and ledger.unfinished() == 1
    task.attempt = 2
    ledger.move(task, TaskStatus.RETRYING, error=ValueError("x"))
    assert ledger.metrics.counters.depth[TaskPriority.HIGH] == 1 and ledger.metrics.counters.retried == 1
    ledger.move(task, TaskStatus.RUNNING)
    ledger.move(task, TaskStatus.COMPLETED, 0.25, result=7)
    assert not task.future.done()  # settled once the round's counters are published
    ledger.flush()
    assert task.future.result(0) == 7 and task.payload is None
    assert task.record.execution_time == 0.25 and task.record.attempts == 2
    assert ledger.unfinished() == 0 and ledger.metrics.counters.states[2] == 1
    assert ledger.callbacks.fired == [  # type: ignore[attr-defined]
        ("task_retrying", TaskStatus.RETRYING), ("task_complete", TaskStatus.COMPLETED),
    ]  # fmt: skip


def test_terminal_moves_are_final(ledger: Ledger) -> None:
    task = new_task(ledger)
    ledger.move(task, TaskStatus.FAILED, error=ValueError("x"))
    with pytest.raises(AssertionError, match="illegal"):
        ledger.move(task, TaskStatus.RUNNING)
    ledger.flush()
    with pytest.raises(ValueError):
        task.future.result(5)


def test_rebuilt_errors_carry_the_worker_traceback() -> None:
    error = rebuild_error(None, "mod.Weird", "it broke", "Traceback ...")
    assert isinstance(error, RemoteTaskError) and error.type_name == "mod.Weird"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert isinstance(rebuild_error(b"not a pickle", "x.Y", "m", "tb"), RemoteTaskError)


def test_a_futures_api_task_leaves_the_records_when_it_ends(ledger: Ledger) -> None:
    task = new_task(ledger)
    task.keep = False
    ledger.tasks[task.task_id] = task
    ledger.move(task, TaskStatus.RUNNING, worker="w")
    assert task.task_id in ledger.tasks
    ledger.move(task, TaskStatus.COMPLETED, 0.1, result=3)
    ledger.flush()
    assert task.task_id not in ledger.tasks and task.future.result(5) == 3
    assert ledger.metrics.counters.states[2] == 1  # counted all the same


def test_only_plain_data_is_unpickled_on_the_supervisor_thread() -> None:
    import cloudpickle

    from procpool._events import _plain

    for value in (None, 42, 2.5, "xyz", [1, 2], {"k": (1, 2.0)}, {3}, b"raw"):
        assert _plain(cloudpickle.dumps(value)), value
    for value in (ValueError("x"), TaskPriority.HIGH, Lane, b"x" * 5000):
        assert not _plain(cloudpickle.dumps(value)), value


def test_a_future_with_done_callbacks_is_settled_off_the_supervisor_thread(ledger: Ledger) -> None:
    import threading

    task = new_task(ledger)
    ran_on: list[str] = []
    task.future.add_done_callback(lambda _: ran_on.append(threading.current_thread().name))
    ledger.move(task, TaskStatus.RUNNING, worker="w")
    ledger.move(task, TaskStatus.COMPLETED, 0.1, result=3)
    ledger.flush()
    assert task.future.result(5) == 3
    ledger.futures.close()  # runs what it holds
    assert ran_on == ["test-futures"]  # user code never runs on the supervisor's thread


def test_a_record_is_built_and_changed_as_its_named_tuple_would_be() -> None:
    future = TaskFuture("task-7", EXECUTOR.cancel)
    task = Task("task-7", TaskPriority.HIGH, 7, "f", b"", 30.0, future, 12.5)
    made = TaskRecord("task-7", TaskStatus.PENDING, TaskPriority.HIGH, "f", 0, None, submitted_at=12.5)
    assert task.record == made and type(task.record) is TaskRecord
    changes: dict[str, Any] = {}
    for index, name in enumerate(TaskRecord._fields):
        if name not in ("status", "attempts"):
            changes[name] = f"value {index}"
        changed = changed_record(made, TaskStatus.COMPLETED, 2, changes)
        assert changed == made._replace(status=TaskStatus.COMPLETED, attempts=2, **changes)
        assert type(changed) is TaskRecord and changed.done
    with pytest.raises(KeyError):
        changed_record(made, TaskStatus.FAILED, 1, {"no such field": 1})
