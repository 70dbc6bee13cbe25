"""``DistributedExecutor(queue="postgresql://...")``: the seed API over the cluster's database.

user threads ── submit (one INSERT per batch) ──▶ procpool_tasks ◀── hosts claim and finish
watch thread ── LISTEN procpool_done, and a poll of what it waits for ──▶ Futures, callbacks
stats thread ── counts by state, priority and host ──▶ the local shared-memory block
in-process host (max_local_workers > 0) ── serves that many slots, as ``procpool host`` does

Tasks outlive their submitter: any executor on the same queue reads a task
by id. ``get_stats()`` reads the block the stats thread writes (its
``cluster_age`` says how old), so it makes no call at all.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .._callbacks import Callbacks, Lane
from .._config import check_positive
from .._errors import ExecutorShutdownError, TaskCancelledError
from .._metrics import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, MetricsBlock
from .._payload import PYTHON, needs_same_python
from .._snapshot import read_snapshot
from .._states import TaskPriority, TaskStatus
from .._task import CancelRef, TaskFuture, TaskRecord
from .host import DEFAULT_LEASE, Host, LocalPool
from .outcome import load_error, load_result
from .remote import RemoteHosts
from .store import DONE, Listener, Row, Store, StoreError, check_dsn, masked

__all__ = ("ClusterMode",)

log = logging.getLogger("procpool.cluster")

_POLL = 1.0  # seconds between looks at the table for awaited tasks (a notification may be lost)
_STATS_EVERY = 0.5  # seconds between copies of the cluster's counts into the block
_STATS_SHARE = 20  # the counts' refresh waits at least this many times what they took
_HOST_GONE = 30.0  # seconds after its last beat a host no longer counts as serving the queue
_EVENTS = {TaskStatus.COMPLETED: "task_complete", TaskStatus.FAILED: "task_failed"}
_SLOT = {"pending": PENDING, "retrying": PENDING, "running": RUNNING, "completed": COMPLETED}
_SLOT |= {"failed": FAILED, "cancelled": CANCELLED}


class _Submitted(NamedTuple):
    task_id: str
    future: TaskFuture


class ClusterMode:
    """What cluster mode changes in ``DistributedExecutor``; ``DistributedExecutor(queue=dsn)`` makes one.

    A mixin: ``procpool._executor`` puts it in front of ``DistributedExecutor``
    (so this module needs nothing of that one), whose ``_prepare``, ``submit``,
    ``map``, ``run_async`` and context manager serve it unchanged.

    Args:
        queue: the PostgreSQL DSN (its password never reaches a log, a repr
            or the stats; TLS settings pass through it).
        max_local_workers: slots this process serves itself (0: submit only).
        task_timeout, max_retries: defaults for the tasks it submits.
        lease: seconds a host's claim lasts without renewal (the in-process host's).
        result_ttl: seconds the database keeps an ended task (hosts drop older ones).
        pool_options: for the in-process host's local pool.
    """

    if TYPE_CHECKING:
        _local: Callable[..., LocalPool]  # the local pool's class, for the in-process host

        def _prepare(
            self, items: Sequence[tuple[Any, Any, Any]], priority: object, timeout: float | None, where: str
        ) -> tuple[TaskPriority, float, list[str], list[bytes]]: ...

        def _shutdown_at_exit(self) -> None: ...

        def _check_owner(self) -> None: ...

    def __init__(
        self,
        max_local_workers: int = 3,
        task_timeout: float = 300,
        enable_remote: bool = False,
        max_retries: int = 3,
        *,
        queue: str,
        lease: float = DEFAULT_LEASE,
        result_ttl: float | None = 86400.0,
        max_workers: int | None = None,
        **pool_options: Any,
    ) -> None:
        if max_workers is not None:
            max_local_workers = max_workers
        if isinstance(max_local_workers, bool) or not isinstance(max_local_workers, int):
            raise TypeError(f"max_local_workers must be an int, not {type(max_local_workers).__name__}")
        if max_local_workers < 0:
            raise ValueError(f"max_local_workers must be at least 0, not {max_local_workers}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
        if enable_remote:
            raise ValueError("enable_remote is for the single-machine queue: in cluster mode add hosts")
        local_options = set(inspect.signature(self._local).parameters)
        unknown = sorted(set(pool_options) - local_options)
        if unknown:
            raise TypeError(f"DistributedExecutor() got unexpected keyword arguments: {', '.join(unknown)}")
        lease = check_positive("lease", lease)
        self._dsn = check_dsn(queue)
        self._default_timeout = check_positive("task_timeout", task_timeout)
        self._max_retries = max_retries
        self._owner = os.getpid()
        self._submitter = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._submit_lock = threading.Lock()
        self._closed: BaseException | None = None
        self._final_stats: dict[str, Any] | None = None
        self._callbacks = Callbacks()
        self._futures_lane = Lane("procpool-futures")
        self._cancel_ref: CancelRef = weakref.WeakMethod(self._cancel)
        self._waiting: dict[int, TaskFuture] = {}  # tasks someone awaits, by database id
        self._unreported: set[int] = set()  # tasks it submitted whose end it has not told callbacks of
        self._waiting_lock = threading.Lock()
        self._store = Store(self._dsn)
        self._store.create_schema()  # and the database is reachable: a wrong DSN fails here
        self._counting = Store(self._dsn)  # the stats thread's own: a long count holds no submit up
        self._metrics = MetricsBlock(0)
        self._cluster: dict[str, Any] = {"hosts": {}, "age": None}
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, name="procpool-cluster-watch", daemon=True),
            threading.Thread(target=self._mirror, name="procpool-cluster-stats", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._lease = lease
        self._remote = RemoteHosts(self._dsn)
        self._host: Host | None = None
        if max_local_workers:
            self._host = Host(
                self._dsn, max_local_workers, self._local, lease=lease, result_ttl=result_ttl,
                task_timeout=task_timeout, **pool_options,
            )  # fmt: skip
            self._host.start()
            self._host.ready.wait()
            if self._host.error is not None:
                error = self._host.error
                self.shutdown()
                raise error
        self._shutdown_at_exit()

    def __repr__(self) -> str:
        state = "running" if self._closed is None else "closed"
        return f"<DistributedExecutor {state} queue={masked(self._dsn)}>"

    @property
    def _task_timeout(self) -> float:
        return self._default_timeout

    # -- submitting ------------------------------------------------------------

    def _submit_many(
        self,
        items: Sequence[tuple[Any, Any, Any]],
        priority: object,
        timeout: float | None,
        where: str,
        futures_api: bool = False,
    ) -> list[_Submitted]:
        prio, deadline, names, payloads = self._prepare(items, priority, timeout, where)
        rows = [
            (int(prio), name, payload, deadline, self._max_retries, not futures_api)
            for name, payload in zip(names, payloads, strict=True)
        ]
        with self._submit_lock:
            if self._closed is not None:
                raise self._closed
            pythons = [PYTHON if needs_same_python(payload) else None for payload in payloads]
            ids = self._store.submit(rows, self._submitter, pythons)
            with self._waiting_lock:
                submitted = [_Submitted(_task_id(i), self._await(i, kills=not futures_api)) for i in ids]
                self._unreported.update(ids)
        return submitted

    def _await(self, number: int, kills: bool = True) -> TaskFuture:
        """The Future of a task this executor waits for (call with ``_waiting_lock``)."""
        future = self._waiting.get(number)
        if future is None:
            future = self._waiting[number] = TaskFuture(_task_id(number), self._cancel_ref, kills=kills)
        return future

    # -- results ---------------------------------------------------------------

    def _row(self, task_id: str) -> Row:
        self._check_owner()
        number = _number(task_id)
        rows = self._store.rows([number]) if number is not None else []
        if not rows:
            raise KeyError(_unknown(task_id))
        return rows[0]

    def _row_number(self, task_id: str) -> int:
        number = _number(task_id)
        assert number is not None  # only after _row(task_id) found it
        return number

    def get_task(self, task_id: str) -> TaskRecord:
        return _record(self._row(task_id))

    def future(self, task_id: str) -> concurrent.futures.Future[Any]:
        return self._futures([task_id])[0]

    def _futures(self, task_ids: Sequence[str]) -> list[TaskFuture]:
        """The Futures of these tasks, with one look at the table (KeyError for an unknown id)."""
        self._check_owner()
        numbers = [_number(task_id) for task_id in task_ids]
        rows = {r.task_id: r for r in self._store.rows([n for n in numbers if n is not None])}
        with self._waiting_lock:
            for task_id, number in zip(task_ids, numbers, strict=True):
                if number not in rows:
                    raise KeyError(_unknown(task_id))
            futures = [self._await(n) for n in numbers]  # type: ignore[arg-type]
        for row in rows.values():
            if row.state in _ENDED:
                self._settle(row)
        return futures

    def get_task_result(self, task_id: str, wait: bool = True, timeout: float | None = 30) -> Any:
        row = self._row(task_id)
        if row.state not in _ENDED:
            if not wait:
                return None
            future = self.future(task_id)
            try:
                future.result(timeout)
            except TimeoutError:
                if not future.done():
                    raise TimeoutError(f"task {task_id} has not finished after {timeout} s") from None
            except BaseException:  # noqa: BLE001 - the row says what to raise
                pass
            row = self._row(task_id)
        record = _record(row)
        if record.status is TaskStatus.COMPLETED:
            return record.result
        assert record.error is not None
        raise record.error

    def wait_for_tasks(self, task_ids: Sequence[str], timeout: float | None = 60) -> list[Any]:
        if isinstance(task_ids, str):
            raise TypeError(f"task_ids must be a list of ids, not the str {task_ids!r}: pass [{task_ids!r}]")
        futures = self._futures(task_ids)
        _, pending = concurrent.futures.wait(futures, timeout)
        if pending:
            ids = [t for t, f in zip(task_ids, futures, strict=True) if f in pending]
            raise TimeoutError(f"{len(ids)} of {len(futures)} tasks unfinished after {timeout} s: {ids[:10]}")
        numbers = [self._row_number(t) for t in task_ids]
        rows = {r.task_id: r for r in self._store.rows(numbers)}
        records = [_record(rows[n]) for n in numbers]
        return [r.result if r.status is TaskStatus.COMPLETED else r.error for r in records]

    def cancel_task(self, task_id: str) -> bool:
        row = self._row(task_id)
        return row.state not in _ENDED and self._cancel(task_id, kill=True)

    def _cancel(self, task_id: str, kill: bool) -> bool:
        number = _number(task_id)
        return number is not None and self._store.cancel(number, running=kill)

    # -- hosts over SSH ------------------------------------------------------------

    def add_remote_worker(
        self,
        host: str,
        port: int = 22,
        worker_type: str = "host",
        credentials: dict[str, str] | None = None,
        *,
        slots: int = 1,
        python: str = "python3",
        connect_timeout: float = 10.0,
        known_hosts: str | None = None,
        accept_unknown_host: bool = False,
        ship_package: bool = False,
        lease: float | None = None,
    ) -> list[str]:
        """Start ``procpool host`` on a machine over SSH, serving ``slots`` slots from this queue.

        The host is checked as a remote worker is (its key, the login, the
        Python, procpool and cloudpickle versions, and psycopg there);
        ``ship_package`` copies this procpool with psycopg into a venv there.
        The DSN travels on the host's stdin, so it must reach the database
        from that machine. The host ends with this executor (after its running
        tasks) or with ``remove_remote_worker``; "remote_ssh" means the same here.

        Returns:
            The host's name, as ``get_stats()["workers"]`` and task records show it.
        """
        if self._closed is not None:
            raise self._closed
        name = self._remote.add(
            host, port, worker_type, credentials, slots=slots, python=python,
            connect_timeout=connect_timeout, known_hosts=known_hosts,
            accept_unknown_host=accept_unknown_host, ship_package=ship_package,
            lease=self._lease if lease is None else check_positive("lease", lease),
        )  # fmt: skip
        return [name]

    def remove_remote_worker(self, host: str, port: int = 22, timeout: float | None = None) -> None:
        """End a host this executor started: it claims no more, writes its running tasks and exits."""
        self._remote.remove(host, port, timeout)

    # -- the watch thread --------------------------------------------------------

    def _watch(self) -> None:
        listener = Listener(self._dsn, [DONE])
        next_poll = 0.0
        try:
            while not self._stopped.is_set():
                try:
                    found = listener.wait(max(0.0, next_poll - time.monotonic()))
                    with self._waiting_lock:
                        if time.monotonic() >= next_poll or listener.reconnected:
                            wanted = list(self._waiting)
                            next_poll, listener.reconnected = time.monotonic() + _POLL, False
                        else:
                            ids = (int(p) for c, p in found if p.isdecimal())
                            wanted = [i for i in ids if i in self._waiting]
                    if wanted:
                        for row in self._store.rows(wanted, ended_only=True):
                            self._settle(row)
                except StoreError:
                    self._stopped.wait(0.5)
        finally:
            listener.close()

    def _settle(self, row: Row) -> None:
        with self._waiting_lock:
            future = self._waiting.pop(row.task_id, None)
            owed = row.task_id in self._unreported
            self._unreported.discard(row.task_id)
        if future is None:
            return
        record = _record(row)
        self._futures_lane.put(_settle_future, (future, record))
        if owed:  # once per task, by the executor that submitted it
            self._callbacks.fire(_EVENTS.get(record.status, "task_cancelled"), record)

    # -- stats -------------------------------------------------------------------

    def _mirror(self) -> None:
        wait = 0.0
        while not self._stopped.wait(wait):
            start = time.monotonic()
            try:
                self._refresh()
            except StoreError:
                wait = _STATS_EVERY
                continue
            # Counting is a scan of the table: on a big one it runs less often, so that it
            # keeps the database busy for a twentieth of the time at most.
            wait = max(_STATS_EVERY, _STATS_SHARE * (time.monotonic() - start))

    def _refresh(self) -> None:
        """Copy the cluster's counts into the block, and its hosts' figures beside it."""
        counts = self._counting.counts()
        counters = self._metrics.counters
        with self._metrics.header_lock:
            counters.states = [0] * 5
            for state, number in counts["states"].items():
                counters.states[_SLOT[state]] += number
            counters.total = sum(counters.states)
            counters.depth = [counts["depth"].get(p, 0) for p in range(4)]
        self._metrics.publish()
        hosts = {
            name: {"type": "host", "active": age < _HOST_GONE, "slots": slots, "busy": busy,
                   "completed": done, "failed": failed, "load": busy / slots if slots else 0.0,
                   "seen_seconds_ago": round(float(age), 3)}
            for name, slots, busy, done, failed, age in counts["hosts"]
        }  # fmt: skip
        self._cluster = {"hosts": hosts, "age": time.monotonic()}

    def get_stats(self) -> dict[str, Any]:
        if self._final_stats is not None:
            return dict(self._final_stats)
        buf = self._metrics.shm.buf
        assert buf is not None
        stats = read_snapshot(buf)
        cluster = self._cluster
        hosts = cluster["hosts"]
        stats["workers"] = {name: dict(view) for name, view in hosts.items()}
        stats["total_workers"] = sum(view["slots"] for view in hosts.values())
        stats["active_workers"] = sum(view["busy"] for view in hosts.values())
        stats["metrics_block"] = self._metrics.name
        stats["cluster_age"] = None if cluster["age"] is None else time.monotonic() - cluster["age"]
        return stats

    # -- ending ------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; with ``wait``, block until the tasks this executor awaits have ended.

        It waits while some host serves the queue (one beat within 30 s, or
        its own slots); otherwise its queued tasks stay in the database for
        the next host, and any executor on the queue can read them by id.
        ``cancel_futures`` cancels the ones it awaits that have not started.
        """
        if os.getpid() != self._owner:
            return
        with self._submit_lock:
            if self._closed is None:
                self._closed = ExecutorShutdownError("cannot schedule new futures after shutdown")
        if cancel_futures:
            with self._waiting_lock:
                waiting = list(self._waiting.values())
            for future in waiting:
                future.cancel()
        if wait and not self._on_own_thread():
            self._finish()
        else:
            threading.Thread(target=self._finish, name="procpool-shutdown", daemon=True).start()

    def _served(self) -> bool:
        hosts = self._cluster["hosts"].values()
        return self._host is not None or any(view["seen_seconds_ago"] < _HOST_GONE for view in hosts)

    def _on_own_thread(self) -> bool:
        return self._futures_lane.is_current() or self._callbacks.lane.is_current()

    def _finish(self) -> None:
        with self._submit_lock:
            if self._final_stats is not None:
                return
        while True:  # the tasks it awaits, while some host serves them: they stay queued otherwise
            with self._waiting_lock:
                waiting = list(self._waiting.values())
            if not waiting or not self._served():
                break
            concurrent.futures.wait(waiting, _POLL)
        self._remote.close()
        if self._host is not None:
            self._host.stop()
        self._stopped.set()
        for thread in self._threads:
            thread.join()
        self._futures_lane.close()
        self._callbacks.close()
        try:
            self._refresh()  # the final stats: as the cluster has them now
        except StoreError:
            pass
        stats = self.get_stats()
        with self._submit_lock:
            self._final_stats = stats
        self._store.close()
        self._counting.close()
        self._metrics.close()


