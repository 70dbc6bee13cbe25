"""The public executor: validates, pickles and queues; the supervisor does the rest.

user threads ── submit ──▶ DistributedExecutor ── put ──▶ manager queue
                              │  (creates the task record, counts it)
                              └── commands ──▶ supervisor thread (owns state)
get_stats() reads the shared-memory block directly: no IPC.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import inspect
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.context import BaseContext
from typing import Any

from ._callbacks import Callbacks, Lane
from ._config import Config, check_positive, check_priority
from ._dispatch import open_channel
from ._errors import BrokenPoolError, ExecutorShutdownError, TaskCancelledError
from ._metrics import PENDING, MetricsBlock
from ._outbox import Outbox
from ._payload import dump_call, dump_function
from ._process import current_pid
from ._remote.api import RemoteWorkers
from ._snapshot import read_snapshot
from ._states import TERMINAL, TaskPriority, TaskStatus
from ._supervisor import Setup, Supervisor
from ._task import CancelRef, Task, TaskFuture, TaskRecord

__all__ = ("DistributedExecutor", "get_distributed_executor")

_START_TIMEOUT = 60.0  # seconds for the manager and first workers to come up
_CANCEL_POLL = 0.1  # seconds between checks that the supervisor still runs


class DistributedExecutor(RemoteWorkers, concurrent.futures.Executor):
    """A process pool with priorities, hard per-task deadlines, retries and live stats.

    Every task runs in a worker process that is its own process group. A task
    past its deadline has its whole group killed (SIGTERM, then SIGKILL after
    ``kill_grace``); a worker that dies is replaced at once and only its task
    is retried. Also a ``concurrent.futures.Executor``.

    Args:
        max_local_workers: worker processes on this machine.
        task_timeout: default deadline in seconds for each attempt of a task.
        enable_remote: allow remote workers (see ``add_remote_worker``).
        max_retries: extra attempts for a task whose worker died or that raised.
        max_tasks_per_worker: replace a worker after this many tasks (1: a fresh
            process per task); None keeps workers for the executor's life.
        kill_grace: seconds between SIGTERM and SIGKILL when killing a task.
        start_method: "fork" (default on Linux), "spawn" or "forkserver".
        heartbeat_timeout: seconds a worker may go without a heartbeat (stopped,
            wedged at start-up) before it is killed and replaced and its task
            retried; None turns the check off.
        memory_sample_interval: seconds between measurements of each worker's
            process tree (USS/PSS, by the manager process); None turns them off.
        max_worker_memory_mb: replace a worker once its tree's USS passes this,
            after its current task (or twice its fresh size, if larger).
        hard_memory_limit: also kill a task whose worker passes
            ``max_worker_memory_mb`` mid-task; the task fails with
            ``WorkerMemoryError`` and is not retried.
        memory_threshold_mb: log a warning when a worker's tree passes this.
        initializer: called with ``initargs`` in each worker process as it
            starts, before its first task (and before its memory baseline is
            taken). Start-up, this call included, must end within
            ``heartbeat_timeout``. ``initargs`` travel as process arguments,
            so they may hold multiprocessing queues and locks. An initializer
            that raises in several workers in a row breaks the pool
            (``BrokenPoolError``, carrying its exception).
        companion: a factory, called in the manager process with a worker
            slot number, that starts a process to serve that slot's workers
            (``sessions.pinned_browsers()`` starts a browser). It outlives
            the slot's workers, is measured into the slot's stats, and ends
            with the pool. A task reaches it with ``procpool.companion_info()``.
            If the factory has a ``warm_up`` method, each worker calls it as it
            starts (a coroutine runs on the worker's loop), e.g. to connect;
            an ``after_task`` method runs after each task, before its result
            is sent (e.g. to close the pages the task opened). Local workers only.
        max_remote_workers: remote worker slots the pool can hold, over all
            hosts (with ``enable_remote``).
        max_finished_tasks, finished_task_ttl: how many finished tasks, and
            for how many seconds, ``get_task`` and ``get_task_result`` can still
            read by id; older ones are released, so memory follows what is
            pending and what the caller holds (a Future keeps its own result).
            None keeps them all, or for ever. Counts in ``get_stats()`` stay exact.
        queue: a PostgreSQL DSN ("postgresql://..."): cluster mode, where the
            queue, leases and results live in that database and hosts running
            ``python -m procpool host`` serve it; ``max_local_workers`` slots
            are then served by this process too (0: submit only). Needs the
            ``procpool[postgres]`` extra. See README, "Cluster mode".
        max_workers, mp_context, max_tasks_per_child: the names
            ``ProcessPoolExecutor`` uses for ``max_local_workers``,
            ``start_method`` (a context) and ``max_tasks_per_worker``.

    Raises:
        ValueError, TypeError: a setting is out of range or of the wrong type.
    """

    def __new__(cls, *args: Any, queue: str | None = None, **options: Any) -> DistributedExecutor:
        if queue is not None and cls is DistributedExecutor:
            return super().__new__(cluster_executor())
        return super().__new__(cls)

    def __init__(
        self,
        max_local_workers: int = 3,
        task_timeout: float = 300,
        enable_remote: bool = False,
        max_retries: int = 3,
        *,
        max_tasks_per_worker: int | None = None,
        kill_grace: float = 0.5,
        start_method: str | None = None,
        heartbeat_timeout: float | None = 30.0,
        memory_sample_interval: float | None = 2.0,
        max_worker_memory_mb: float | None = None,
        hard_memory_limit: bool = False,
        memory_threshold_mb: float | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[object] = (),
        companion: Callable[[int], object] | None = None,
        max_remote_workers: int = 16,
        max_workers: int | None = None,
        mp_context: BaseContext | None = None,
        max_tasks_per_child: int | None = None,
        max_finished_tasks: int | None = 10_000,
        finished_task_ttl: float | None = 3600.0,
        queue: str | None = None,
    ) -> None:
        if queue is not None:
            raise TypeError(f"queue= is taken by DistributedExecutor itself, not by {type(self).__name__}")
        max_local_workers = _alias("max_workers", max_workers, "max_local_workers", max_local_workers, 3) or 0
        max_tasks_per_worker = _alias(
            "max_tasks_per_child", max_tasks_per_child, "max_tasks_per_worker", max_tasks_per_worker, None
        )
        self._config = Config.build(
            max_local_workers=max_local_workers,
            task_timeout=task_timeout,
            enable_remote=enable_remote,
            max_retries=max_retries,
            max_tasks_per_worker=max_tasks_per_worker,
            kill_grace=kill_grace,
            start_method=start_method,
            mp_context=mp_context,
            max_finished_tasks=max_finished_tasks,
            finished_task_ttl=finished_task_ttl,
            heartbeat_timeout=heartbeat_timeout,
            memory_sample_interval=memory_sample_interval,
            max_worker_memory_mb=max_worker_memory_mb,
            hard_memory_limit=hard_memory_limit,
            memory_threshold_mb=memory_threshold_mb,
            max_remote_workers=max_remote_workers,
        )
        self._initializer = _pickle_initializer(initializer, initargs)
        self._initargs = tuple(initargs)  # Process arguments: inherited, or pickled by multiprocessing
        self._init_call = (initializer, self._initargs)
        self._companion = _pickle_companion(companion)
        self._warm_up = _pickle_hook(companion, "warm_up")  # the companion's preparation in each worker
        self._after_task = _pickle_hook(companion, "after_task")  # and its tidying after each task
        self._authkey = os.urandom(32)
        self._owner = os.getpid()  # a forked child inherits this object, but not its threads
        self._tasks: dict[str, Task] = {}
        self._seq = itertools.count(1)
        self._last_seq = 0  # the highest task number given out: ids up to it were seen
        self._submit_lock = threading.Lock()  # orders submissions against shutdown and breakage
        self._closed: BaseException | None = None  # why no more submissions are taken
        self._final_stats: dict[str, Any] | None = None
        self._finish_lock = threading.Lock()
        self._callbacks = Callbacks()
        self._cancel_ref: CancelRef = weakref.WeakMethod(self._cancel)  # shared by this executor's futures
        self._futures_lane = Lane("procpool-futures")
        self._metrics = MetricsBlock(self._config.max_local_workers + self._config.max_remote_workers)
        me = weakref.ref(self)  # the supervisor holds this executor only while it runs (see Setup)
        setup = Setup(
            self._config, self._metrics, self._callbacks, self._tasks, self._futures_lane,
            self._authkey, self._initializer, self._initargs, self._warm_up, self._after_task,
            self._companion, lambda: me()._remote_initializer, lambda: me()._outbox,  # type: ignore[union-attr]
            lambda error: me()._mark_broken(error),  # type: ignore[union-attr]
        )  # fmt: skip
        self._supervisor = Supervisor(setup, owner=self)
        self._supervisor.start()
        if not self._supervisor.ready.wait(_START_TIMEOUT) or self._supervisor.start_error:
            self._supervisor.join(_START_TIMEOUT)
            self._metrics.close()
            raise BrokenPoolError(
                f"the executor could not start: {self._supervisor.start_error!r}"
            ) from self._supervisor.start_error
        self._outbox = Outbox(open_channel(self._supervisor.dispatch_address, self._authkey))
        self._shutdown_at_exit()

    def _shutdown_at_exit(self) -> None:
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    def __repr__(self) -> str:
        state = "running" if self._closed is None else "closed"
        return (
            f"<DistributedExecutor {state} workers={self._config.max_local_workers} tasks={len(self._tasks)}>"
        )

    # -- submitting ----------------------------------------------------------

    def submit_task(
        self,
        function: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        priority: TaskPriority = TaskPriority.NORMAL,
        timeout: float | None = None,
    ) -> str:
        """Queue ``function(*args, **kwargs)`` and return its task id.

        Args:
            priority: URGENT runs before HIGH, then NORMAL, then LOW; FIFO within one.
            timeout: deadline in seconds for each attempt (default ``task_timeout``).

        Raises:
            TypeError: ``function`` is not callable, or it or its arguments cannot be pickled.
            ValueError: unknown priority, or a timeout that is not above zero.
            ExecutorShutdownError: after ``shutdown()``. BrokenPoolError: the pool broke.
        """
        return self._submit_many([(function, args, kwargs)], priority, timeout, "")[0].task_id

    def submit_batch(
        self,
        tasks: Iterable[tuple[Any, ...]],
        priority: TaskPriority = TaskPriority.NORMAL,
        timeout: float | None = None,
    ) -> list[str]:
        """Queue many ``(function, args, kwargs)`` tuples in one step; returns their ids.

        Every item is checked and pickled before any is queued, so a bad item
        queues nothing. Raises as ``submit_task`` does, naming the bad item.
        """
        items = []
        for index, item in enumerate(tasks):
            if not isinstance(item, tuple) or not 1 <= len(item) <= 3:
                raise ValueError(f"batch item {index} must be a (function, args, kwargs) tuple, not {item!r}")
            items.append(item + ((), None)[len(item) - 1 :])
        return [task.task_id for task in self._submit_many(items, priority, timeout, "batch item ")]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """``concurrent.futures.Executor.submit``: queue at NORMAL priority, return a Future.

        As in ``concurrent.futures``, a callable that raises runs once and its
        exception is the Future's (``submit_task`` retries instead); a task whose
        worker died is still retried. The executor keeps no record of the task
        once it ends: the Future holds its outcome.
        """
        return self._submit_many([(fn, args, kwargs)], TaskPriority.NORMAL, None, "", futures_api=True)[
            0
        ].future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``concurrent.futures.Executor.map``: results in order; ``chunksize`` items travel per task.

        Every call is queued at once (one batch); a call that raises runs once
        and its exception comes out of the iterator. ``timeout`` counts from
        this call; the iterator raises TimeoutError past it and cancels what
        has not started.

        Raises:
            ValueError: ``chunksize`` is below 1.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, not {chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        # One iterable travels as its items, not as 1-tuples: a chunk pickles in a third of the time.
        one = len(iterables) == 1
        calls = list(iterables[0]) if one else list(zip(*iterables))  # noqa: B905 - as the builtin map
        if chunksize == 1:
            items = [(fn, (call,) if one else call, None) for call in calls]
        else:
            # One object, pickled once for every chunk.
            runner = functools.partial(_run_chunk if one else _run_chunk_star, fn)
            items = [(runner, (calls[i : i + chunksize],), None) for i in range(0, len(calls), chunksize)]
        tasks = self._submit_many(items, TaskPriority.NORMAL, None, "map item ", futures_api=True)
        futures: list[concurrent.futures.Future[Any]] = [task.future for task in tasks]
        del tasks
        results = _results_in_order(futures, end)
        return results if chunksize == 1 else itertools.chain.from_iterable(results)

    async def run_async(
        self,
        function: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        priority: TaskPriority = TaskPriority.NORMAL,
        timeout: float | None = None,
    ) -> Any:
        """Run a task from asyncio code and return its result (raises its error).

        Cancelling the awaiting coroutine cancels the task (killing it if running).
        """
        task = self._submit_many([(function, args, kwargs)], priority, timeout, "")[0]
        return await asyncio.wrap_future(task.future)

    def _submit_many(
        self,
        items: Sequence[tuple[Any, Any, Any]],
        priority: object,
        timeout: float | None,
        where: str,
        futures_api: bool = False,
    ) -> list[Task]:
        prio, deadline, names, payloads = self._prepare(items, priority, timeout, where)
        return self._enqueue(names, payloads, prio, deadline, futures_api)

    def _prepare(
        self, items: Sequence[tuple[Any, Any, Any]], priority: object, timeout: float | None, where: str
    ) -> tuple[TaskPriority, float, list[str], list[bytes]]:
        """Check and pickle a submission: its priority, deadline, and each task's name and payload."""
        self._check_owner()
        prio = check_priority(priority)
        deadline = self._task_timeout if timeout is None else check_positive("timeout", timeout)
        blobs: dict[int, bytes] = {}  # a batch pickles each distinct function once
        payloads = [_pickle(f"{where}{i}: " if where else "", blobs, *item) for i, item in enumerate(items)]
        return prio, deadline, [_name(fn) for fn, _, _ in items], payloads

    @property
    def _task_timeout(self) -> float:
        return self._config.task_timeout

    def _enqueue(
        self, names: list[str], payloads: list[bytes], prio: TaskPriority, deadline: float, futures_api: bool
    ) -> list[Task]:
        """Queue tasks already pickled (``dump_call``): the path of ``submit`` and of cluster hosts."""
        now = time.time()
        with self._submit_lock:
            if self._closed is not None:
                raise self._closed
            tasks = []
            for name, payload in zip(names, payloads, strict=True):
                seq = self._last_seq = next(self._seq)
                task_id = f"task-{seq}"
                future = TaskFuture(task_id, self._cancel_ref, kills=not futures_api)
                tasks.append(Task(task_id, prio, seq, name, payload, deadline, future, now, futures_api))
            self._count_new(tasks)
            for task in tasks:
                self._tasks[task.task_id] = task
            self._outbox.add(
                [
                    (int(prio), t.seq, t.task_id, 1, payload)
                    for t, payload in zip(tasks, payloads, strict=True)
                ]
            )
            # After the send: the supervisor thread it wakes would hold it up. Its round ends
            # with the header written, and with the slots scanned for starts from then on
            # (the tasks were counted pending before ``scanning`` is read).
            if self._metrics.publish_soon() or not self._supervisor.scanning:
                self._supervisor.call(_nothing)
        return tasks

    def _count_new(self, tasks: list[Task]) -> None:
        counters = self._metrics.counters
        with self._metrics.header_lock:
            counters.total += len(tasks)
            counters.states[PENDING] += len(tasks)
            for task in tasks:
                counters.depth[task.priority] += 1

    # -- results ---------------------------------------------------------------

    def get_task(self, task_id: str) -> TaskRecord:
        """A snapshot of the task. Raises KeyError for an unknown id."""
        return self._task(task_id).record

    def future(self, task_id: str) -> concurrent.futures.Future[Any]:
        """The task's ``concurrent.futures.Future`` (for ``asyncio.wrap_future``, callbacks, ``wait``).

        Raises KeyError for an unknown id.
        """
        return self._task(task_id).future

    def get_task_result(self, task_id: str, wait: bool = True, timeout: float | None = 30) -> Any:
        """The task's return value.

        Args:
            wait: if False and the task is unfinished, return None at once.
            timeout: seconds to wait; None waits for ever.

        Raises:
            KeyError: unknown id. TimeoutError: unfinished after ``timeout``.
            The task's own exception, TaskTimeoutError, TaskCancelledError or
            WorkerLostError when it did not complete.
        """
        task = self._task(task_id)
        future = task.future
        if not wait and not future.done():
            return None
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            error = task.record.error
            raise (
                error if error is not None else TaskCancelledError(f"task {task_id} was cancelled")
            ) from None
        except TimeoutError:
            if future.done():
                raise
            raise TimeoutError(f"task {task_id} has not finished after {timeout} s") from None
        finally:
            task.collected = future.done()  # read: from now on it may be released

    def wait_for_tasks(self, task_ids: Sequence[str], timeout: float | None = 60) -> list[Any]:
        """Wait for tasks; return their results in order, with the error object in place of a failure.

        Raises:
            KeyError: an unknown id. TimeoutError: some are unfinished after ``timeout``.
        """
        if isinstance(task_ids, str):
            raise TypeError(f"task_ids must be a list of ids, not the str {task_ids!r}: pass [{task_ids!r}]")
        tasks = [self._task(task_id) for task_id in task_ids]
        _, pending = concurrent.futures.wait([t.future for t in tasks], timeout)
        if pending:
            ids = [t.task_id for t in tasks if t.future in pending]
            raise TimeoutError(f"{len(ids)} of {len(tasks)} tasks unfinished after {timeout} s: {ids[:10]}")
        for task in tasks:
            task.collected = True
        return [t.record.result if t.record.status is TaskStatus.COMPLETED else t.record.error for t in tasks]

    def cancel_task(self, task_id: str) -> bool:
        """Cancel a task: a queued one is dropped, a running one is killed with its group.

        Returns False if the task had already finished. Raises KeyError for an unknown id.
        """
        if self._task(task_id).status in TERMINAL:
            return False
        return self._cancel(task_id, kill=True)

    def _cancel(self, task_id: str, kill: bool) -> bool:
        reply: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def run() -> None:
            try:
                self._supervisor.cancel(task_id, kill, reply)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                reply.set_exception(exc)

        if not self._supervisor.call(run):
            return False  # it ended, and every task with it
        while True:
            try:
                return reply.result(_CANCEL_POLL)
            except TimeoutError:
                if not self._supervisor.is_alive():
                    return False  # it ended, and every task with it

    def _check_owner(self) -> None:
        if current_pid() != self._owner:
            raise ExecutorShutdownError(
                f"this DistributedExecutor belongs to process {self._owner}; this process is a fork of "
                f"it and has none of its threads: create a new DistributedExecutor here"
            )

    def _task(self, task_id: str) -> Task:
        self._check_owner()
        try:
            return self._tasks[task_id]
        except KeyError:
            raise KeyError(self._why_unknown(task_id)) from None

    def _why_unknown(self, task_id: object) -> str:
        number = task_id[5:] if isinstance(task_id, str) and task_id.startswith("task-") else ""
        if number.isdecimal() and 0 < int(number) <= self._last_seq:
            cfg = self._config
            return (
                f"task id {task_id!r} was released: it finished, and the executor keeps a finished "
                f"task for {cfg.finished_task_ttl} s and at most {cfg.max_finished_tasks} of them "
                f"(max_finished_tasks, finished_task_ttl); one made by submit() or map() is released "
                f"at once, its Future holding the outcome"
            )
        return f"unknown task id {task_id!r}"

    # -- callbacks and stats ---------------------------------------------------

    def register_callback(self, event: str, callback: Callable[[TaskRecord], object]) -> None:
        """Call ``callback(record)`` on "task_complete", "task_failed", "task_retrying" or "task_cancelled".

        Callbacks run on one background thread, in event order; one that
        raises is logged and changes nothing else.

        Raises:
            ValueError: unknown event. TypeError: ``callback`` is not callable.
        """
        self._callbacks.register(event, callback)

    def get_stats(self) -> dict[str, Any]:
        """Counts of tasks by state, per-worker figures and queue depth, read from shared memory.

        Makes no IPC call. ``total_tasks`` always equals pending + running +
        completed + failed + cancelled.
        """
        if self._final_stats is not None:
            return dict(self._final_stats)
        if self._metrics.stale:  # submissions of the last millisecond
            self._metrics.publish()
        buf = self._metrics.shm.buf
        assert buf is not None
        stats = read_snapshot(buf)
        stats["metrics_block"] = self._metrics.name
        hosts = self._supervisor.host_names
        if hosts:
            for name, view in stats["workers"].items():
                if name in hosts:
                    view["host"] = hosts[name]
        return stats

    @functools.cached_property
    def _remote_initializer(self) -> bytes | None:
        """The initializer with its arguments as one payload, for remote workers (cloudpickle).

        Raises:
            TypeError: they cannot travel to another machine (a multiprocessing queue, say).
        """
        fn, args = self._init_call
        return None if fn is None else _pickle("initializer for remote workers: ", {}, fn, args, None)

    @property
    def _broken(self) -> BrokenPoolError | bool:
        # ProcessPoolExecutor's attribute (its tests and some callers read it): the error, or False.
        return self._closed if isinstance(self._closed, BrokenPoolError) else False

    @property
    def metrics_block(self) -> str:
        """Name of the shared-memory block that other processes can watch."""
        return self._metrics.name

    # -- ending ----------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks and end the pool once queued tasks are done. Idempotent.

        Args:
            wait: block until every task has finished and every process is gone.
                From a callback (or a Future's done-callback) it does not wait:
                the callbacks themselves are among what it would wait for.
            cancel_futures: cancel queued tasks instead of running them.
        """
        if os.getpid() != self._owner:
            return  # a forked child's copy: the pool is its parent's to end
        if wait and self._on_own_thread():
            wait = False
        with self._submit_lock:
            if self._closed is None:
                self._closed = ExecutorShutdownError("cannot schedule new futures after shutdown")
        self._supervisor.call(lambda: self._supervisor.close(cancel_futures))  # False once it ended
        if wait:
            self._finish()
        else:
            threading.Thread(target=self._finish, name="procpool-shutdown", daemon=True).start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Leaving the ``with`` block runs what is queued, unless Ctrl-C left it: then queued tasks
        are cancelled (running ones end at the latest at their deadline)."""
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.shutdown(wait=True, cancel_futures=interrupted)

    def _on_own_thread(self) -> bool:
        return (
            threading.current_thread() is self._supervisor
            or self._futures_lane.is_current()
            or self._callbacks.lane.is_current()
        )

    def _finish(self) -> None:
        with self._finish_lock:
            if self._final_stats is not None:
                return
            self._supervisor.join()
            self._outbox.close()
            self._futures_lane.close()  # every Future settled ...
            self._callbacks.close()  # ... and every callback run
            stats = self.get_stats()
            for worker in stats["workers"].values():
                worker.update(active=False, state="stopped", current_task=None)
            stats["active_workers"] = 0
            self._final_stats = stats
            self._metrics.close()

    def _mark_broken(self, error: BrokenPoolError) -> list[Task]:
        """Refuse new tasks from now on; returns the tasks known at that moment."""
        with self._submit_lock:
            self._closed = error
            return list(self._tasks.values())


# Its signature is __init__'s: __new__ only picks the class (cluster mode for queue=...).
_init = inspect.signature(DistributedExecutor.__init__)
DistributedExecutor.__signature__ = _init.replace(parameters=list(_init.parameters.values())[1:])  # type: ignore[attr-defined]


@functools.cache
def cluster_executor() -> type[DistributedExecutor]:
    """The cluster-mode class; a clear error when psycopg (the postgres extra) is missing."""
    try:
        from ._cluster.client import ClusterMode
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("psycopg"):
            raise
        raise RuntimeError(f"cluster mode needs psycopg ({exc}): pip install 'procpool[postgres]'") from None

    class ClusterExecutor(ClusterMode, DistributedExecutor):  # type: ignore[misc]
        """``DistributedExecutor`` in cluster mode (see ``procpool._cluster.client``)."""

        _local = DistributedExecutor

    return ClusterExecutor


def _pickle(where: str, blobs: dict[int, bytes], fn: Any, args: Any, kwargs: Any) -> bytes:
    if not callable(fn):
        raise TypeError(f"{where}function must be callable, not {type(fn).__name__}")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"{where}args must be a tuple or list, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"{where}kwargs must be a dict or None, not {type(kwargs).__name__}")
    bad_key = next((k for k in kwargs or () if not isinstance(k, str)), None)
    if bad_key is not None:
        raise TypeError(f"{where}kwargs keys must be argument names (str), not {bad_key!r}")
    try:
        fn_blob = blobs.get(id(fn))
        if fn_blob is None:
            fn_blob = blobs[id(fn)] = dump_function(fn)
        return dump_call(fn_blob, tuple(args), kwargs or {})
    except Exception as exc:
        raise TypeError(f"{where}cannot pickle task {_name(fn)} or its arguments: {exc}") from exc


def _alias(name: str, value: int | None, ours: str, our_value: int | None, default: int | None) -> int | None:
    """Accept ProcessPoolExecutor's name for a setting; its errors name what the caller wrote."""
    if value is None:
        return our_value
    if our_value != default and our_value != value:
        raise ValueError(f"give {name} or {ours}, not both")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, not {value}")
    return value


def _pickle_initializer(fn: object, initargs: object) -> bytes | None:
    """The initializer alone, by value (a lambda or a ``__main__`` function works under spawn)."""
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"initializer must be callable, not {type(fn).__name__}")
    if not isinstance(initargs, (tuple, list)):
        raise TypeError(f"initargs must be a tuple or list, not {type(initargs).__name__}")
    try:
        return dump_function(fn)
    except Exception as exc:
        raise TypeError(f"cannot pickle the initializer {_name(fn)}: {exc}") from exc


def _run_chunk(fn: Callable[..., Any], chunk: list[Any]) -> list[Any]:
    return list(map(fn, chunk))


def _run_chunk_star(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return list(itertools.starmap(fn, chunk))


def _results_in_order(futures: list[concurrent.futures.Future[Any]], end: float | None) -> Iterator[Any]:
    # As concurrent.futures does: the caller's iterator holds no result it has yielded,
    # and whatever is left when it stops (a timeout, an error, a close) is cancelled.
    futures.reverse()
    try:
        while futures:
            yield _result_or_cancel(futures.pop(), end)
    finally:
        for future in futures:
            future.cancel()


def _result_or_cancel(future: concurrent.futures.Future[Any], end: float | None) -> Any:
    try:
        return future.result(None if end is None else end - time.monotonic())
    finally:
        future.cancel()  # a no-op once it is done
        del future  # no reference from here to the result or its traceback


def _pickle_hook(companion: object, name: str) -> bytes | None:
    hook = getattr(companion, name, None)
    return _pickle(f"companion {name}: ", {}, hook, (), None) if callable(hook) else None


def _pickle_companion(factory: object) -> bytes | None:
    if factory is None:
        return None
    if not callable(factory):
        raise TypeError(f"companion must be a callable factory, not {type(factory).__name__}")
    try:
        return dump_function(factory)
    except Exception as exc:
        raise TypeError(f"cannot pickle the companion factory {factory!r}: {exc}") from exc


def _nothing() -> None:
    pass


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _shutdown_at_exit(ref: weakref.ref[DistributedExecutor]) -> None:
    executor = ref()
    if executor is not None and executor._owner == os.getpid():
        with executor._submit_lock:
            if executor._closed is None:  # worded as concurrent.futures words it
                executor._closed = ExecutorShutdownError(
                    "cannot schedule new futures after interpreter shutdown"
                )
        executor.shutdown(wait=True)


_default: DistributedExecutor | None = None
_default_lock = threading.Lock()


def get_distributed_executor(
    max_workers: int = 3, enable_remote: bool = False, **options: Any
) -> DistributedExecutor:
    """The process-wide default executor, created on first call (``max_workers`` local workers).

    Later calls return the same object, their arguments ignored, until it is
    shut down; a call after that creates a new one.
    """
    global _default
    with _default_lock:
        if _default is None or _default._closed is not None or _default._owner != os.getpid():
            _default = DistributedExecutor(
                max_local_workers=max_workers, enable_remote=enable_remote, **options
            )
        return _default
