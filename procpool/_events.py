"""Task events on the supervisor thread: started, done, deadlines, cancels (a mixin of Supervisor).

Every change of a task's state happens here or in the supervisor, on its
thread, through ``Ledger.move``. An attempt counts only while it is the
task's current one and its worker is not fenced (see ``_supervisor``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import cloudpickle

from ._errors import RemoteTaskError, TaskCancelledError, TaskTimeoutError, WorkerLostError, WorkerMemoryError
from ._ledger import Ledger, rebuild_error
from ._remote.slots import DEADLINE_MARGIN
from ._scheduling import Timers, should_retry
from ._states import TERMINAL, TaskStatus
from ._task import Task

if TYPE_CHECKING:
    from ._callbacks import Lane
    from ._config import Config
    from ._executor import DistributedExecutor
    from ._manager_link import ManagerLink
    from ._queue import TaskQueueProxy
    from ._supervisor import Worker

__all__ = ("TaskEvents",)

log = logging.getLogger(__name__)


# Opcodes through which unpickling can reach code (a global, a reduce, a build, an
# extension code). A pickle with none of these bytes anywhere holds only plain data
# (None, numbers, strings, containers of them): it is unpickled on the spot, at no risk.
_CODE_OPCODES = b"c\x93Rbio\x81\x92\x82\x83\x84PQ"
_PLAIN_MAX = 4096  # bytes; larger results go to the decoder lane whatever they hold


def _plain(blob: bytes | None) -> bool:
    if blob is None or len(blob) > _PLAIN_MAX:
        return False
    return len(blob.translate(None, _CODE_OPCODES)) == len(blob)


def _decode(item: tuple[Any, Any, Task, tuple[Any, ...]]) -> None:
    """On the decoder lane: the attempt's value or error, handed back to the supervisor."""
    supervisor, w, task, message = item
    _, _, _, ok, _, _, blob, type_name, text, tb = message
    outcome: tuple[str, Any]
    if ok:
        try:
            outcome = ("value", cloudpickle.loads(blob))
        except BaseException as exc:  # noqa: BLE001 - the task's failure, not ours
            why = f"the result could not be unpickled: {exc}"
            outcome = ("bad", RemoteTaskError(type(exc).__name__, why, ""))
    else:
        outcome = ("error", rebuild_error(blob, type_name, text, tb))
    del item, blob
    supervisor.call(lambda: supervisor._on_decoded(w, task, message, outcome))


def _answer(reply: Future[bool] | None, value: bool) -> None:
    if reply is not None:
        reply.set_result(value)


