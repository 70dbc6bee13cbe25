"""A cluster host: the local pool, fed from the database, one claim per idle slot.

listener thread ── NOTIFY procpool_new / procpool_cancel ──▶ events
local pool      ── a task's Future is done ──────────────────▶ events
host thread (owns ``held``):
    claim for idle slots ─▶ local pool ─▶ outcome ─▶ finish / fail / end (fenced)
    every lease/4: renew held leases (kill what it no longer holds or what is
    cancelled), sweep expired leases, beat; if it cannot renew for half a
    lease, it kills every task it runs: no attempt runs on past its lease.

Deadlines, containment, memory limits and companions are the local pool's.
The local pool never retries (``max_retries=0``): the database counts
attempts, so a retry may run on any host.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._config import check_positive
from .._errors import TaskCancelledError, TaskTimeoutError
from .._payload import dumps
from .._states import TaskPriority, TaskStatus
from .._task import Task
from .outcome import dump_error, retryable
from .store import CANCEL, NEW, Claim, Listener, Store, StoreError, masked

__all__ = ("Host",)

log = logging.getLogger("procpool.cluster")

DEFAULT_LEASE = 10.0  # seconds a claim holds a task without renewal
_CLAIM_POLL = 1.0  # seconds between claims with no notification (one may be lost in a reconnect)
_RETRY = 0.5  # seconds between attempts to reach a database that is down
_SAY_AGAIN = 30.0  # seconds between two warnings that it is still down


class LocalPool(Protocol):
    """What a host needs of its local pool (a ``DistributedExecutor``, handed in: no import cycle)."""

    def _enqueue(
        self, names: list[str], payloads: list[bytes], prio: TaskPriority, deadline: float, futures_api: bool
    ) -> Sequence[Task]: ...

    def cancel_task(self, task_id: str) -> bool: ...

    def __enter__(self) -> LocalPool: ...

    def __exit__(self, *exc: Any) -> None: ...


@dataclass(slots=True)
class _Held:
    claim: Claim
    task: Task  # the local pool's task
    outcome: tuple[str, Any] | None = None  # set once it ended and not yet written
    killed: bool = False  # killed for a lost lease: nothing to write


@dataclass(slots=True)
class _Figures:
    completed: int = 0
    failed: int = 0
    rejected: int = 0  # results the database refused (the attempt had lost its lease)
    renewed_at: float = field(default_factory=time.monotonic)


class Host:
    """Serve ``slots`` local worker processes from the cluster queue at ``dsn``.

    ``run()`` blocks until ``stop()``; ``start()`` runs it on a thread. On
    stop it claims nothing more and ends once its running tasks are written.
    ``pool_class(**pool_options)`` makes the local pool (``DistributedExecutor``).
    """

    def __init__(
        self,
        dsn: str,
        slots: int,
        pool_class: Callable[..., LocalPool],
        *,
        lease: float = DEFAULT_LEASE,
        name: str | None = None,
        result_ttl: float | None = 86400.0,
        **pool_options: Any,
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, not {slots!r}")
        if not isinstance(lease, int | float) or lease < 0.2:
            raise ValueError(f"lease must be at least 0.2 seconds, not {lease!r}")
        if pool_options.get("task_timeout") is not None:  # before the database is reached
            check_positive("task_timeout", pool_options["task_timeout"])
        self.dsn = dsn
        self.slots = slots
        self.lease = float(lease)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.result_ttl = result_ttl
        self._store = Store(dsn)
        self._pool_class = pool_class
        self._pool_options = {"max_retries": 0, **pool_options, "max_local_workers": slots}
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._held: dict[int, _Held] = {}
        self.figures = _Figures()
        self.ready = threading.Event()  # set once the local pool runs and the schema exists
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} slots={self.slots} queue={masked(self.dsn)}>"

    # -- life ------------------------------------------------------------------

    def start(self) -> None:
        name = f"procpool-host-{self.name}"
        self._thread = threading.Thread(target=self._run_logged, name=name, daemon=True)
        self._thread.start()

    def _run_logged(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self.error = exc
            log.exception("cluster host %s stopped", self.name)
            self.ready.set()

    def stop(self, wait: bool = True) -> None:
        self._stopping.set()
        self._events.put(("stop",))
        if wait and self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """Serve until ``stop()``: the body of ``python -m procpool host``."""
        self._until_reached(self._store.create_schema)
        listener = threading.Thread(target=self._listen, name="procpool-host-listen", daemon=True)
        with self._pool_class(**self._pool_options) as pool:
            self._pool = pool
            listener.start()
            self.ready.set()
            log.info("cluster host %s serves %d slots from %s", self.name, self.slots, masked(self.dsn))
            try:
                self._serve(pool)
            finally:
                self._stopping.set()
                for held in list(self._held.values()):
                    held.task.future.cancel()  # only if it is still pending locally
        listener.join()
        try:
            self._store.leave(self.name)
        except StoreError:
            pass
        self._store.close()

    def _until_reached(self, call: Any) -> Any:
        since = said = None  # when it was first found down, and last said so
        while True:
            try:
                return call()
            except StoreError as exc:
                if self._stopping.is_set():
                    raise
                now = time.monotonic()
                if said is None or now - said >= _SAY_AGAIN:
                    down = "" if since is None else f" (for {now - since:.0f} s)"
                    log.warning("cluster host %s: %s%s; trying again", self.name, exc, down)
                    said = now
                since = since or now
                self._stopping.wait(_RETRY)

    def _listen(self) -> None:
        listener = Listener(self.dsn, [NEW, CANCEL])
        try:
            while not self._stopping.is_set():
                try:
                    found = listener.wait(_CLAIM_POLL)
                except StoreError:
                    self._stopping.wait(_RETRY)
                    continue
                if listener.reconnected:
                    listener.reconnected = False
                    found.append((NEW, ""))  # what was sent meanwhile is lost: look at the table
                if found:
                    self._events.put(("notify", found))
        finally:
            listener.close()

    # -- the loop --------------------------------------------------------------

    def _serve(self, pool: LocalPool) -> None:
        step = self.lease / 4
        next_upkeep = 0.0
        claim_due = True
        while not (self._stopping.is_set() and not self._held):
            now = time.monotonic()
            if now >= next_upkeep:
                self._upkeep(now)
                next_upkeep = now + step
            if claim_due and not self._stopping.is_set():
                claim_due = not self._claim(pool)
            try:
                event = self._events.get(timeout=max(0.0, min(next_upkeep - time.monotonic(), _CLAIM_POLL)))
            except queue.Empty:
                claim_due = True
                continue
            while True:  # and every event already here: their outcomes go in one write, then one claim
                claim_due = self._handle(event, pool) or claim_due
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    break
            self._write_ended()

    def _running(self) -> int:
        return sum(1 for h in self._held.values() if h.outcome is None and not h.killed)

    def _claim(self, pool: LocalPool) -> bool:
        """Claim for every idle slot; True once the queue had fewer than that (nothing to claim)."""
        idle = self.slots - self._running()
        if idle <= 0:
            return True
        try:
            claims = self._store.claim(self.name, idle, self.lease)
        except StoreError:
            return False
        for claim in claims:
            task = pool._enqueue(
                [claim.name], [claim.payload], TaskPriority(claim.priority), claim.timeout, False
            )[0]
            self._held[claim.task_id] = _Held(claim, task)
            task.future.add_done_callback(functools.partial(self._done, claim.task_id))
        return len(claims) < idle

    def _done(self, number: int, _: object) -> None:
        self._events.put(("done", number))

    def _handle(self, event: tuple[Any, ...], pool: LocalPool) -> bool:
        """Act on one event; True if a claim is due."""
        kind = event[0]
        if kind == "done":
            held = self._held.get(event[1])
            if held is not None:
                held.outcome = _outcome(held.task)
                held.task.collected = True  # the local pool may release it
            return True
        if kind == "notify":
            due = False
            for channel, payload in event[1]:
                if channel == NEW:
                    due = True
                elif channel == CANCEL and payload.isdecimal() and int(payload) in self._held:
                    self._kill(self._held[int(payload)], pool, lost=False)
            return due
        return False

    def _kill(self, held: _Held, pool: LocalPool, lost: bool) -> None:
        if held.outcome is not None:
            return
        held.killed = held.killed or lost
        pool.cancel_task(held.task.task_id)

    def _write_ended(self) -> None:
        """Write every ended attempt: the results in one statement, the rest one by one."""
        ended = [h for h in self._held.values() if h.outcome is not None]
        for held in [h for h in ended if h.killed]:
            del self._held[held.claim.task_id]  # its lease is lost: the sweep has it (or will)
        results = [h for h in ended if not h.killed and h.outcome[0] == "result"]  # type: ignore[index]
        if results:
            batch = [(h.claim.task_id, h.claim.attempt, h.outcome[1]) for h in results]  # type: ignore[index]
            try:
                accepted = self._store.finish_many(self.name, batch)
            except StoreError:
                return  # the next upkeep tries again while the leases hold
            for held in results:
                self._written(held, held.claim.task_id in accepted)
                self.figures.completed += held.claim.task_id in accepted
        for held in ended:
            if not held.killed and held.outcome[0] != "result":  # type: ignore[index]
                self._write_failure(held)

    def _written(self, held: _Held, accepted: bool) -> None:
        if not accepted:
            self.figures.rejected += 1
            log.info("cluster host %s: task %d attempt %d had lost its lease", self.name, *held.claim[:2])
        del self._held[held.claim.task_id]

    def _write_failure(self, held: _Held) -> None:
        """Write an attempt that did not complete; kept for the next round if the database is down."""
        assert held.outcome is not None
        claim, (kind, value) = held.claim, held.outcome
        blob, text = dump_error(value)
        try:
            if kind == "cancelled":
                accepted = self._store.end(self.name, claim.task_id, claim.attempt, blob, text)
            else:
                state = self._store.fail(
                    self.name, claim.task_id, claim.attempt, blob, text, retryable(value, claim.retry_errors)
                )
                accepted = state is not None
            self.figures.failed += accepted
        except StoreError:
            return  # the next upkeep tries again while the lease holds
        self._written(held, accepted)

    def _upkeep(self, now: float) -> None:
        """Renew leases, write what could not be written, sweep and beat; kill what is no longer held."""
        self._write_ended()
        pairs = [(h.claim.task_id, h.claim.attempt) for h in self._held.values() if not h.killed]
        try:
            kept, cancelled = self._store.renew(self.name, pairs, self.lease)
            self.figures.renewed_at = now
        except StoreError:
            if now - self.figures.renewed_at > self.lease / 2:
                for held in self._held.values():
                    self._kill(held, self._pool, lost=True)
            return
        for held in list(self._held.values()):
            pair = (held.claim.task_id, held.claim.attempt)
            if pair not in kept and not held.killed:
                self._kill(held, self._pool, lost=True)
            elif held.claim.task_id in cancelled:
                self._kill(held, self._pool, lost=False)
        try:
            self._store.sweep(self.result_ttl)
            self._store.beat(
                self.name, self.slots, self._running(), self.figures.completed, self.figures.failed
            )
        except StoreError:
            pass


def _outcome(task: Task) -> tuple[str, Any]:
    record = task.record
    if record.status is TaskStatus.COMPLETED:
        try:
            return "result", dumps(record.result)
        except Exception as exc:  # noqa: BLE001 - the task fails with a readable error
            return "error", TypeError(f"cannot pickle the result of task {record.name}: {exc}")
    error = record.error or TaskCancelledError(f"task {record.name} was cancelled")
    if record.status is TaskStatus.CANCELLED or isinstance(error, TaskTimeoutError):
        return "cancelled", error
    return "error", error
