"""The supervisor thread: the one writer of task and worker state.

    submitters ── outbox ── put_many ──▶ manager queue ◀── take ── workers
         │                                                    │ started / done (pipe)
         └─ commands (cancel, shutdown) ─▶ supervisor ◀────────┘ + pidfds
                                             │ kill ladder, respawn, retries
                                             └─▶ ledger: records, futures, callbacks, metrics header

- It waits on result pipes, a pidfd per worker and one for the manager, and a
  wake-up pipe at once (one epoll set), with a timeout equal to the next
  timer (deadline, SIGKILL escalation or respawn). A pidfd becomes readable
  when the process itself exits, whatever its descendants still hold open (a
  sentinel pipe inherited by an escaped daemon would never close).
- Tasks change state only from here (``Ledger.move``); submitters only create them.
  Futures are settled, and callbacks run, on lanes of their own (``_callbacks``):
  no user code runs on this thread.
- Each worker has a ``Jail`` (``_containment``): its cgroup, or its tree as a
  subreaper. Kills go through it, so nothing a task started outlives its worker.
- Parts of it live in mixins, all run on this thread: task events
  (``_events.TaskEvents``), heartbeat and memory checks on a timer
  (``_checks.HealthChecks``), and remote hosts' slots (``_remote.slots``). A
  remote slot's worker is a local link process; it looks like any worker here.
- Leases: a result counts only for the task's current attempt, and not
  from a worker being killed once it started the attempt it is killed for,
  so no task completes twice (and none it finished before is lost).
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from ._callbacks import Lane
from ._checks import HealthChecks
from ._containment import Jail, Jails
from ._errors import (
    BrokenPoolError,
    WorkerLostError,
)
from ._events import TaskEvents
from ._health import heartbeat_interval
from ._inbox import Inbox
from ._ledger import Ledger, rebuild_error
from ._manager_link import ManagerLink
from ._queue import QueueManager, TaskQueueProxy, init_manager
from ._remote.hosts import RemoteHost
from ._remote.link import describe_link_exit
from ._remote.slots import RemoteSlots, backoff
from ._scheduling import Timers, describe_exit
from ._states import TERMINAL, TaskStatus
from ._task import Task
from ._worker import WorkerSpec, run_worker

if TYPE_CHECKING:
    from ._executor import DistributedExecutor

log = logging.getLogger(__name__)

_EXIT_WAIT = 5.0  # seconds idle workers get to exit on their own at shutdown
_REAP_WAIT = 1.0  # seconds; bounds a wait that normally takes microseconds
_BIG_FRAME = 1 << 20  # bytes; a message this long (a big result) is unpickled off this thread
# seconds; the longest single wait of the loop: epoll takes at most ~24.8 days in milliseconds,
# and a deadline that far off (timeout=30 days) is simply waited for in steps.
_MAX_WAIT = 3600.0
_RESPAWN_BACKOFF_MAX = 2.0  # seconds; cap for workers that keep dying at start-up
# Initializer failures in a row (no task started meanwhile) that break the pool: a few, so
# a flaky one gets another chance, and few enough that futures fail within a second.
_INIT_FAILURES_TO_BREAK = 3


@dataclass(slots=True)
class Worker:
    """A live worker process, as the supervisor sees it."""

    name: str  # stable per slot: "local-worker-0"
    key: str  # unique per process, for leases: "local-worker-0.3"
    slot: int
    process: Any  # multiprocessing.Process (BaseProcess)
    pid: int  # its pid, still known once the Process object is closed
    conn: Connection
    lease: tuple[str, int] | None = None  # task id and attempt it said it started
    doom: str | None = None  # why it is being killed: "timeout" or "cancel"
    doomed: tuple[str, int] | None = None  # the task attempt it is being killed for
    # Its messages no longer count: set once the doomed attempt's "started" is read (or at
    # once if it was read before). Messages before that are about tasks it ran to the end.
    fenced: bool = False
    jail: Jail | None = None  # the process and everything it started (see _containment)
    note: str = ""  # for a worker killed as hung or out of memory: what was seen
    spawned: float = 0.0  # monotonic
    recycling: bool = False  # retired for its memory; ends after its current task
    over_threshold: bool = False  # above memory_threshold_mb at the last check (warned once)
    ran_any: bool = False  # it reported at least one task (for the respawn backoff)
    inbox: Inbox | None = None  # its messages, read without blocking (a frozen sender cannot stall us)
    backlog: list[bytearray] = field(default_factory=list)  # frames that wait for a big one to decode
    host: RemoteHost | None = None  # for a remote slot's link process: its host
    pidfd: int = -1  # readable once the process has exited (os.pidfd_open)
    alive_at: float = 0.0  # monotonic: its start, or when its CPU time last grew while silent
    cpu_ticks: int = -1  # its CPU time (clock ticks) at the last look; -1 before the first
    state_seen: str = "wedged"  # what /proc said of it at the last look
    init_error: BaseException | None = None  # what its initializer raised, if it did


def _unpickle_big(item: tuple[Supervisor, Worker, bytearray]) -> None:
    # On the decoder lane: unpickling the frame of a huge result copies it once more.
    supervisor, w, frame = item
    message = pickle.loads(frame)
    del item, frame
    supervisor.call(lambda: supervisor._on_big(w, message))


class Supervisor(TaskEvents, HealthChecks, RemoteSlots, threading.Thread):
    """Owns workers, deadlines and task state; see the module docstring."""

    def __init__(self, executor: DistributedExecutor) -> None:
        super().__init__(name="procpool-supervisor", daemon=True)
        self.ex = executor
        self.cfg = executor._config
        self.metrics = executor._metrics
        self.ready = threading.Event()
        self.start_error: BaseException | None = None
        self.queue: TaskQueueProxy | None = None
        self.link: ManagerLink = None  # type: ignore[assignment]  # calls to the manager, off this thread; set with it
        self.manager: QueueManager | None = None
        self.workers: dict[int, Worker] = {}
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
        self._init_failures = 0  # initializer failures since a task last started
        slots = self.cfg.max_local_workers + self.cfg.max_remote_workers
        self._crashes = [0] * slots  # early deaths in a row, per slot
        self._restarts = [0] * slots
        self._init_remote()
        self.jails = Jails()
        self.decoder = Lane("procpool-decoder")  # unpickles what workers send back: user code
        self.decoding: set[tuple[str, int]] = set()  # attempts that ended, their outcome on the decoder
        self._busy_jails: list[Jail] = []  # killed, their cgroups not yet empty: removed later
        self._generation = itertools.count()
        keep = (self.cfg.max_finished_tasks, self.cfg.finished_task_ttl)
        self.ledger = Ledger(self.metrics, executor._callbacks, executor._tasks, executor._futures_lane, keep)
        self._slot_sections = [self.metrics.supervisor_section(i) for i in range(len(self._crashes))]

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
            return
        self.ready.set()
        self._arm_health(time.monotonic())
        try:
            self._loop()
        except BaseException:
            log.exception("procpool supervisor crashed; failing every unfinished task")
            self._fail_all(BrokenPoolError("the procpool supervisor thread crashed; see the log"))
        finally:
            self._teardown()

    def _loop(self) -> None:
        assert self.manager is not None
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
                elif self._is_live(w):  # not reaped earlier in this round
                    self._drain(w)
                    if kind == "exit":
                        self._reap(w)
            while self.commands:
                self.commands.popleft()()
            self._fire_timers(time.monotonic())

    def _is_live(self, w: Worker) -> bool:
        return self.workers.get(w.slot) is w

    def _idle(self) -> bool:
        return self.ledger.unfinished() == 0

    # -- workers -------------------------------------------------------------

    def _start_manager(self) -> None:
        ctx = self.cfg.context
        self.manager = QueueManager(authkey=self.ex._authkey, ctx=ctx)
        root = None if self.jails.root is None else str(self.jails.root)
        args = (os.getpid(), self.metrics.name, self.cfg.memory_sample_interval, self.ex._companion, root)
        self.manager.start(init_manager, args)
        self.queue = self.manager.get_queue()  # type: ignore[attr-defined]
        self.link = ManagerLink(self.call)

    def _spawn(self, slot: int) -> None:
        assert self.manager is not None
        ctx = self.cfg.context
        reader, writer = ctx.Pipe(duplex=True)
        host = self.hosts.get(slot)
        name = f"local-worker-{slot}" if host is None else self.remote_name(slot)
        key = f"{name}.{next(self._generation)}"
        cgroup = None if host is not None else self.jails.path_for(key)
        if host is None:
            spec = WorkerSpec(
                key, slot, self.manager.address, self.ex._authkey, writer,
                self.metrics.name, self.cfg.max_tasks_per_worker, os.getpid(),
                heartbeat_interval(self.cfg.heartbeat_timeout), self.ex._initializer, self.ex._initargs,
                self.ex._warm_up, cgroup, self.ex._after_task,
            )  # fmt: skip
            process = ctx.Process(target=run_worker, args=(spec,), name=name)
        else:
            process = self._link_process(slot, host, key, writer)
        try:
            process.start()
        finally:
            writer.close()
        try:
            os.setpgid(process.pid, process.pid)  # closes the race with the child's own call
        except OSError:
            pass  # it already did (or exec'd, under spawn)
        try:
            pidfd = os.pidfd_open(process.pid)  # before it can be reaped: the pid is still its own
        except OSError:  # out of fds, say: end it now rather than leave it unwatched
            Jail(process.pid, cgroup).kill()
            process.join()
            reader.close()
            raise
        w = self.workers[slot] = Worker(
            name, key, slot, process, process.pid, reader, inbox=Inbox(reader.fileno()),
            spawned=(now := time.monotonic()), alive_at=now, host=host, pidfd=pidfd,
            jail=Jail(process.pid, cgroup),
        )  # fmt: skip
        self._selector.register(reader.fileno(), selectors.EVENT_READ, ("conn", w))
        self._selector.register(w.pidfd, selectors.EVENT_READ, ("exit", w))
        self._publish_slot(slot, name, process.pid, active=True)

    def _publish_slot(
        self, slot: int, name: str, pid: int, active: bool, lost: int = 0, healthy: bool = True
    ) -> None:
        section = self._slot_sections[slot]
        old = section.read_own()
        created = old[4] or time.monotonic()
        restarts = self._restarts[slot]
        kind = 1 if slot < self.cfg.max_local_workers else 2  # local, remote_ssh (KIND_NAMES)
        section.write(name.encode(), kind, int(active), pid, created, restarts, old[6] + lost, int(healthy))

    def _forget(self, w: Worker) -> None:
        del self.workers[w.slot]
        self._selector.unregister(w.conn.fileno())
        self._selector.unregister(w.pidfd)
        os.close(w.pidfd)

    def _drain(self, w: Worker) -> None:
        """Handle the frames that have arrived from ``w``, in order; never blocks."""
        assert w.inbox is not None
        for frame in w.inbox.read():
            if w.backlog or len(frame) >= _BIG_FRAME:
                w.backlog.append(frame)  # after a big one, in order
                if len(w.backlog) == 1:
                    self.decoder.put(_unpickle_big, (self, w, frame))
                continue
            self._on_message(w, pickle.loads(frame))

    def _on_message(self, w: Worker, message: tuple[Any, ...]) -> None:
        if message[0] == "started":
            self._on_started(w, message[1], message[2])
        elif message[0] == "done":
            self._on_done(w, message)
        elif message[0] == "init_failed":  # at start-up only: rebuilt here, where _reap needs it
            w.init_error = rebuild_error(*message[1:])
        else:  # "timedout" or "lost", from a remote slot's link
            self._on_remote_end(w, message)

    def _on_big(self, w: Worker, message: tuple[Any, ...]) -> None:
        """A big frame was unpickled off this thread: handle it, then what waited behind it."""
        if not self._is_live(w) and message[0] != "done":
            return
        w.backlog.pop(0)
        self._on_message(w, message)
        while w.backlog:
            frame = w.backlog[0]
            if len(frame) >= _BIG_FRAME:
                self.decoder.put(_unpickle_big, (self, w, frame))
                return
            w.backlog.pop(0)
            self._on_message(w, pickle.loads(frame))

    def _reap(self, w: Worker) -> None:
        """A worker process ended: account for its task, sweep its group, replace it."""
        self._forget(w)
        w.process.join(_REAP_WAIT)  # it has exited (its pidfd said so): this reaps it at once
        exitcode = w.process.exitcode
        self._bury(w)  # whatever it left behind, however detached
        self.timers.discard(("kill", w.slot, w.process.pid))
        lost = self._account_for_death(w, exitcode)
        w.conn.close()
        w.process.close()
        self._publish_slot(w.slot, w.name, 0, active=False, lost=lost)
        if self._removing(w.slot):
            self._drop_slot(w.slot)
            return
        if self._closing and self._idle():
            return
        if w.init_error is not None:
            self._init_failures += 1
            if self._init_failures >= _INIT_FAILURES_TO_BREAK:
                self._break_on_initializer(w.init_error)
                return
        early = not w.ran_any and exitcode != 0 and w.doom is None
        self._crashes[w.slot] = self._crashes[w.slot] + 1 if early else 0
        self._restarts[w.slot] += 1
        delay = min(0.05 * 2 ** self._crashes[w.slot], _RESPAWN_BACKOFF_MAX) if early else 0.0
        if early and w.host is not None:
            delay = backoff(self._crashes[w.slot], w.host.reconnect_max)
        if delay:
            log.warning(
                "worker %s %s at start-up; restarting in %.2f s", w.name, self._describe(w, exitcode), delay
            )
            self.timers.set(("respawn", w.slot), time.monotonic() + delay)
        else:
            self._spawn(w.slot)

    def _bury(self, w: Worker) -> None:
        assert w.jail is not None
        w.jail.kill()
        self._busy_jails = [j for j in [*self._busy_jails, w.jail] if not j.remove()]

    def _account_for_death(self, w: Worker, exitcode: int | None) -> int:
        """Settle the task a dead worker held; returns 1 if a task was lost with it."""
        if w.doomed is not None:
            task = self.ex._tasks.get(w.doomed[0])
            if task is not None and task.attempt == w.doomed[1] and task.status not in TERMINAL:
                self._finish_killed(task, w)
            return 1
        if w.doom == "hung":
            w.lease = None  # released when it was doomed; its task, if any, was put back then
        if w.lease is not None:
            return self._lost(w, w.lease, exitcode)
        # It may have taken a task and died before saying so: the manager knows.
        queue = self.queue
        assert queue is not None
        self.link.send(lambda: queue.release(w.key), lambda lease: self._lost(w, lease, exitcode, True))
        return 0

    def _lost(
        self, w: Worker, lease: tuple[str, int] | None, exitcode: int | None, late: bool = False
    ) -> int:
        """Retry (or fail) the attempt a dead worker held; returns 1 if it was lost with it."""
        if lease is None or lease in self.decoding:
            return 0  # none, or it ended before the worker did (its outcome is being unpickled)
        task = self.ex._tasks.get(lease[0])
        if task is None or task.attempt != lease[1] or task.status in TERMINAL:
            return 0  # it finished before the worker ended
        retries = self.cfg.max_retries + 1
        error = WorkerLostError(
            f"worker {w.name} (pid {w.pid}) {self._describe(w, exitcode)} while running "
            f"task {task.task_id} (attempt {task.attempt} of {retries})"
        )
        self._fail_attempt(task, w.name, error, retryable=True)
        if late:
            self._count_lost(w.slot)
        return 1

    def _describe(self, w: Worker, exitcode: int | None) -> str:
        said = None if w.host is None else describe_link_exit(exitcode, w.host)
        return said or describe_exit(exitcode)

    def _doom(self, w: Worker, reason: str, doomed: tuple[str, int] | None) -> None:
        """Start the kill ladder for a worker (running task attempt ``doomed``): SIGTERM,
        SIGKILL after grace, and retire it with the manager."""
        if w.doom is not None:
            return
        w.doom, w.doomed = reason, doomed
        w.fenced = doomed is None or doomed == w.lease
        assert w.jail is not None
        w.jail.signal(signal.SIGTERM)  # first: no call to the manager comes before a kill
        self.timers.set(("kill", w.slot, w.pid), time.monotonic() + self.cfg.kill_grace)
        # Retired, it takes nothing more. It may already hold the next task (taken, its
        # "started" not read, or not sent): that one goes back in its place.
        queue = self.queue
        assert queue is not None
        self.link.send(lambda: queue.release(w.key), lambda lease: self._put_back(w, lease))

    def _put_back(self, w: Worker, lease: tuple[str, int] | None) -> None:
        if lease is not None and lease != w.doomed:
            self._requeue(lease)

    def _requeue(self, lease: tuple[str, int]) -> None:
        """Queue a leased attempt again, in its place, as if never taken."""
        task = self.ex._tasks.get(lease[0])
        # Only a task whose "started" was not read can be released with a doomed worker.
        waiting = (TaskStatus.PENDING, TaskStatus.RETRYING)
        if task is None or task.attempt != lease[1] or task.status not in waiting:
            return
        self._put(task)

    def _put(self, task: Task, then: Callable[[Any], None] | None = None) -> None:
        """Queue the task's current attempt (a retry keeps its place: same priority and seq)."""
        assert self.queue is not None and task.payload is not None
        queue, item = self.queue, (int(task.priority), task.seq, task.task_id, task.attempt, task.payload)
        self.link.send(lambda: queue.put(*item), then)

    def _count_lost(self, slot: int) -> None:
        """Count a task lost with a slot's worker, found out after the slot was published."""
        section = self._slot_sections[slot]
        old = section.read_own()
        section.write(*old[:6], old[6] + 1, old[7])

    def _fire_timers(self, now: float) -> None:
        for key in self.timers.pop_due(now):
            kind = key[0]  # type: ignore[index]
            if kind == "deadline":
                self._on_deadline(key[1], key[2])  # type: ignore[index]
            elif kind == "kill":
                w = self.workers.get(key[1])  # type: ignore[index]
                if w is not None and w.process.pid == key[2]:  # type: ignore[index]
                    log.warning(
                        "worker %s (pid %d) ignored SIGTERM for %.2f s; sending SIGKILL",
                        w.name, w.process.pid, self.cfg.kill_grace,
                    )  # fmt: skip
                    assert w.jail is not None
                    w.jail.kill()
            elif kind == "respawn" and not (self._closing and self._idle()):
                slot = key[1]  # type: ignore[index]
                if slot < self.cfg.max_local_workers or slot in self.hosts:  # not removed meanwhile
                    self._spawn(slot)
            elif kind == "health":
                self._check_health(now)
                self._arm_health(now)

    # -- state changes -------------------------------------------------------

    def _fail_all(self, error: BrokenPoolError) -> None:
        self._broken = error
        for task in self.ex._mark_broken(error):
            if task.status not in TERMINAL:
                self.ledger.move(task, TaskStatus.FAILED, error=error, finished_at=time.time())

    def _break_on_initializer(self, error: BaseException) -> None:
        what = f"{type(error).__name__}: {error}"
        log.error(
            "the initializer failed in %d workers in a row (%s); the pool is broken",
            self._init_failures,
            what,
        )
        broken = BrokenPoolError(
            f"the initializer raised in {self._init_failures} workers in a row, so no task can run: {what}"
        )
        broken.__cause__ = error
        self._fail_all(broken)

    def _manager_lost(self) -> None:
        assert self.manager is not None
        proc = self.manager._process  # type: ignore[attr-defined]
        proc.join(0)
        self._manager_gone = True
        log.error("procpool manager process (pid %s) %s", proc.pid, describe_exit(proc.exitcode))
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
            pidfds = {w.pidfd: w for w in self.workers.values()}
            for pidfd in wait(list(pidfds), deadline - time.monotonic()):
                w = pidfds[pidfd]  # type: ignore[index]
                self._drain(w)
                self._stop_worker(w)
        for w in list(self.workers.values()):
            self._stop_worker(w)
        if self.ex._companion is not None and self.queue is not None and not self._manager_gone:
            try:
                self.queue.stop_companions()
            except (OSError, EOFError):
                pass
        if self.manager is not None:
            try:
                self.manager.shutdown()
            except Exception:  # noqa: BLE001 - it may be dead already
                pass
        self._end_remote()
        if self.link is not None:
            self.link.close()
        self.jails.close()
        with self._wake_lock:
            self._ended = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._selector.close()
        self.decoder.close()
        if self._manager_pidfd >= 0:
            os.close(self._manager_pidfd)

    def _stop_worker(self, w: Worker) -> None:
        """The stop ladder at teardown: SIGTERM to all it holds, ``kill_grace``, SIGKILL, reap."""
        assert w.jail is not None
        w.jail.signal(signal.SIGTERM)
        w.process.join(self.cfg.kill_grace)
        if w.process.exitcode is None:
            log.warning("worker %s (pid %d) outlived SIGTERM by %.2f s; sending SIGKILL",
                        w.name, w.process.pid, self.cfg.kill_grace)  # fmt: skip
        self._bury(w)
        w.process.join()
        self._forget(w)
        w.conn.close()
        self._publish_slot(w.slot, w.name, 0, active=False)
        w.process.close()
