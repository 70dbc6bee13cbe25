"""The priority queue, served from a ``multiprocessing`` manager process.

    executor (submit) ── channel ──▶ Dispatcher ── pop ──▶ TaskQueue     (see ``_dispatch``)
    supervisor        ── put (retries) / cancel / release / retire / close ──▶ TaskQueue  (RPC)

- Order: (priority, seq); seq is the submission number, so FIFO within a
  level, and a retry put back with its original seq keeps its place.
- Leases: ``pop`` hands one attempt to one worker and records the lease;
  the worker's next "ready" ends it. A worker holds at most the one task it
  runs: there is no prefetch to defeat priorities.
- ``release`` retires a worker (it gets STOP when it next asks) and returns
  the lease it held, so a task taken by a worker that died before saying so
  is never lost. ``retire`` lets it finish its task first (recycling).

The manager process ignores SIGINT (the caller shuts it down) and, if the
caller dies, receives SIGTERM (parent-death signal) and kills every worker's
process group before exiting.
"""

from __future__ import annotations

import heapq
import mmap
import multiprocessing
import os
import pickle
import shutil
import signal
import threading
from collections.abc import Callable
from multiprocessing.managers import BaseManager, BaseProxy
from typing import Any, cast

import cloudpickle

from ._companions import Companions
from ._containment import kill_tree
from ._dispatch import Dispatcher
from ._memory import Sampler
from ._process import guard_owner, kill_worker_groups, process_ended

__all__ = ("STOP", "QueueManager", "TaskQueue", "TaskQueueProxy", "connect_queue")

STOP = "stop"  # what ``pop`` returns when the worker must exit

Lease = tuple[str, int]  # task id, attempt
Item = tuple[int, int, str, int, bytes]  # priority, seq, task id, attempt, payload


