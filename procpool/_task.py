"""Task records: the frozen snapshot users see, and the supervisor's own entry."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED as _CANCELLED
from concurrent.futures._base import CANCELLED_AND_NOTIFIED as _CANCELLED_AND_NOTIFIED
from concurrent.futures._base import FINISHED as _FINISHED
from concurrent.futures._base import PENDING as _PENDING
from typing import Any, NamedTuple

from ._errors import TaskCancelledError
from ._states import TaskPriority, TaskStatus

__all__ = ("CancelRef", "TaskFuture", "TaskRecord", "changed_record")

CancelRef = weakref.WeakMethod[Callable[[str, bool], bool]]  # the executor's _cancel(task_id, kill)


class TaskRecord(NamedTuple):
    """A consistent snapshot of one task, as ``get_task`` and callbacks see it.

    Immutable; the supervisor makes a new one on every change (a named tuple,
    made with ``tuple.__new__`` on every task's path: see ``changed_record``).
    Timestamps are wall-clock seconds
    (``time.time()``) for display; deadlines are kept on the monotonic clock.
    """

    task_id: str
    status: TaskStatus
    priority: TaskPriority
    name: str  # the function's qualified name, for logs and views
    attempts: int  # attempts started so far (the first run is attempt 1)
    worker: str | None  # the worker that ran the latest attempt
    result: Any = None  # the return value, once COMPLETED
    error: BaseException | None = None  # the final or latest error
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    execution_time: float | None = None  # seconds the final attempt ran

    @property
    def done(self) -> bool:
        """True once the task is in a terminal state."""
        return self.status in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


_FIELD_INDEX = {name: index for index, name in enumerate(TaskRecord._fields)}
_STATUS, _ATTEMPTS = _FIELD_INDEX["status"], _FIELD_INDEX["attempts"]


def changed_record(rec: TaskRecord, status: TaskStatus, attempts: int, changes: dict[str, Any]) -> TaskRecord:
    """``rec._replace(status=..., attempts=..., **changes)`` at under half its cost."""
    values = list(rec)
    values[_STATUS], values[_ATTEMPTS] = status, attempts
    for name, value in changes.items():
        values[_FIELD_INDEX[name]] = value
    return tuple.__new__(TaskRecord, values)


class _Condition(threading.Condition):
    """``threading.Condition`` without its five bound methods per instance.

    A Condition keeps its lock's methods as attributes: five of the eleven objects
    a Future makes that the cyclic garbage collector walks, for as long as the task
    is held. Here they are methods of the class. (Submitting a batch cost a third
    less CPU per task once they were gone.)
    """

    def __init__(self) -> None:  # no super().__init__(): it would bind them again
        self._lock = threading.RLock()
        self._waiters: deque[Any] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]


class TaskFuture(Future[Any]):
    """A ``concurrent.futures.Future`` whose ``cancel()`` really cancels the task.

    Cancelling a running task kills its worker, as ``cancel_task`` does. A
    Future made by ``submit()`` or ``map()`` (``kills=False``) follows
    ``concurrent.futures`` instead: ``cancel()`` returns False once the task
    has started.
    """

    def __init__(
        self, task_id: str, cancel: Callable[[str, bool], bool] | CancelRef, kills: bool = True
    ) -> None:
        # Future.__init__'s fields, with a lighter Condition (the same in CPython 3.11 to 3.13).
        self._condition = _Condition()
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self.task_id = task_id
        # The executor's _cancel, weakly: one reference may serve every future of an executor.
        self._cancel_ref = cancel if isinstance(cancel, weakref.WeakMethod) else weakref.WeakMethod(cancel)
        self._kills = kills

    def cancel(self) -> bool:
        """Cancel the task; returns False if it had already finished (or started, with ``kills=False``)."""
        cancel = self._cancel_ref()
        if cancel is None or self.done():
            return super().cancel()
        if not self._kills and self.running():
            return False
        if not cancel(self.task_id, self._kills):
            return False
        self._mark_cancelled()  # at once: cancelled() is true when this returns
        return True

    def settle_here(self, rec: TaskRecord) -> bool:
        """Set the outcome of ``rec`` now, unless done-callbacks (user code) must run; True if set."""
        with self._condition:  # add_done_callback takes it too: none can slip in meanwhile
            if self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED, _FINISHED):
                return True  # cancelled by its caller first
            if self._done_callbacks:
                return False
            if rec.status is TaskStatus.COMPLETED:  # set_result's steps, with the lock already held
                self._result = rec.result
                self._state = _FINISHED
                for waiter in self._waiters:
                    waiter.add_result(self)
                if self._condition._waiters:  # type: ignore[attr-defined]
                    self._condition.notify_all()
                return True
            if rec.error is None or isinstance(rec.error, TaskCancelledError):
                return False  # marked cancelled by the futures lane, with its waiters told
            self.set_exception(rec.error)
            return True

    def _mark_cancelled(self) -> None:
        # By the supervisor's futures lane, or by cancel() in the caller's thread: whichever
        # comes first. Cancelled and notified in one step (what cancel() and then
        # set_running_or_notify_cancel() do), so that wait() and as_completed() wake; a task
        # killed while running is cancelled too, which Future.cancel() alone refuses.
        with self._condition:
            if self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED, _FINISHED):
                return
            self._state = _CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]


class Task:
    """The supervisor's mutable entry for one task (private; one writer).

    Invariant: ``record`` is always a consistent snapshot of the fields below,
    replaced as a whole on every change, so readers in other threads never
    see a half-made update.
    """

    __slots__ = (
        "attempt",
        "collected",
        "future",
        "keep",
        "name",
        "payload",
        "priority",
        "record",
        "retry_errors",
        "seq",
        "starting",
        "status",
        "task_id",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        task_id: str,
        priority: TaskPriority,
        seq: int,
        name: str,
        payload: bytes,
        timeout: float,
        future: TaskFuture,
        submitted_at: float,
        futures_api: bool = False,
    ) -> None:
        self.task_id = task_id
        self.priority = priority
        self.seq = seq  # submission order; a retry keeps it, so keeps its place
        self.name = name
        self.payload: bytes | None = payload  # dropped once terminal
        self.timeout = timeout
        self.status = TaskStatus.PENDING
        self.attempt = 1  # the attempt now queued or running; only this one may report
        self.worker: str | None = None
        self.future = future
        # submit() and map() follow concurrent.futures: a raising callable runs once (a worker
        # death is still retried), and the executor lets go of the task once it ends: its
        # Future alone holds the outcome. submit_task() retries errors and keeps the record.
        self.retry_errors = not futures_api
        self.keep = not futures_api
        self.starting: tuple[str, float] | None = None  # (worker, wall time) of a start not yet recorded
        self.collected = False  # its outcome was read (get_task_result, wait_for_tasks) or sent to a callback
        pending = TaskStatus.PENDING  # what TaskRecord(...) makes, without its Python __new__:
        fields = (task_id, pending, priority, name, 0, None, None, None, submitted_at, None, None, None)
        self.record: TaskRecord = tuple.__new__(TaskRecord, fields)

    @property
    def started_at(self) -> float | None:
        """When the current attempt started (wall clock), recorded or not yet."""
        return self.record.started_at if self.starting is None else self.starting[1]
