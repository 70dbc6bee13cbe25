"""Task events on the supervisor thread: started, done, deadlines, cancels, deaths, retries.

    worker slots    ──▶ TaskEvents ── Ledger.move (the one writer of task state)
    worker messages ──▶     │
    worker deaths   ──▶     │ ── kill(w, why, attempt): the worker set's kill ladder
    deadline timers ──▶     │ ── link: put, release and cancel in the manager's queue
                            └── decoder lane: results unpickled off this thread

An attempt counts only while it is the task's current one and its worker is
not fenced (see ``_supervisor``).

A local worker sends no "started": it writes each start in its slot before
running the task, and ``scan`` reads the slots every few milliseconds while a
worker with no known task may be handed a queued one. A start not read yet is
taken from the "done" that ends it, or from the slot once the worker has died;
the deadline counts from the time the worker wrote. (A remote slot's link still says "started": its agent
needs the deadline.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import cloudpickle

from ._callbacks import Lane
from ._config import Config
from ._errors import RemoteTaskError, TaskCancelledError, TaskTimeoutError, WorkerLostError, WorkerMemoryError
from ._ledger import Ledger, rebuild_error
from ._manager_link import ManagerLink
from ._metrics import SlotStart, read_start
from ._outbox import Outbox
from ._payload import loads_gently
from ._remote.slots import DEADLINE_MARGIN
from ._scheduling import Timers, should_retry
from ._states import TERMINAL, TaskStatus, WorkerState
from ._task import Task
from ._worker import needs_go_ahead
from ._workers import Worker, WorkerSet

__all__ = ("TaskEvents",)

log = logging.getLogger(__name__)


# Opcodes through which unpickling can reach code (a global, a reduce, a build, an
# extension code). A pickle with none of these bytes anywhere holds only plain data
# (None, numbers, strings, containers of them): it is unpickled on the spot, at no risk.
_CODE_OPCODES = b"c\x93Rbio\x81\x92\x82\x83\x84PQ"
_PLAIN_MAX = 4096  # bytes; larger results go to the decoder lane whatever they hold
_GENTLE = 1 << 20  # bytes; a result this big is unpickled a slice at a time (see _payload)


def _plain(blob: bytes | None) -> bool:
    if blob is None or len(blob) > _PLAIN_MAX:
        return False
    return len(blob.translate(None, _CODE_OPCODES)) == len(blob)


def _decode(item: tuple[TaskEvents, Worker, Task, tuple[Any, ...]]) -> None:
    """On the decoder lane: the attempt's value or error, handed back to the supervisor."""
    events, w, task, message = item
    _, _, _, ok, _, _, blob, type_name, text, tb = message
    outcome: tuple[str, Any]
    if ok:
        try:
            outcome = ("value", cloudpickle.loads(blob) if len(blob) < _GENTLE else loads_gently(blob))
        except BaseException as exc:  # noqa: BLE001 - the task's failure, not ours
            why = f"the result could not be unpickled: {exc}"
            outcome = ("bad", RemoteTaskError(type(exc).__name__, why, ""))
    else:
        outcome = ("error", rebuild_error(blob, type_name, text, tb))
    del item, blob
    events.call(lambda: events._on_decoded(w, task, message, outcome))


def _answer(reply: Future[bool] | None, value: bool) -> None:
    if reply is not None:
        reply.set_result(value)