class TaskQueue:
    """Priority queue with leases. Lives in the manager process; one lock guards it.

    The dispatcher (``_dispatch``) pops it for idle workers; the manager's RPC
    threads put retries, cancel, retire and release. ``on_change`` tells the
    dispatcher to look again after a change it did not make itself.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, str, int]] = []
        self._payloads: dict[str, tuple[int, bytes]] = {}  # task id -> (attempt, payload)
        self._leases: dict[str, Lease] = {}  # worker -> lease it holds
        self._retired: set[str] = set()
        self._closed = False
        self._read_seq = 0  # the highest submission read from the executor's channel
        self.on_change: Callable[[], None] = _nothing

    def put(self, priority: int, seq: int, task_id: str, attempt: int, payload: bytes) -> None:
        """Queue one attempt of a task."""
        with self._cond:
            self._push(priority, seq, task_id, attempt, payload)
        self.on_change()

    def put_frame(self, frame: bytes | bytearray | mmap.mmap) -> None:
        """Queue a pickled list of items from the executor's channel (on the dispatch thread)."""
        items: list[Item] = pickle.loads(frame)
        with self._cond:
            for item in items:
                self._push(*item)
            self._read_seq = max(self._read_seq, items[-1][1])
            self._cond.notify_all()  # a cancel may wait for these

    def _push(self, priority: int, seq: int, task_id: str, attempt: int, payload: bytes) -> None:
        self._payloads[task_id] = (attempt, payload)
        heapq.heappush(self._heap, (priority, seq, task_id, attempt))

    def pop(self, worker: str) -> tuple[str, int, bytes] | str | None:
        """Lease the next task to ``worker``: (id, attempt, payload), STOP if it must end, or None."""
        with self._cond:
            if self._closed or worker in self._retired:
                return STOP
            while self._heap:
                _, _, task_id, attempt = heapq.heappop(self._heap)
                entry = self._payloads.get(task_id)
                if entry is None or entry[0] != attempt:
                    continue  # cancelled, or superseded by a later put
                del self._payloads[task_id]
                self._leases[worker] = (task_id, attempt)
                return task_id, attempt, entry[1]
            return None

    def end_lease(self, worker: str) -> None:
        """``worker`` asked for another task: the one it held has ended."""
        with self._cond:
            self._leases.pop(worker, None)

    def stopping(self, worker: str) -> bool:
        """True if ``worker`` must end (retired, or the queue closed)."""
        with self._cond:
            return self._closed or worker in self._retired

    def cancel(self, task_id: str, seq: int = 0) -> str | None:
        """Drop a queued task. Returns "removed", the name of the worker leasing it, or None.

        ``seq`` is the task's submission number: a task still on its way through the
        executor's channel is waited for (the executor sends it before it asks).
        """
        with self._cond:
            self._cond.wait_for(lambda: self._read_seq >= seq or self._closed)
            if self._payloads.pop(task_id, None) is not None:
                return "removed"
            for worker, (leased, _) in self._leases.items():
                if leased == task_id:
                    return worker
            return None

    def retire(self, worker: str) -> None:
        """Let ``worker`` finish the task it holds, then get STOP when it asks again."""
        with self._cond:
            self._retired.add(worker)
        self.on_change()

    def release(self, worker: str) -> Lease | None:
        """Retire ``worker`` and return the lease it held, if any."""
        with self._cond:
            self._retired.add(worker)
            lease = self._leases.pop(worker, None)
        self.on_change()
        return lease

    def companion(self, slot: int, replace: bool) -> dict[str, Any]:
        """The info of ``slot``'s companion process (started if needed); see ``_companions``."""
        if _companions is None:
            raise RuntimeError("this pool has no companions: pass companion=... to DistributedExecutor")
        return _companions.get(slot, replace)

    def stop_companions(self) -> None:
        """Close every companion process (the pool is ending)."""
        if _companions is not None:
            _companions.stop()

    def dispatch_address(self) -> Any:
        """Where workers and the executor's channel connect (see ``_dispatch``)."""
        assert _dispatcher is not None
        return _dispatcher.address

    def depth(self) -> int:
        """Number of queued attempts."""
        with self._cond:
            return len(self._payloads)

    def close(self) -> None:
        """Every worker gets STOP from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.on_change()


def _nothing() -> None:
    pass


class TaskQueueProxy(BaseProxy):
    """Explicit proxy: no method discovery round trip, typed methods."""

    _exposed_ = (
        "put", "cancel", "retire", "release",
        "companion", "stop_companions", "dispatch_address", "depth", "close",
    )  # fmt: skip

    def _call(self, method: str, args: tuple[Any, ...] = ()) -> Any:
        return cast(Any, self._callmethod)(method, args)

    def put(self, priority: int, seq: int, task_id: str, attempt: int, payload: bytes) -> None:
        self._call("put", (priority, seq, task_id, attempt, payload))

    def cancel(self, task_id: str, seq: int = 0) -> str | None:
        return cast("str | None", self._call("cancel", (task_id, seq)))

    def retire(self, worker: str) -> None:
        self._call("retire", (worker,))

    def release(self, worker: str) -> Lease | None:
        return cast("Lease | None", self._call("release", (worker,)))

    def companion(self, slot: int, replace: bool) -> dict[str, Any]:
        return cast("dict[str, Any]", self._call("companion", (slot, replace)))

    def stop_companions(self) -> None:
        self._call("stop_companions")

    def dispatch_address(self) -> Any:
        return self._call("dispatch_address")

    def depth(self) -> int:
        return cast(int, self._call("depth"))

    def close(self) -> None:
        self._call("close")


_queue: TaskQueue | None = None
_dispatcher: Dispatcher | None = None
_companions: Companions | None = None  # in the manager process, when the pool has a companion factory


def _shared_queue() -> TaskQueue:
    # Runs in the manager process: every proxy refers to this one queue.
    global _queue
    if _queue is None:
        _queue = TaskQueue()
    return _queue


class QueueManager(BaseManager):
    """The manager process serving the one TaskQueue."""


QueueManager.register("get_queue", callable=_shared_queue, proxytype=TaskQueueProxy)


def init_manager(
    parent_pid: int,
    shm_name: str,
    sample_interval: float | None,
    companion: bytes | None,
    cgroup_root: str | None,
    authkey: bytes,
    owner_folder: str | None = None,
) -> None:
    """Initializer run in the manager process before it serves.

    ``owner_folder``: the caller's own multiprocessing folder (under forkserver, the fork
    server's socket is there), removed here once the caller is dead.
    """
    global _companions, _dispatcher
    owner_alive = guard_owner(signal.SIGTERM, parent_pid)
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    inherited = config.get("tempdir")  # a forked caller's folder, which may hold others' sockets
    if companion is not None:
        _companions = Companions(cloudpickle.loads(companion))
    _dispatcher = Dispatcher(_shared_queue(), authkey)
    if sample_interval is not None:
        Sampler(shm_name, sample_interval, _companions).start()

    def on_parent_death(signum: int, frame: Any) -> None:
        # Once only: a second SIGTERM arriving inside this handler must not run it again
        # (it would wait for a lock its first run holds).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cgroup_root is not None:
            kill_tree(cgroup_root, remove=True)  # every worker and all they started, however detached
        kill_worker_groups(shm_name)
        if _companions is not None:
            _companions.kill_all()
        # os._exit skips multiprocessing's exit hooks: the folder of this process's listening
        # sockets goes here, if this process made it.
        tempdir = config.get("tempdir")
        if tempdir and tempdir != inherited:
            shutil.rmtree(tempdir, ignore_errors=True)
        if owner_folder and process_ended(parent_pid):  # a SIGTERM alone must not take it
            shutil.rmtree(owner_folder, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_parent_death)
    if not owner_alive:  # the caller died before the signal was armed
        on_parent_death(signal.SIGTERM, None)


def connect_queue(address: Any, authkey: bytes) -> TaskQueueProxy:
    """Connect to a running manager and return its queue."""
    manager = QueueManager(address=address, authkey=authkey)
    manager.connect()
    return manager.get_queue()  # type: ignore[attr-defined,no-any-return]