_ENDED = ("completed", "failed", "cancelled")


def _unknown(task_id: object) -> str:
    return f"unknown task id {task_id!r} (in cluster mode an ended task is kept for result_ttl)"


def _task_id(number: int) -> str:
    return f"task-{number}"


def _number(task_id: object) -> int | None:
    if isinstance(task_id, str) and task_id.startswith("task-") and task_id[5:].isdecimal():
        return int(task_id[5:])
    return None


def _record(row: Row) -> TaskRecord:
    status = TaskStatus(row.state)
    result = load_result(row.result) if status is TaskStatus.COMPLETED else None
    failed = status is not TaskStatus.COMPLETED and (row.error is not None or row.error_text is not None)
    error = load_error(row.error, row.error_text, row.state) if failed else None  # or the latest attempt's
    elapsed = None if row.finished_at is None or row.started_at is None else row.finished_at - row.started_at
    return TaskRecord(
        _task_id(row.task_id), status, TaskPriority(row.priority), row.name, row.attempts, row.host,
        result, error, row.submitted_at, row.started_at, row.finished_at, elapsed,
    )  # fmt: skip


def _settle_future(item: tuple[TaskFuture, TaskRecord]) -> None:
    future, record = item
    if future.done():
        return
    if record.status is TaskStatus.COMPLETED:
        future.set_result(record.result)
    elif record.status is TaskStatus.FAILED or not isinstance(record.error, TaskCancelledError):
        future.set_exception(record.error)
    else:
        future._mark_cancelled()