class TaskEvents:
    """Mixed into Supervisor; uses its ledger, timers, queue and workers."""

    if TYPE_CHECKING:
        cfg: Config
        ex: DistributedExecutor
        ledger: Ledger
        decoder: Lane
        link: ManagerLink
        decoding: set[tuple[str, int]]
        queue: TaskQueueProxy | None
        _init_failures: int
        timers: Timers
        workers: dict[int, Worker]

        def _doom(self, w: Worker, reason: str, doomed: tuple[str, int] | None) -> None: ...
        def _put(self, task: Task, then: Any = None) -> None: ...
        def _answer_started(self, w: Any, task: Task | None) -> None: ...

    def _on_started(self, w: Worker, task_id: str, attempt: int) -> None:
        task = self._start(w, task_id, attempt)
        if w.host is not None:
            self._answer_started(w, task)

    def _start(self, w: Worker, task_id: str, attempt: int) -> Task | None:
        """Mark a task running on ``w``; returns it, or None if that attempt no longer counts."""
        w.lease = (task_id, attempt)
        w.ran_any = True
        self._init_failures = 0
        if w.lease == w.doomed:
            w.fenced = True
        task = self.ex._tasks.get(task_id)
        if task is not None and task.attempt == attempt and task.status is TaskStatus.CANCELLED:
            self._doom(w, "cancel", (task_id, attempt))  # cancelled while queued, taken meanwhile
            return None
        if task is None or task.attempt != attempt or task.status in TERMINAL or w.fenced:
            return None
        if w.doom is not None:
            return None  # taken by a worker being killed: its release puts the task back
        task.worker = w.name
        self.ledger.move(task, TaskStatus.RUNNING, worker=w.name, started_at=time.time())
        # A remote agent kills at the deadline itself; the supervisor's own kill is a backstop.
        margin = 0.0 if w.host is None else self.cfg.kill_grace + DEADLINE_MARGIN
        self.timers.set(("deadline", task_id, attempt), time.monotonic() + task.timeout + margin)
        return task

    def _on_done(self, w: Worker, message: tuple[Any, ...]) -> None:
        """An attempt ended in the worker: its outcome is unpickled on the decoder lane.

        Unpickling runs user code (``__setstate__``, an exception's ``__reduce__``) and may
        take long; the supervisor never waits for it. The task stays RUNNING meanwhile,
        its deadline no longer counting: it has stopped running.
        """
        _, task_id, attempt, ok = message[:4]
        w.lease = None
        task = self.ex._tasks.get(task_id)
        if task is None or task.attempt != attempt or task.status is not TaskStatus.RUNNING or w.fenced:
            if not ok:
                self._go_ahead(w)
            return  # a stale attempt, or one being killed: fenced out
        self.timers.discard(("deadline", task_id, attempt))
        self.decoding.add((task_id, attempt))
        if ok and _plain(message[6]):
            try:
                value = cloudpickle.loads(message[6])
            except Exception:  # noqa: BLE001 - plain data that does not load: the decoder says why
                pass
            else:
                self._on_decoded(w, task, message, ("value", value))
                return
        self.decoder.put(_decode, (self, w, task, message))

    def _on_decoded(self, w: Worker, task: Task, message: tuple[Any, ...], outcome: tuple[str, Any]) -> None:
        attempt, ok, retryable, elapsed = message[2], message[3], message[4], message[5]
        self.decoding.discard((task.task_id, attempt))
        if task.attempt == attempt and task.status is TaskStatus.RUNNING:  # not cancelled meanwhile
            kind, value = outcome
            if kind == "value":
                self.ledger.move(task, TaskStatus.COMPLETED, elapsed, result=value, finished_at=time.time())
            else:
                again = kind == "error" and retryable and task.retry_errors
                self._fail_attempt(task, w.name, value, retryable=again, elapsed=elapsed)
        if not ok:  # after any retry's put (the link keeps their order): it goes back in its place
            self.link.send(lambda: None, lambda _: self._go_ahead(w))

    def _go_ahead(self, w: Worker) -> None:
        # A worker that failed a task waits for this before taking another,
        # so that a retry is back in its place before the next take.
        try:
            w.conn.send(True)
        except OSError:
            pass  # it died meanwhile; its pidfd tells the rest

    def _fail_attempt(
        self, task: Task, worker: str, error: BaseException, retryable: bool, elapsed: float | None = None
    ) -> None:
        self.timers.discard(("deadline", task.task_id, task.attempt))
        if retryable and should_retry(task.attempt, self.cfg.max_retries):
            log.info(
                "task %s attempt %d failed on %s (%r); retrying", task.task_id, task.attempt, worker, error
            )
            task.attempt += 1
            self.ledger.move(task, TaskStatus.RETRYING, error=error)
            self._put(task)
            return
        self.ledger.move(task, TaskStatus.FAILED, elapsed, error=error, finished_at=time.time())

    def _on_deadline(self, task_id: str, attempt: int) -> None:
        task = self.ex._tasks.get(task_id)
        if task is None or task.attempt != attempt or task.status is not TaskStatus.RUNNING:
            return
        w = self._worker_named(task.worker)
        if w is not None:
            self._doom(w, "timeout", (task_id, attempt))

    def _finish_killed(self, task: Task, w: Worker) -> None:
        # Reported once the worker is dead, so "reported" means "really stopped".
        where = f"worker {w.name} (pid {w.process.pid})"
        if w.doom == "hung":
            lost = WorkerLostError(f"{where} {w.note} while running task {task.task_id}; it was killed")
            self._fail_attempt(task, w.name, lost, retryable=True)
            return
        if w.doom == "memory":
            oom = WorkerMemoryError(f"{where} {w.note} while running task {task.task_id}; it was killed")
            self._fail_attempt(task, w.name, oom, retryable=False)
            return
        started = task.record.started_at
        error = TaskTimeoutError(
            f"task {task.task_id} exceeded its {task.timeout:g} s deadline; worker {w.name} "
            f"(pid {w.process.pid}) and its process group were killed"
        )
        elapsed = time.time() - started if started else None
        self.ledger.move(
            task, TaskStatus.CANCELLED, error=error, finished_at=time.time(), execution_time=elapsed
        )

    def cancel(self, task_id: str, kill: bool = True, reply: Future[bool] | None = None) -> None:
        """Cancel a task (on the supervisor thread); ``reply`` gets True if it will not complete.

        With ``kill=False`` only a task that has not started is cancelled. A queued task is
        looked for in the outbox and the manager's queue off this thread. With ``kill`` the
        answer does not wait for that (the manager may be frozen): the task is cancelled at
        once, and a worker found to hold it meanwhile is killed, as a running task's is.
        """
        task = self.ex._tasks.get(task_id)
        if task is None or task.status in TERMINAL:
            _answer(reply, False)  # it ended (and was let go) meanwhile
            return
        if task.status is TaskStatus.RUNNING:
            self._cancel_found(task, task.attempt, task.worker, kill, reply)
            return
        outbox, queue, attempt = self.ex._outbox, self.queue, task.attempt
        assert queue is not None

        def find() -> str | None:
            with outbox.flush_lock:  # the task is then either still in the outbox or in the queue
                return "removed" if outbox.discard(task_id) else queue.cancel(task_id)

        if kill:
            self._cancel_found(task, attempt, "removed", kill, reply)
            self.link.send(find, lambda where: self._kill_late_holder(task.task_id, attempt, where))
            return
        self.link.send(find, lambda where: self._cancel_found(task, attempt, where, kill, reply))

    def _kill_late_holder(self, task_id: str, attempt: int, where: str | None) -> None:
        """A task cancelled while queued had been taken meanwhile: its worker is killed."""
        w = None if where in (None, "removed") else self._worker_named(where)
        if w is not None and w.lease == (task_id, attempt):
            self._doom(w, "cancel", (task_id, attempt))

    def _cancel_found(
        self, task: Task, attempt: int, where: str | None, kill: bool, reply: Future[bool] | None
    ) -> None:
        """``where``: "removed" from the queue, the worker holding it, or None (it ran to the end)."""
        if task.status in TERMINAL or task.attempt != attempt or where is None:
            _answer(reply, False)
            return
        holder = None if where == "removed" else where
        if holder is not None and not kill:
            _answer(reply, False)  # it has begun: without kill it runs on
            return
        if (task.task_id, attempt) in self.decoding:
            holder = None  # it has ended in its worker (its outcome is being unpickled): no kill
        if holder is not None:
            w = self._worker_named(holder)
            if w is not None:
                self._doom(w, "cancel", (task.task_id, attempt))
        self.timers.discard(("deadline", task.task_id, attempt))
        error = TaskCancelledError(f"task {task.task_id} was cancelled")
        self.ledger.move(task, TaskStatus.CANCELLED, error=error, finished_at=time.time())
        _answer(reply, True)

    def close(self, cancel_pending: bool) -> None:
        """Stop taking work; end once every task is finished (on the supervisor thread)."""
        self._closing = True
        if cancel_pending:  # only what has not begun: a task a worker holds runs to its end
            for task in list(self.ex._tasks.values()):
                if task.status in (TaskStatus.PENDING, TaskStatus.RETRYING):
                    self.cancel(task.task_id, kill=False)

    def _worker_named(self, name: str | None) -> Worker | None:
        for w in self.workers.values():
            if name in (w.name, w.key):
                return w
        return None