class TaskEvents:
    """What happens to tasks, on the supervisor thread; see the module docstring."""

    def __init__(
        self, cfg: Config, ledger: Ledger, tasks: dict[str, Task], workers: WorkerSet, timers: Timers,
        link: ManagerLink, outbox: Callable[[], Outbox], call: Callable[[Callable[[], None]], bool],
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.ledger = ledger
        self.tasks = tasks  # the executor's: submitters add to it, the ledger lets go of finished ones
        self.workers = workers
        self.timers = timers
        self.link = link
        self._outbox = outbox
        self.call = call  # Supervisor.call: back onto the supervisor thread
        self.decoder = Lane("procpool-decoder")  # unpickles what workers send back: user code
        self.decoding: set[tuple[str, int]] = set()  # attempts that ended, their outcome on the decoder
        self.scan_wanted = False  # a worker holds a task cancelled meanwhile: scan until it starts it

    def close(self) -> None:
        self.decoder.close()

    # -- the kill ladder, and the queue ----------------------------------------

    def kill(self, w: Worker, reason: str, attempt: tuple[str, int] | None) -> None:
        """Kill ``w`` (running ``attempt``); it takes nothing more from the queue.

        It may already hold the next task (taken, its "started" not read, or not sent):
        that one goes back in its place.
        """
        if self.workers.doom(w, reason, attempt):
            self.link.send(lambda q: q.release(w.key), lambda lease: self._released(w, lease))

    def retire(self, w: Worker) -> None:
        """``w`` takes no more tasks, and ends after its current one."""
        if self.workers.retire(w):
            key = w.key
            self.link.send(lambda q: q.retire(key))  # off this thread: the manager may be frozen

    def _released(self, w: Worker, lease: tuple[str, int] | None) -> None:
        """The manager's answer to ``release``: the attempt it had handed ``w``, if any.

        It is settled once ``w`` is dead and all it sent has been read, whichever comes
        last: only then does "its start was never read" mean "it never started".
        """
        w.released, w.release_known = lease, True
        if w.state is WorkerState.GONE:
            self._settle_released(w)

    def _settle_released(self, w: Worker) -> None:
        lease = w.released
        task = None if lease is None else self.tasks.get(lease[0])
        if lease is None or task is None or task.attempt != lease[1]:
            return
        if task.status in (TaskStatus.PENDING, TaskStatus.RETRYING):
            self._put(task)  # handed out and never started: back in its place, no attempt counted
        # Started: it was w's lease when it died, and on_death settled it.

    def _put(self, task: Task) -> None:
        """Queue the task's current attempt (a retry keeps its place: same priority and seq)."""
        assert task.payload is not None
        item = (int(task.priority), task.seq, task.task_id, task.attempt, task.payload)
        self.link.send(lambda q: q.put(*item))

    # -- messages from workers ---------------------------------------------------

    def on_message(self, w: Worker, message: tuple[Any, ...]) -> None:
        if message[0] == "started":  # from a remote slot's link
            task = self._start(w, message[1], message[2], time.monotonic())
            self._answer_started(w, task)
        elif message[0] == "done":
            if (message[1], message[2]) != w.lease and w.host is None:  # its start may not be read yet
                began = time.monotonic() - message[5]
                self._start(w, message[1], message[2], began, live=False, lease=w.lease is None)
            self._on_done(w, message)
        elif message[0] == "init_failed":  # at start-up only: rebuilt here, where a death needs it
            w.init_error = rebuild_error(*message[1:])
        else:  # "timedout" or "lost", from a remote slot's link
            self._on_remote_end(w, message)

    def _start(
        self, w: Worker, task_id: str, attempt: int, began: float, live: bool = True, lease: bool = True
    ) -> Task | None:
        """Mark a task running on ``w`` since ``began`` (monotonic), unless it is already;
        returns it, or None if that attempt no longer counts.

        ``live=False``: the attempt is known to have ended (its "done" came, or the worker
        died), so no deadline is set and a cancelled one needs no kill. ``lease=False``: it
        is not ``w``'s latest start (its slot already shows the next one).
        """
        if lease:
            self.workers.started(w, (task_id, attempt))
        task = self.tasks.get(task_id)
        if task is not None and task.attempt == attempt and task.status is TaskStatus.CANCELLED:
            if live:
                self.kill(w, "cancel", (task_id, attempt))  # cancelled while queued, taken meanwhile
            return None
        stale = task is None or task.attempt != attempt or task.status in TERMINAL
        if stale or w.killed_for == (task_id, attempt):
            return None  # or the attempt its worker is being killed for: fenced out
        assert task is not None
        if task.status is TaskStatus.RUNNING:
            return task  # its start was read before (from the slot)
        # A worker being killed for another attempt may still run this one (it was handed it
        # first): it counts, and if the worker dies first, on_death retries it.
        now = time.monotonic()
        began = min(began, now)
        self.ledger.start(task, w.name, time.time() - (now - began))
        if live:
            # A remote agent kills at the deadline itself; the supervisor's own kill is a backstop.
            margin = 0.0 if w.host is None else self.cfg.kill_grace + DEADLINE_MARGIN
            self.timers.set(("deadline", task_id, attempt), began + task.timeout + margin)
        return task

    def scan(self) -> bool:
        """Take the starts local workers wrote in their slots since the last look.

        True while a start may come that no message will announce: a worker that runs
        no task known here may be handed a queued one, or holds one cancelled meanwhile.
        (A worker whose task is known starts its next only after that task's "done".)
        """
        self.scan_wanted = False
        free = awaited = False
        for w in self.workers:
            if w.host is None and w.state is not WorkerState.GONE:
                self.refresh(w)
                free = free or w.lease is None
                awaited = awaited or w.awaited is not None
        return awaited or (free and self.ledger.pending() > 0)

    def refresh(self, w: Worker, dead: bool = False) -> SlotStart | None:
        """Take a start that ``w`` wrote in its slot if it is new to the supervisor.

        Of a dead worker the last start counts even if it no longer says running: its
        "done" was not read (it died before sending it, or halfway), so the attempt died
        with it. Returns what the slot says (None if torn, or ``w`` is remote).
        """
        buf = self.ledger.metrics.shm.buf
        if w.host is not None or buf is None:
            return None
        start = read_start(buf, w.slot)
        if start is None or start.pid != w.pid or not start.attempt:
            return start  # torn, or written by its forerunner, or no task started yet
        attempt = (start.task_id, start.attempt)
        if attempt != w.lease and attempt != w.finished and (start.running or dead):
            self._start(w, *attempt, start.started, live=not dead)
        if w.awaited is not None and w.awaited in (w.lease, w.finished):
            w.awaited = None
        return start

    def _on_done(self, w: Worker, message: tuple[Any, ...]) -> None:
        """An attempt ended in the worker: its outcome is unpickled on the decoder lane.

        Unpickling runs user code (``__setstate__``, an exception's ``__reduce__``) and may
        take long; the supervisor never waits for it. The task stays RUNNING meanwhile,
        its deadline no longer counting: it has stopped running.
        """
        _, task_id, attempt, ok = message[:4]
        w.finished = (task_id, attempt)
        if w.lease == w.finished:  # else its slot already shows the next start
            w.lease = None
        task = self.tasks.get(task_id)
        stale = task is None or task.attempt != attempt or task.status is not TaskStatus.RUNNING
        if stale or w.killed_for == (task_id, attempt):
            if needs_go_ahead(message):
                self._go_ahead(w)
            return  # a stale attempt, or one being killed: fenced out
        assert task is not None
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
        attempt, retryable, elapsed = message[2], message[4], message[5]
        self.decoding.discard((task.task_id, attempt))
        if task.attempt == attempt and task.status is TaskStatus.RUNNING:  # not cancelled meanwhile
            kind, value = outcome
            if kind == "value":
                self.ledger.move(task, TaskStatus.COMPLETED, elapsed, result=value, finished_at=time.time())
            else:
                again = kind == "error" and retryable and task.retry_errors
                self._fail_attempt(task, w.name, value, retryable=again, elapsed=elapsed)
        if needs_go_ahead(message):  # after any retry's put (the link keeps their order): in its place
            self.link.send(lambda _: None, lambda _: self._go_ahead(w))

    def _go_ahead(self, w: Worker) -> None:
        # A worker whose task raised waits for this before it asks for another,
        # so that a retry is back in its place first.
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

    def on_deadline(self, task_id: str, attempt: int) -> None:
        task = self.tasks.get(task_id)
        if task is None or task.attempt != attempt or task.status is not TaskStatus.RUNNING:
            return
        w = self.workers.named(task.worker)
        if w is not None:
            self.kill(w, "timeout", (task_id, attempt))

    # -- deaths --------------------------------------------------------------------

    def on_death(self, w: Worker, exitcode: int | None) -> int:
        """Settle the tasks of a dead worker (all it sent has been read); 1 if one died with it.

        The attempt it was killed for ends as its kill says; one it had started otherwise
        is retried; one the manager had handed it that it never started goes back in its
        place (once the manager has said which: ``_released``).
        """
        self.refresh(w, dead=True)
        w.awaited = None
        lost = 0
        if w.killed_for is not None:
            task = self.tasks.get(w.killed_for[0])
            if task is not None and task.attempt == w.killed_for[1] and task.status not in TERMINAL:
                self._finish_killed(task, w)
            lost = 1
        if w.lease is not None and w.lease != w.killed_for:
            lost = max(lost, self._lost(w, w.lease, exitcode))
        if w.kill_reason is None:  # not killed by us: ask the manager what it had handed it
            self.link.send(lambda q: q.release(w.key), lambda lease: self._released(w, lease))
        elif w.release_known:
            self._settle_released(w)
        return lost

    def _lost(self, w: Worker, lease: tuple[str, int], exitcode: int | None) -> int:
        """Retry (or fail) the attempt a dead worker had started; returns 1 if it was lost with it."""
        if lease in self.decoding:
            return 0  # none, or it ended before the worker did (its outcome is being unpickled)
        task = self.tasks.get(lease[0])
        if task is None or task.attempt != lease[1] or task.status in TERMINAL:
            return 0  # it finished before the worker ended
        retries = self.cfg.max_retries + 1
        error = WorkerLostError(
            f"worker {w.name} (pid {w.pid}) {w.describe_exit(exitcode)} while running "
            f"task {task.task_id} (attempt {task.attempt} of {retries})"
        )
        self._fail_attempt(task, w.name, error, retryable=True)
        return 1

    def _finish_killed(self, task: Task, w: Worker) -> None:
        # Reported once the worker is dead, so "reported" means "really stopped".
        where = f"worker {w.name} (pid {w.pid})"
        if w.kill_reason == "hung":
            lost = WorkerLostError(f"{where} {w.note} while running task {task.task_id}; it was killed")
            self._fail_attempt(task, w.name, lost, retryable=True)
            return
        if w.kill_reason == "memory":
            oom = WorkerMemoryError(f"{where} {w.note} while running task {task.task_id}; it was killed")
            self._fail_attempt(task, w.name, oom, retryable=False)
            return
        started = task.started_at
        error = TaskTimeoutError(
            f"task {task.task_id} exceeded its {task.timeout:g} s deadline; worker {w.name} "
            f"(pid {w.pid}) and its process group were killed"
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
        task = self.tasks.get(task_id)
        if task is None or task.status in TERMINAL:
            _answer(reply, False)  # it ended (and was let go) meanwhile
            return
        if task.status is TaskStatus.RUNNING:
            self._cancel_found(task, task.attempt, task.worker, kill, reply)
            return
        outbox, attempt, seq = self._outbox(), task.attempt, task.seq

        def find(queue: Any) -> str | None:
            # Not in the outbox: then it was sent, and the manager waits until it has it.
            return "removed" if outbox.discard(task_id) else queue.cancel(task_id, seq)

        if kill:
            self._cancel_found(task, attempt, "removed", kill, reply)
            self.link.send(find, lambda where: self._kill_late_holder(task.task_id, attempt, where))
            return
        self.link.send(find, lambda where: self._cancel_found(task, attempt, where, kill, reply))

    def _kill_late_holder(self, task_id: str, attempt: int, where: str | None) -> None:
        """A task cancelled while queued had been taken meanwhile: its worker is killed."""
        w = None if where in (None, "removed") else self.workers.named(where)
        if w is None:
            return
        self.refresh(w)  # a start read here is of a cancelled task: _start kills it
        if w.lease == (task_id, attempt):
            self.kill(w, "cancel", (task_id, attempt))
        elif w.finished != (task_id, attempt) and w.host is None:
            w.awaited = (task_id, attempt)  # not started yet: the scan goes on until it is
            self.scan_wanted = True

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
            w = self.workers.named(holder)
            if w is not None:
                self.kill(w, "cancel", (task.task_id, attempt))
        self.timers.discard(("deadline", task.task_id, attempt))
        error = TaskCancelledError(f"task {task.task_id} was cancelled")
        self.ledger.move(task, TaskStatus.CANCELLED, error=error, finished_at=time.time())
        _answer(reply, True)

    def cancel_pending(self) -> None:
        """Cancel what has not begun: a task a worker holds runs to its end."""
        for task in list(self.tasks.values()):
            if task.status in (TaskStatus.PENDING, TaskStatus.RETRYING):
                self.cancel(task.task_id, kill=False)

    # -- remote slots' links ---------------------------------------------------------

    def _answer_started(self, w: Worker, task: Task | None) -> None:
        """Tell a link the deadline of the task it started, or None to skip it (it ended meanwhile)."""
        try:
            w.conn.send(None if task is None else task.timeout)
        except OSError:
            pass  # it died meanwhile; its pidfd tells the rest

    def _on_remote_end(self, w: Worker, message: tuple[Any, ...]) -> None:
        """A task that the agent killed at its deadline ("timedout") or whose process died ("lost")."""
        kind, task_id, attempt, elapsed, detail = message
        w.lease = None
        task = self.tasks.get(task_id)
        live = task is not None and task.attempt == attempt and task.status is TaskStatus.RUNNING
        if live and w.killed_for != (task_id, attempt):
            assert task is not None and w.host is not None
            self.timers.discard(("deadline", task_id, attempt))
            where = f"{w.name} on {w.host.address}"
            if kind == "timedout":
                how = "SIGKILL after SIGTERM" if detail else "SIGTERM"
                timed_out = TaskTimeoutError(
                    f"task {task_id} exceeded its {task.timeout:g} s deadline; its process group on "
                    f"{where} was killed ({how})"
                )
                end = time.time()
                self.ledger.move(
                    task, TaskStatus.CANCELLED, error=timed_out, finished_at=end, execution_time=elapsed
                )
            else:
                retries = self.cfg.max_retries + 1
                error = WorkerLostError(
                    f"the worker process of {where} {detail} while running task {task_id} "
                    f"(attempt {attempt} of {retries})"
                )
                self._fail_attempt(task, w.name, error, retryable=True)
        self.link.send(lambda _: None, lambda _: self._go_ahead(w))  # after any retry's put
