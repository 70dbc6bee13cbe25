"""The supervisor thread: the event loop that joins the pool's parts, and the one writer of their state.

    submitters ── outbox ── channel ──▶ manager: queue, dispatcher ── task ──▶ workers
         │                                                    │ started / done (pipe)
         └─ commands (cancel, shutdown) ─▶ supervisor ◀────────┘ + pidfds
                                             │ kill ladder, respawn, retries
                                             └─▶ ledger: records, futures, callbacks, metrics header

Its parts, each with its own interface, all run on this thread:
- ``WorkerSet`` (``_workers``): the worker processes: spawn, watch (pipe and
  pidfd), kill ladder, containment (a ``Jail`` each), slot sections. A worker's
  life is one ``WorkerState``.
- ``TaskEvents`` (``_events``): what happens to tasks (started, done, deadline,
  cancel, death, retry), written through the ``Ledger``, the one writer of task
  state. It reaches the manager only through the ``ManagerLink``, off this thread.
- ``HealthChecks`` (``_checks``): heartbeat and memory verdicts on a timer.
- ``RemoteSlots`` (``_remote.slots``): which slot belongs to which remote host. A
  remote slot's worker is a local link process; it looks like any worker here.

The loop waits on result pipes, a pidfd per worker and one for the manager, and
a wake-up pipe at once (one epoll set), with a timeout equal to the next timer
(deadline, SIGKILL escalation, respawn, health, or the scan of the workers' slots
for task starts: every ``_SCAN_EVERY`` while a worker with no known task may be
handed a queued one, then stopped until a "done" or a submitter wakes the loop). A pidfd becomes readable when
the process itself exits, whatever its descendants still hold open. No user code
runs here: futures and callbacks have lanes of their own (``_callbacks``).

Leases: a result counts only for the task's current attempt, and not from a
worker being killed once it started the attempt it is killed for, so no task
completes twice (and none it finished before is lost).
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import util as mp_util
from multiprocessing.connection import wait
from typing import Any

from ._callbacks import Callbacks, Lane
from ._checks import HealthChecks
from ._config import Config
from ._errors import BrokenPoolError
from ._events import TaskEvents
from ._health import heartbeat_interval
from ._inbox import Frame
from ._ledger import Ledger
from ._manager_link import ManagerLink
from ._metrics import MetricsBlock
from ._outbox import Outbox
from ._payload import loads_gently
from ._process import own, own_temp_dir, remove_sockets
from ._queue import QueueManager, TaskQueueProxy, init_manager
from ._remote.hosts import RemoteHost
from ._remote.slots import RemoteSlots, backoff
from ._scheduling import Timers, describe_exit
from ._states import TERMINAL, TaskStatus, WorkerState
from ._task import Task
from ._worker import WorkerSpec, run_worker
from ._workers import Worker, WorkerSet

__all__ = ("Setup", "Supervisor")

log = logging.getLogger(__name__)

_EXIT_WAIT = 5.0  # seconds idle workers get to exit on their own at shutdown
_BIG_FRAME = 1 << 20  # bytes; a message this long (a big result) is unpickled off this thread
# seconds; the longest single wait of the loop: epoll takes at most ~24.8 days in milliseconds,
# and a deadline that far off (timeout=30 days) is simply waited for in steps.
_MAX_WAIT = 3600.0
# Initializer failures in a row (no task started meanwhile) that break the pool: a few, so
# a flaky one gets another chance, and few enough that futures fail within a second.
_INIT_FAILURES_TO_BREAK = 3
_SCAN_EVERY = 0.002  # seconds between reads of the slots for starts (see TaskEvents.scan)
_SCAN_LINGER = 0.05  # seconds the scan goes on once all is quiet (the next task often follows)


@dataclass(frozen=True, slots=True)
class Setup:
    """What the executor hands its supervisor: settings, shared state and the user's hooks.

    Its calls reach the executor through a weak reference, and the supervisor holds the
    executor itself only while it runs: once the pool has ended nothing here refers back
    to it, and a dropped executor is freed at once, not by the cyclic collector.
    """

    config: Config
    metrics: MetricsBlock
    callbacks: Callbacks
    tasks: dict[str, Task]  # the executor's: submitters add, the ledger settles and lets go
    futures_lane: Lane
    authkey: bytes
    initializer: bytes | None  # pickled initializer and hooks (see _executor)
    initargs: tuple[Any, ...]
    warm_up: bytes | None
    after_task: bytes | None
    companion: bytes | None
    remote_initializer: Callable[[], bytes | None]  # raises if it cannot travel
    outbox: Callable[[], Outbox]  # made once the manager runs
    mark_broken: Callable[[BrokenPoolError], list[Task]]  # refuses new tasks; the tasks known then


def _unpickle_big(item: tuple[Supervisor, Worker, Frame]) -> None:
    # On the decoder lane: unpickling the frame of a huge result copies it once more.
    supervisor, w, frame = item
    message = loads_gently(frame)
    del item, frame
    supervisor.call(lambda: supervisor._on_big(w, message))


class Supervisor(threading.Thread):
    """Owns workers, deadlines and task state; see the module docstring."""

    def __init__(self, setup: Setup, owner: object) -> None:
        super().__init__(name="procpool-supervisor", daemon=True)
        self.setup = setup
        self._owner: object = owner  # kept alive while the pool runs; let go once it has ended
        self.cfg = cfg = setup.config
        self.ready = threading.Event()
        self.start_error: BaseException | None = None
        self.queue: TaskQueueProxy | None = None
        self.dispatch_address: Any = None  # where workers and the executor's channel connect
        self.manager: QueueManager | None = None
        self.timers = Timers()
        self.commands: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        self._selector = selectors.DefaultSelector()  # wake pipe, manager, each worker's pipe and exit
        self._wake_lock = threading.Lock()  # no write may reach the pipe's fds once closed
        self._ended = False
        self._closing = False
        self._broken: BrokenPoolError | None = None
        self._manager_gone = False
        self._manager_pidfd = -1
        # Scanning the slots for starts. A submitter wakes the loop when this is False; it
        # is set False before the loop looks at the pending count a last time (see _scan).
        self.scanning = False
        self._quiet_since = 0.0
        self.workers = WorkerSet(cfg, setup.metrics, self._selector, self.timers)
        keep = (cfg.max_finished_tasks, cfg.finished_task_ttl)
        self.ledger = Ledger(setup.metrics, setup.callbacks, setup.tasks, setup.futures_lane, keep)
        self.events: TaskEvents | None = None  # needs the manager: made in run()
        self.health = HealthChecks(cfg, setup.metrics, self.workers, self.timers, self._kill, self._retire)
        link_setup = (setup.authkey, setup.metrics.name, setup.remote_initializer)
        self.remote = RemoteSlots(cfg, self.workers, self.timers, self._spawn, self._retire, link_setup)

    @property
    def host_names(self) -> dict[str, str]:
        """Remote worker name -> "host:port" (replaced whole: safe to read from any thread)."""
        return self.remote.host_names

    def _kill(self, w: Worker, reason: str, attempt: tuple[str, int] | None) -> None:
        assert self.events is not None
        self.events.kill(w, reason, attempt)

    def _retire(self, w: Worker) -> None:
        assert self.events is not None
        self.events.retire(w)

    # -- messages from other threads -------------------------------------

    def call(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the supervisor thread soon; False if the supervisor has ended."""
        with self._wake_lock:
            if self._ended:
                return False
            self.commands.append(fn)
            os.write(self._wake_w, b"x")
            return True

    # -- main loop ---------------------------------------------------------

    def run(self) -> None:
        try:
            self._start_manager()
            for slot in range(self.cfg.max_local_workers):
                self._spawn(slot)
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self.start_error = exc
            self.ready.set()
            self._teardown()
            self._owner = None
            return
        self.ready.set()
        self.health.arm(time.monotonic())
        try:
            self._loop()
        except BaseException:
            log.exception("procpool supervisor crashed; failing every unfinished task")
            self._fail_all(BrokenPoolError("the procpool supervisor thread crashed; see the log"))
        finally:
            self._teardown()
            self._owner = None

    def _loop(self) -> None:
        assert self.manager is not None and self.events is not None
        events = self.events
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._manager_pidfd = os.pidfd_open(self.manager._process.pid)  # type: ignore[attr-defined]
        self._selector.register(self._manager_pidfd, selectors.EVENT_READ, ("manager", None))
        while not (self._closing and self._idle()) and self._broken is None:
            due = self.timers.next_due()
            timeout = None if due is None else min(max(0.0, due - time.monotonic()), _MAX_WAIT)
            for key, _ in self._selector.select(timeout):
                kind, w = key.data  # w is None for "wake" and "manager"
                if kind == "wake":
                    os.read(self._wake_r, 4096)
                elif kind == "manager":
                    self._manager_lost()
                    return
                elif w.state is not WorkerState.GONE:  # not reaped earlier in this round
                    self._drain(w)
                    if kind == "exit":
                        self._reap(w)
            while self.commands:
                self.commands.popleft()()
            now = time.monotonic()
            self._fire_timers(now)
            if not self.scanning and (events.scan_wanted or self.ledger.pending()):
                self._arm_scan(now)
            self.ledger.flush()

    def _idle(self) -> bool:
        return self.ledger.unfinished() == 0

    def _fire_timers(self, now: float) -> None:
        assert self.events is not None
        for key in self.timers.pop_due(now):
            kind = key[0]  # type: ignore[index]
            if kind == "deadline":
                self.events.on_deadline(key[1], key[2])  # type: ignore[index]
            elif kind == "kill":
                self.workers.escalate(key[1], key[2])  # type: ignore[index]
            elif kind == "respawn" and not (self._closing and self._idle()):
                slot = key[1]  # type: ignore[index]
                if slot < self.cfg.max_local_workers or slot in self.remote.hosts:  # not removed meanwhile
                    self._spawn(slot)
            elif kind == "health":
                self.events.scan()  # a worker's lease is known before it is judged
                self.health.check(now)
                self.health.arm(now)
            elif kind == "scan":
                self._scan(now)

    def _arm_scan(self, now: float) -> None:
        self.scanning = True
        self._quiet_since = now
        self.timers.set(("scan",), now + _SCAN_EVERY)

    def _scan(self, now: float) -> None:
        assert self.events is not None
        if self.events.scan():
            self._quiet_since = now
        if now - self._quiet_since < _SCAN_LINGER:
            self.timers.set(("scan",), now + _SCAN_EVERY)
            return
        self.scanning = False  # first: a submitter that reads it after counted its task before
        if self.events.scan():
            self._arm_scan(now)

    # -- commands from other threads ------------------------------------------

    def cancel(self, task_id: str, kill: bool = True, reply: Any = None) -> None:
        """Cancel a task; ``reply`` (a Future) gets True if it will not complete."""
        assert self.events is not None
        self.events.cancel(task_id, kill, reply)

    def close(self, cancel_pending: bool) -> None:
        """Stop taking work; end once every task is finished."""
        assert self.events is not None
        self._closing = True
        if cancel_pending:
            self.events.cancel_pending()

    def add_host(self, host: RemoteHost, result: Any) -> None:
        self.remote.add_host(host, result)

    def remove_host(self, address: str, result: Any) -> None:
        self.remote.remove_host(address, result)

    # -- workers -------------------------------------------------------------

    def _start_manager(self) -> None:
        setup = self.setup
        self.manager = QueueManager(authkey=setup.authkey, ctx=self.cfg.context)
        jails = self.workers.jails
        root = None if jails.root is None else str(jails.root)
        if self.cfg.context.get_start_method() == "forkserver":
            mp_util.get_temp_dir()  # where the fork server's socket goes: made here, so known as ours
        args = (
            os.getpid(), setup.metrics.name, self.cfg.memory_sample_interval, setup.companion, root,
            setup.authkey, own_temp_dir(),
        )  # fmt: skip
        self.manager.start(init_manager, args)
        own(self.manager._process)  # type: ignore[attr-defined]
        self.queue = self.manager.get_queue()  # type: ignore[attr-defined]
        self.dispatch_address = self.queue.dispatch_address()
        link = ManagerLink(self.call, self.queue)
        self.events = TaskEvents(
            self.cfg, self.ledger, setup.tasks, self.workers, self.timers, link, setup.outbox, self.call
        )

    def _spawn(self, slot: int) -> None:
        assert self.manager is not None
        setup, ctx = self.setup, self.cfg.context
        reader, writer = ctx.Pipe(duplex=True)
        host = self.remote.hosts.get(slot)
        name = f"local-worker-{slot}" if host is None else self.remote.remote_name(slot)
        key = self.workers.new_key(name)
        cgroup = None if host is not None else self.workers.cgroup_for(key)
        if host is None:
            spec = WorkerSpec(
                key, slot, self.manager.address, self.dispatch_address, setup.authkey, writer,
                setup.metrics.name, self.cfg.max_tasks_per_worker, os.getpid(),
                heartbeat_interval(self.cfg.heartbeat_timeout), setup.initializer, setup.initargs,
                setup.warm_up, cgroup, setup.after_task, self.cfg.max_worker_memory_mb is not None,
            )  # fmt: skip
            process = ctx.Process(target=run_worker, args=(spec,), name=name)
        else:
            process = self.remote.link_process(slot, host, key, writer, self.dispatch_address)
        try:
            process.start()
            own(process)
        finally:
            writer.close()
        self.workers.add(slot, name, key, process, reader, cgroup, host)

    def _drain(self, w: Worker) -> None:
        """Handle the frames that have arrived from ``w``, in order; never blocks."""
        for frame in w.inbox.read():
            if w.backlog:
                w.backlog.append(frame)  # behind a big message being unpickled: in order
            else:
                self._take(w, frame)

    def _take(self, w: Worker, frame: Frame) -> None:
        """One frame: the raw result a "done" said follows, a small message, or a big one."""
        assert self.events is not None
        if w.result_head is not None:
            head, w.result_head = w.result_head, None
            self.events.on_message(w, (*head[:6], frame, *head[7:]))
        elif len(frame) >= _BIG_FRAME:
            w.backlog.append(frame)
            self.events.decoder.put(_unpickle_big, (self, w, frame))
        else:
            self._dispatch(w, pickle.loads(frame))

    def _dispatch(self, w: Worker, message: tuple[Any, ...]) -> None:
        assert self.events is not None
        if message[0] == "done" and isinstance(message[6], int):
            w.result_head = message  # its result (or error) follows as a raw frame of its own
        else:
            self.events.on_message(w, message)

    def _on_big(self, w: Worker, message: tuple[Any, ...]) -> None:
        """A big message was unpickled off this thread: handle it, then what waited behind it."""
        assert self.events is not None
        if w.state is WorkerState.GONE and message[0] != "done":
            return
        w.backlog.pop(0)
        self._dispatch(w, message)
        while w.backlog:
            frame = w.backlog[0]
            if w.result_head is None and len(frame) >= _BIG_FRAME:
                self.events.decoder.put(_unpickle_big, (self, w, frame))
                return
            w.backlog.pop(0)
            self._take(w, frame)

    def _reap(self, w: Worker) -> None:
        """A worker process ended: account for its task, sweep what it left, replace it."""
        assert self.events is not None
        exitcode = self.workers.reap(w, 0)  # it has exited (its pidfd said so): reaped at once
        self.workers.forget(w)
        self.workers.bury(w)  # whatever it left behind, however detached
        self.timers.discard(("kill", w.slot, w.pid))
        lost = self.events.on_death(w, exitcode)
        self.ledger.flush()  # its task is reported now, not after the replacement's fork
        self.workers.reaped(w, lost)
        if self.remote.removing(w.slot):
            self.remote.drop(w.slot)
            return
        if self._closing and self._idle():
            return
        if w.init_error is not None:
            self.workers.init_failures += 1
            if self.workers.init_failures >= _INIT_FAILURES_TO_BREAK:
                self._break_on_initializer(w.init_error)
                return
        delay = self.workers.respawn_delay(w, exitcode, backoff)
        if delay:
            log.warning(
                "worker %s %s at start-up; restarting in %.2f s", w.name, w.describe_exit(exitcode), delay
            )
            self.timers.set(("respawn", w.slot), time.monotonic() + delay)
        else:
            self._spawn(w.slot)

    # -- the pool breaks -------------------------------------------------------

    def _fail_all(self, error: BrokenPoolError) -> None:
        self._broken = error
        for task in self.setup.mark_broken(error):
            if task.status not in TERMINAL:
                self.ledger.move(task, TaskStatus.FAILED, error=error, finished_at=time.time())
        self.ledger.flush()

    def _break_on_initializer(self, error: BaseException) -> None:
        failures = self.workers.init_failures
        what = f"{type(error).__name__}: {error}"
        log.error("the initializer failed in %d workers in a row (%s); the pool is broken", failures, what)
        broken = BrokenPoolError(
            f"the initializer raised in {failures} workers in a row, so no task can run: {what}"
        )
        broken.__cause__ = error
        self._fail_all(broken)

    def _manager_lost(self) -> None:
        assert self.manager is not None
        proc = self.manager._process  # type: ignore[attr-defined]
        proc.join(0)
        self._manager_gone = True
        log.error("procpool manager process (pid %s) %s", proc.pid, describe_exit(proc.exitcode))
        if proc.exitcode is not None and proc.exitcode < 0:  # killed: its exit hooks did not run
            remove_sockets(a for a in (self.manager.address, self.dispatch_address) if isinstance(a, str))
        self._fail_all(
            BrokenPoolError(
                f"the procpool manager process (pid {proc.pid}) {describe_exit(proc.exitcode)}; "
                f"its queue is gone, so this executor cannot run tasks any more: create a new one"
            )
        )

    # -- teardown ------------------------------------------------------------

    def _teardown(self) -> None:
        """Stop every worker and the manager. Never raises."""
        try:
            if self.queue is not None and not self._manager_gone:
                self.queue.close()
        except (OSError, EOFError):
            pass
        deadline = time.monotonic() + _EXIT_WAIT
        while self.workers and time.monotonic() < deadline:
            pidfds = {w.pidfd: w for w in self.workers}
            for pidfd in wait(list(pidfds), deadline - time.monotonic()):
                w = pidfds[pidfd]  # type: ignore[index]
                if self.events is not None:
                    self._drain(w)
                self.workers.stop(w)
        for w in self.workers:
            self.workers.stop(w)
        if self.setup.companion is not None and self.queue is not None and not self._manager_gone:
            try:
                self.queue.stop_companions()
            except (OSError, EOFError):
                pass
        if self.manager is not None:
            try:
                self.manager.shutdown()
            except Exception:  # noqa: BLE001 - it may be dead already
                pass
        self.remote.end()
        if self.events is not None:
            self.events.link.close()
            self.events.close()
        self.workers.jails.close()
        with self._wake_lock:
            self._ended = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._selector.close()
        if self._manager_pidfd >= 0:
            os.close(self._manager_pidfd)
