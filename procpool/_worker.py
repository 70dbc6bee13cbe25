"""The worker loop, run in each worker process.

    dispatcher (manager) ◀── ready / task ──▶ worker ── done ──▶ supervisor (result pipe)
                                                └── writes its own metrics slot: starts, heartbeats

The worker holds at most the one task it runs. A heartbeat thread refreshes
the slot's heartbeat every ``heartbeat_interval``, idle or busy. It writes each
start (task, attempt, time) in its slot before running the task: the supervisor
reads starts there (and starts the deadline clock from that time), so a task
costs no message but its ``done``, with the pickled outcome. After a task that raised it waits for the
supervisor's go-ahead, so a retry is queued again before it asks for more.
It never decides about retries or deadlines: the supervisor does, from outside.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from . import _containment as containment
from ._dispatch import TaskLine
from ._errors import RemoteTaskError
from ._memory import own_uss
from ._metrics import SlotWriter
from ._payload import dumps, load_call
from ._process import current_pid, guard_owner
from ._queue import STOP, TaskQueueProxy, connect_queue

__all__ = ("Done", "Started", "WorkerSpec", "companion_info", "needs_go_ahead", "run_worker")

IDLE_WAIT = 1.0  # seconds an idle worker waits for a task in one go
_PROTOCOL = pickle.HIGHEST_PROTOCOL
RAW_AFTER = 1 << 20  # bytes; a result this big is sent as a raw frame after its message (send_outcome)
log = logging.getLogger(__name__)
_here: tuple[Any, bytes, int] | None = None  # the manager's address, its authkey and this slot, once serving
_manager: TaskQueueProxy | None = None  # connected on first use
_loop: asyncio.AbstractEventLoop | None = None
remote = False  # set in a remote agent's worker child

# Messages on the result pipe (plain tuples: cheapest to pickle).
Started = tuple[str, str, int]  # ("started", task id, attempt): from a remote slot's link only
# ("done", task id, attempt, ok, retryable, elapsed, blob, type name, message, traceback)
Done = tuple[str, str, int, bool, bool, float, bytes | None, str, str, str]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker process needs; travels as Process arguments, never argv."""

    key: str  # unique per worker process; leases are held under it
    slot: int
    address: Any  # the manager's (companion_info calls it)
    dispatch: Any  # the dispatcher's, where the worker's task line connects
    authkey: bytes = field(repr=False)  # never in a log or traceback
    conn: Connection
    shm_name: str
    max_tasks: int | None
    parent_pid: int
    heartbeat_interval: float  # seconds between heartbeats from the worker's heartbeat thread
    initializer: bytes | None  # the initializer function (cloudpickled), run once before the first task
    initargs: tuple[Any, ...]  # its arguments: inherited under fork, pickled by multiprocessing otherwise
    warm_up: bytes | None  # the companion's preparation in each worker (connect to it), best effort
    cgroup: str | None = None  # the cgroup it moves into at once (else it becomes a subreaper)
    after_task: bytes | None = None  # the companion's tidying after each task (close its pages), best effort
    fresh_size: bool = False  # measure its own memory before its first task (a memory limit is set)


