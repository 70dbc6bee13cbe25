"""Task state changes: the one place a task moves, and everything that follows a move.

Called only from the supervisor thread. A move replaces the task's record and
updates the pool counters; ``flush`` (once per round of the supervisor's loop)
publishes them in the metrics header, then settles the Futures of the tasks
that ended and queues the callbacks of their events.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures._base import PENDING as _PENDING
from typing import Any

import cloudpickle

from . import _metrics as metrics
from ._callbacks import Callbacks, Lane
from ._errors import RemoteTaskError, RemoteTraceback, TaskCancelledError
from ._states import TERMINAL, TaskStatus, advance
from ._task import Task, TaskFuture, TaskRecord, changed_record

__all__ = ("EVENT_OF", "Ledger", "rebuild_error")

_BUCKET = {
    TaskStatus.PENDING: metrics.PENDING,
    TaskStatus.RETRYING: metrics.PENDING,
    TaskStatus.RUNNING: metrics.RUNNING,
    TaskStatus.COMPLETED: metrics.COMPLETED,
    TaskStatus.FAILED: metrics.FAILED,
    TaskStatus.CANCELLED: metrics.CANCELLED,
}
EVENT_OF = {
    TaskStatus.COMPLETED: "task_complete",
    TaskStatus.FAILED: "task_failed",
    TaskStatus.RETRYING: "task_retrying",
    TaskStatus.CANCELLED: "task_cancelled",
}


class Ledger:
    """Moves tasks between states and keeps the pool counters in step."""

    def __init__(
        self,
        block: metrics.MetricsBlock,
        callbacks: Callbacks,
        tasks: dict[str, Task],
        futures: Lane,
        keep: tuple[int | None, float | None] = (None, None),
    ) -> None:
        self.metrics = block
        self.callbacks = callbacks
        # Finished records kept by id, oldest first: at most keep[0], none older than keep[1] s.
        self.finished: OrderedDict[str, float] = OrderedDict()
        self.keep_count, self.keep_seconds = keep
        self.futures = futures  # settles Futures off this thread: their done-callbacks are user code
        self.tasks = tasks  # the executor's records by id; a task not kept leaves it when it ends
        self._dirty = False  # counters changed since they were last published
        self._after: list[tuple[str | None, Any]] = []  # futures to settle and callbacks to queue, in order
        self._starting: list[Task] = []  # started since the last flush

    def pending(self) -> int:
        """Tasks queued or retrying (handed to a worker whose start is not read yet included)."""
        return self.metrics.counters.states[metrics.PENDING]

    def unfinished(self) -> int:
        """Tasks not yet in a terminal state (queued, retrying or running)."""
        states = self.metrics.counters.states
        return states[metrics.PENDING] + states[metrics.RUNNING]

    def start(self, task: Task, worker: str, at: float) -> None:
        """The task's current attempt has started on ``worker`` at ``at`` (wall clock).

        Its state is RUNNING at once; its record, counters and Future follow at the
        next ``flush``, unless it ends first: a short task that starts and ends in one
        round of the supervisor's loop then makes one move, not two.
        """
        task.status = advance(task.status, TaskStatus.RUNNING)
        task.worker = worker
        task.starting = (worker, at)
        self._starting.append(task)

    def move(self, task: Task, status: TaskStatus, elapsed: float | None = None, **changes: Any) -> None:
        """The one place a task changes state: record, counters, future, callbacks.

        ``elapsed`` (seconds an attempt ran) counts towards the average execution time.
        """
        task.status = advance(task.status, status)
        if task.starting is not None:  # what the start not yet written would have said
            changes.setdefault("worker", task.starting[0])
            changes.setdefault("started_at", task.starting[1])
            task.starting = None
        if elapsed is not None:
            changes["execution_time"] = elapsed
        old = task.record.status
        task.record = rec = changed_record(task.record, status, task.attempt, changes)
        ob, nb = _BUCKET[old], _BUCKET[status]
        if ob != nb or elapsed is not None or status is TaskStatus.RETRYING:
            counters = self.metrics.counters
            with self.metrics.header_lock:
                if ob != nb:
                    counters.states[ob] -= 1
                    counters.states[nb] += 1
                    if ob == metrics.PENDING:
                        counters.depth[task.priority] -= 1
                    elif nb == metrics.PENDING:
                        counters.depth[task.priority] += 1
                if status is TaskStatus.RETRYING:
                    counters.retried += 1
                if elapsed is not None:
                    counters.exec_time_sum += elapsed
                    counters.exec_count += 1
            self._dirty = True
        if status is TaskStatus.RUNNING:
            if task.future._state == _PENDING:
                task.future.set_running_or_notify_cancel()  # Future.running() from its first start
        elif status in TERMINAL:
            task.payload = None
            if task.keep:
                self._release_old(task.task_id)
            else:
                self.tasks.pop(task.task_id, None)
            self._after.append((None, (task.future, rec)))
        event = EVENT_OF.get(status)
        if event is not None and self.callbacks.count(event):
            self._after.append((event, rec))
            if status in TERMINAL:
                task.collected = True  # a callback has it

    def flush(self) -> None:
        """Publish the counters, then settle the futures and queue the callbacks of the moves since.

        The supervisor calls this once per round of its loop: one write of the header
        for every move in the round, and a caller that has a result (or a callback that
        has a record) sees counts that include it.
        """
        starting, self._starting = self._starting, []
        for task in starting:
            if task.starting is not None:  # still running: the move start() put off is made now
                task.status = task.record.status  # PENDING or RETRYING, as before the start
                self.move(task, TaskStatus.RUNNING)
        if self._dirty or self.metrics.stale:
            self._dirty = False
            self.metrics.publish()
        after, self._after = self._after, []
        for event, item in after:
            if event is None:
                future, rec = item
                if not future.settle_here(rec):  # it has done-callbacks (user code): not on this thread
                    self.futures.put(_settle_future, item)
            else:
                self.callbacks.fire(event, item)

    def _release_old(self, task_id: str) -> None:
        """Let go of old finished records: past the time bound always; past the count bound
        once collected (its result read, or handed to a callback), oldest first."""
        now = time.monotonic()
        self.finished[task_id] = now
        count, seconds = self.keep_count, self.keep_seconds
        while self.finished:
            oldest, at = next(iter(self.finished.items()))
            task = self.tasks.get(oldest)
            expired = seconds is not None and now - at > seconds
            over = count is not None and len(self.finished) > count
            if not (expired or (over and (task is None or task.collected))):
                break
            del self.finished[oldest]
            self.tasks.pop(oldest, None)


def _settle_future(item: tuple[TaskFuture, TaskRecord]) -> None:
    fut, rec = item
    if rec.status is TaskStatus.COMPLETED:
        fut.set_result(rec.result)
    elif rec.status is TaskStatus.CANCELLED and isinstance(rec.error, TaskCancelledError):
        fut._mark_cancelled()
    else:
        assert rec.error is not None
        fut.set_exception(rec.error)


def rebuild_error(blob: bytes | None, type_name: str, text: str, tb: str) -> BaseException:
    """The task's own exception with the worker traceback as its cause, or a plain stand-in."""
    error: Any = None
    if blob is not None:
        try:
            error = cloudpickle.loads(blob)
        except BaseException:  # noqa: BLE001 - e.g. an exception class whose __init__ wants other args
            error = None
    if not isinstance(error, BaseException):
        error = RemoteTaskError(type_name, text, tb)
    error.__cause__ = RemoteTraceback(tb)
    return error  # type: ignore[no-any-return]