def run_worker(spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    os.setpgid(0, 0)  # the parent does the same, whichever runs first
    subreaper = containment.enter(spec.cgroup)  # before anything can start a process
    if not guard_owner(signal.SIGKILL, spec.parent_pid):
        os._exit(1)  # the owner died before the guard was armed
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked handler must not swallow it
    slot = SlotWriter(spec.shm_name, spec.slot)
    try:
        serve(spec, slot, subreaper)
    except (EOFError, OSError):
        pass  # the manager or the supervisor is gone: nothing left to work for
    finally:
        if subreaper:  # its adopted orphans would go to init as it exits: they end with it
            containment.kill_orphans()
        slot.close()
        spec.conn.close()


def serve(spec: WorkerSpec, slot: SlotWriter, subreaper: bool = False) -> None:
    """Run the tasks the dispatcher hands this worker until told to stop or ``max_tasks`` are done."""
    global _here
    _here = (spec.address, spec.authkey, spec.slot)
    line = TaskLine(spec.dispatch, spec.authkey, spec.key)
    if spec.initializer is not None and not _initialize(spec):
        return  # the supervisor counts the failure; enough in a row break the pool
    # Beats go on while a task runs, so only a stopped or wedged process falls silent. They
    # start after the initializer (a wedged one is caught) and before the companion's
    # warm-up, which is bounded by its own timeouts (a frozen browser must not look like
    # a hung worker, or its replacements would be killed in a loop).
    threading.Thread(
        target=_beat, args=(slot, spec.heartbeat_interval), name="heartbeat", daemon=True
    ).start()
    if spec.warm_up is not None:
        _companion_hook(spec.warm_up, "warm-up")
    slot.idle(own_uss() if spec.fresh_size else 0)  # started; its size before any task
    me = current_pid()
    done = 0
    line.ready()
    while spec.max_tasks is None or done < spec.max_tasks:
        item = line.next(IDLE_WAIT)
        if item is None:
            continue  # idle: the heartbeat thread beats meanwhile
        if item == STOP:
            break
        assert isinstance(item, tuple)
        task_id, attempt, payload = item
        slot.running(task_id, attempt)
        done += 1
        after = _AfterReturn(spec, me, subreaper, line, spec.max_tasks is None or done < spec.max_tasks)
        message = run_task(task_id, attempt, payload, after)
        if not after.ran:
            after.tidy()
        slot.finished(message[3], message[5])  # before the result: a caller that has it sees the counts
        send_outcome(spec.conn, message)
        if not after.ran:
            if needs_go_ahead(message):
                spec.conn.recv()  # the supervisor has queued the retry: it keeps its place
            if after.more:
                line.ready()
        del item, payload, message, after  # the last result is not kept while the next task runs


class _AfterReturn:
    """What a worker does once a task's function has returned, before its result is pickled.

    It asks for the next task at once, so that the dispatcher's answer overlaps the
    pickling and sending of this result. (After a task that raised, the worker asks
    only once the supervisor has queued any retry, so a retry keeps its place.)
    """

    __slots__ = ("after_task", "line", "me", "more", "ran", "subreaper")

    def __init__(self, spec: WorkerSpec, me: int, subreaper: bool, line: TaskLine, more: bool) -> None:
        self.after_task = spec.after_task
        self.me = me
        self.subreaper = subreaper
        self.line = line
        self.more = more  # another task may follow (max_tasks not reached)
        self.ran = False

    def __call__(self) -> None:
        self.tidy()
        self.ran = True
        if self.more:
            self.line.ready()

    def tidy(self) -> None:
        # (current_pid: a fork handler keeps it; os.getpid() here was a quarter of a worker's CPU)
        if current_pid() != self.me:
            os._exit(0)  # a copy the task forked came back here: only the worker itself reports
        if self.subreaper:
            containment.reap()
        if self.after_task is not None:  # before the result: the next task may need what it tidies
            _companion_hook(self.after_task, "after-task hook")


def needs_go_ahead(message: tuple[Any, ...]) -> bool:
    """After this outcome, the sender waits for the supervisor's go-ahead before it asks again."""
    return message[0] != "done" or (not message[3] and message[4])


def _initialize(spec: WorkerSpec) -> bool:
    """Run the initializer; on failure log it as ProcessPoolExecutor does and tell the supervisor."""
    try:
        cloudpickle.loads(spec.initializer)(*spec.initargs)
        return True
    except BaseException as exc:
        logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
        tb = traceback.format_exc()
        spec.conn.send(("init_failed", _dumps(exc), _type_name(exc), str(exc), tb))
        return False


def _companion_hook(payload: bytes, what: str) -> None:
    """Run a companion's hook (a coroutine runs on this worker's loop); a failure is only logged."""
    try:
        fn, args, kwargs = load_call(payload)
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            _event_loop().run_until_complete(value)
    except Exception:  # the first task that needs the companion tries again
        log.warning("the companion %s failed in worker %d", what, os.getpid(), exc_info=True)


def _beat(slot: SlotWriter, interval: float) -> None:
    while slot.beat():
        time.sleep(interval)


def run_task(task_id: str, attempt: int, payload: bytes, returned: Callable[[], None] | None = None) -> Done:
    """Run one task and encode its outcome; never raises.

    ``returned`` is called once the function has returned, before its value is pickled.
    """
    start = time.monotonic()
    try:
        fn, args, kwargs = load_call(payload)
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):  # an async task runs on this worker's one event loop
            value = _event_loop().run_until_complete(value)
    except BaseException as exc:  # noqa: BLE001 - a task's SystemExit is its failure too
        elapsed = time.monotonic() - start
        tb = traceback.format_exc()
        return ("done", task_id, attempt, False, True, elapsed, _dumps(exc), _type_name(exc), str(exc), tb)
    elapsed = time.monotonic() - start
    if returned is not None:
        returned()
    try:
        return ("done", task_id, attempt, True, False, elapsed, dumps(value), "", "", "")
    except BaseException as exc:  # noqa: BLE001 - the pickling error is the task's (as in concurrent.futures)
        tb = traceback.format_exc()
        text = f"the result of type {_type_name(value)} could not be pickled to send it back: {exc}"
        exc.add_note(text)
        blob = _dumps(exc)
        if blob is None:  # the error cannot travel either: a plain stand-in with its text
            error = RemoteTaskError(_type_name(exc), text, tb)
            blob, exc = _dumps(error), error
        return ("done", task_id, attempt, False, False, elapsed, blob, _type_name(exc), text, tb)


def send_outcome(conn: Connection, message: Done) -> None:
    """Send a "done" message; a big result (or error) follows it as a raw frame of its own.

    The supervisor then reads the head in order at once, and only the result's own
    bytes go to its decoder: a "started" that comes after a 300 MB result need not
    wait for that result to be unpickled.
    """
    blob = message[6]
    if blob is None or len(blob) < RAW_AFTER:
        conn.send_bytes(pickle.dumps(message, _PROTOCOL))  # plain data: no need of multiprocessing's pickler
        return
    conn.send_bytes(pickle.dumps((*message[:6], len(blob), *message[7:]), _PROTOCOL))  # the blob follows
    conn.send_bytes(blob)


def _event_loop() -> asyncio.AbstractEventLoop:
    # One loop for the worker's life, so connections made by one task (a browser) serve the next.
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


def companion_info(replace: bool = False) -> dict[str, Any]:
    """In a task: the info of this worker's companion process (see ``DistributedExecutor(companion=...)``).

    It is started on first use and shared by every worker that takes this
    worker's place. ``replace=True`` asks for a new one (this one is broken).

    Raises:
        RuntimeError: not called in a procpool worker, or the pool has no companion factory.
    """
    if remote:
        raise RuntimeError(
            "companion_info() is not available on a remote worker: companions (pinned browsers) "
            "run on the pool's own machine"
        )
    if _here is None:
        raise RuntimeError("companion_info() works only in a task running in a procpool worker")
    global _manager
    address, authkey, slot = _here
    if _manager is None:
        _manager = connect_queue(address, authkey)
    return _manager.companion(slot, replace)


def _dumps(obj: Any) -> bytes | None:
    try:
        return cloudpickle.dumps(obj)  # type: ignore[no-any-return]
    except BaseException:  # noqa: BLE001 - the supervisor falls back to the plain text
        return None


def _type_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else cls.__qualname__
