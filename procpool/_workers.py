"""The worker set: the supervisor's worker processes, their watch, kill ladder and containment.

    supervisor ── add(slot, process) ──▶ WorkerSet ── pipe + pidfd ──▶ the supervisor's selector
               ── doom(w, why, attempt) ──▶ SIGTERM to its jail now, SIGKILL after kill_grace (timer)
               ── bury(w) ──▶ its jail killed: the process and everything it started
    slot sections (shared memory) ◀── publish(): name, pid, restarts, tasks lost, health

Run on the supervisor thread only. A worker's life is one ``WorkerState``
(``_states``), changed only through ``advance``; ``DOOMED`` and ``FENCED`` decide
whether what it says still counts (see ``_supervisor``).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import selectors
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ._config import Config
from ._containment import Jail, Jails
from ._inbox import Frame, Inbox
from ._metrics import MetricsBlock
from ._remote.hosts import RemoteHost
from ._remote.link import describe_link_exit
from ._scheduling import Timers, describe_exit
from ._states import WorkerState, advance

__all__ = ("Worker", "WorkerSet")

log = logging.getLogger("procpool._supervisor")

_RESPAWN_BACKOFF_MAX = 2.0  # seconds; cap for workers that keep dying at start-up
_REAP_WAIT = 1.0  # seconds; bounds a wait that normally takes microseconds
_STOPPING = (WorkerState.DOOMED, WorkerState.FENCED)


@dataclass(slots=True)
class Worker:
    """A live worker process, as the supervisor sees it."""

    name: str  # stable per slot: "local-worker-0"
    key: str  # unique per process, for leases: "local-worker-0.3"
    slot: int
    process: Any  # multiprocessing.Process (BaseProcess)
    pid: int  # its pid, still known once the Process object is closed
    conn: Connection
    jail: Jail  # the process and everything it started (see _containment)
    inbox: Inbox  # its messages, read without blocking (a frozen sender cannot stall us)
    pidfd: int  # readable once the process has exited (os.pidfd_open)
    host: RemoteHost | None = None  # for a remote slot's link process: its host
    state: WorkerState = WorkerState.ACTIVE
    lease: tuple[str, int] | None = None  # task id and attempt it started (its slot, or "started")
    finished: tuple[str, int] | None = None  # the attempt whose "done" was read last
    awaited: tuple[str, int] | None = None  # a cancelled attempt it holds and has not started yet
    kill_reason: str | None = None  # why it is being killed: "timeout", "cancel", "hung" or "memory"
    killed_for: tuple[str, int] | None = None  # the task attempt it is being killed for
    note: str = ""  # for a worker killed as hung or out of memory: what was seen
    spawned: float = 0.0  # monotonic
    over_threshold: bool = False  # above memory_threshold_mb at the last check (warned once)
    ran_any: bool = False  # it reported at least one task (for the respawn backoff)
    backlog: list[Frame] = field(default_factory=list)  # frames that wait for a big one to decode
    result_head: tuple[Any, ...] | None = None  # a "done" whose result follows as a raw frame
    alive_at: float = 0.0  # monotonic: its start, or when its CPU time last grew while silent
    cpu_ticks: int = -1  # its CPU time (clock ticks) at the last look; -1 before the first
    state_seen: str = "wedged"  # what /proc said of it at the last look
    init_error: BaseException | None = None  # what its initializer raised, if it did
    released: tuple[str, int] | None = None  # what the manager had handed it, once it was killed
    release_known: bool = False  # the manager has said so (see TaskEvents._released)

    @property
    def stopping(self) -> bool:
        return self.state in _STOPPING

    def describe_exit(self, exitcode: int | None) -> str:
        """How it ended, for an error message: "was killed by SIGKILL (...)"."""
        said = None if self.host is None else describe_link_exit(exitcode, self.host)
        return said or describe_exit(exitcode)


class WorkerSet:
    """The live workers by slot, and everything done to their processes."""

    def __init__(
        self, cfg: Config, metrics: MetricsBlock, selector: selectors.BaseSelector, timers: Timers
    ) -> None:
        self.cfg = cfg
        self._timers = timers
        self.jails = Jails()
        self._selector = selector
        self._by_slot: dict[int, Worker] = {}
        slots = cfg.max_local_workers + cfg.max_remote_workers
        self._sections = [metrics.supervisor_section(i) for i in range(slots)]
        self._crashes = [0] * slots  # early deaths in a row, per slot
        self._restarts = [0] * slots
        self._busy_jails: list[Jail] = []  # killed, their cgroups not yet empty: removed later
        self._generation = itertools.count()
        self.init_failures = 0  # initializer failures since a task last started

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._by_slot.values()))

    def __len__(self) -> int:
        return len(self._by_slot)

    def get(self, slot: int) -> Worker | None:
        return self._by_slot.get(slot)

    def named(self, name: str | None) -> Worker | None:
        """The live worker called ``name`` (its slot name or its per-process key)."""
        for w in self._by_slot.values():
            if name in (w.name, w.key):
                return w
        return None

    def new_key(self, name: str) -> str:
        return f"{name}.{next(self._generation)}"

    def cgroup_for(self, key: str) -> str | None:
        return self.jails.path_for(key)

    # -- life ------------------------------------------------------------------

    def add(
        self, slot: int, name: str, key: str, process: Any, reader: Connection, cgroup: str | None,
        host: RemoteHost | None,
    ) -> Worker:  # fmt: skip
        """Watch a process just started: its pipe and its pidfd join the selector."""
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
        now = time.monotonic()
        w = self._by_slot[slot] = Worker(
            name, key, slot, process, process.pid, reader, Jail(process.pid, cgroup),
            Inbox(reader.fileno()), pidfd, host, spawned=now, alive_at=now,
        )  # fmt: skip
        self._selector.register(reader.fileno(), selectors.EVENT_READ, ("conn", w))
        self._selector.register(pidfd, selectors.EVENT_READ, ("exit", w))
        self.publish(slot, name, process.pid, active=True)
        return w

    def started(self, w: Worker, lease: tuple[str, int]) -> None:
        """``w`` said it started ``lease``: once that is the attempt it is killed for, it is fenced."""
        w.lease = lease
        w.ran_any = True
        self.init_failures = 0
        if w.state is WorkerState.DOOMED and lease == w.killed_for:
            w.state = advance(w.state, WorkerState.FENCED)

    def retire(self, w: Worker) -> bool:
        """Take no more tasks on ``w``; True if it was active (the manager must be told)."""
        if w.state is not WorkerState.ACTIVE:
            return False
        w.state = advance(w.state, WorkerState.RETIRING)
        return True

    def doom(self, w: Worker, reason: str, attempt: tuple[str, int] | None) -> bool:
        """Start the kill ladder for ``w`` (running ``attempt``): SIGTERM now, SIGKILL after
        ``kill_grace``. False if it was already being killed."""
        if w.stopping:
            return False
        w.kill_reason, w.killed_for = reason, attempt
        fenced = attempt is None or attempt == w.lease
        w.state = advance(w.state, WorkerState.FENCED if fenced else WorkerState.DOOMED)
        w.jail.signal(signal.SIGTERM)  # first: no call to the manager comes before a kill
        self._timers.set(("kill", w.slot, w.pid), time.monotonic() + self.cfg.kill_grace)
        return True

    def escalate(self, slot: int, pid: int) -> None:
        """The kill timer fired: SIGKILL whatever of that worker still runs."""
        w = self._by_slot.get(slot)
        if w is not None and w.pid == pid:
            grace = self.cfg.kill_grace
            log.warning("worker %s (pid %d) ignored SIGTERM for %.2f s; sending SIGKILL", w.name, pid, grace)
            w.jail.kill()

    def reap(self, w: Worker, timeout: float) -> int | None:
        """Wait up to ``timeout`` for ``w`` to exit, and reap it: its exit code (None: it runs on).

        The wait is on its pidfd. ``Process.join(timeout)`` waits on a sentinel pipe that
        a daemon the task left, holding the worker's fds, keeps open: join would then wait
        out its whole timeout (a death reported a second late).
        """
        if not select.select([w.pidfd], [], [], timeout)[0]:
            return None
        code: int | None = w.process._popen.poll(os.WNOHANG)  # a zombie now: this does not wait
        if code is None:  # under forkserver the server tells the code, over its own socket
            w.process.join(_REAP_WAIT)
            code = w.process.exitcode
        return code

    def forget(self, w: Worker) -> None:
        """Stop watching ``w``, which has exited."""
        del self._by_slot[w.slot]
        self._selector.unregister(w.conn.fileno())
        self._selector.unregister(w.pidfd)
        os.close(w.pidfd)
        w.state = advance(w.state, WorkerState.GONE)

    def bury(self, w: Worker) -> None:
        """Kill whatever ``w`` left behind, however detached, and remove its cgroup once empty."""
        w.jail.kill()
        self._busy_jails = [j for j in [*self._busy_jails, w.jail] if not j.remove()]

    def reaped(self, w: Worker, lost: int) -> None:
        w.conn.close()
        w.process.close()
        self.publish(w.slot, w.name, 0, active=False, lost=lost)

    def respawn_delay(self, w: Worker, exitcode: int | None, backoff: Callable[[int, float], float]) -> float:
        """Seconds before ``w``'s slot gets a new worker: longer for each early death in a row."""
        early = not w.ran_any and exitcode != 0 and w.kill_reason is None
        slot = w.slot
        self._crashes[slot] = self._crashes[slot] + 1 if early else 0
        self._restarts[slot] += 1
        if not early:
            return 0.0
        if w.host is not None:
            return backoff(self._crashes[slot], w.host.reconnect_max)
        return min(0.05 * 2.0 ** self._crashes[slot], _RESPAWN_BACKOFF_MAX)

    def stop(self, w: Worker) -> None:
        """The stop ladder at teardown: SIGTERM to all it holds, ``kill_grace``, SIGKILL, reap."""
        w.jail.signal(signal.SIGTERM)
        if self.reap(w, self.cfg.kill_grace) is None:
            log.warning("worker %s (pid %d) outlived SIGTERM by %.2f s; sending SIGKILL",
                        w.name, w.process.pid, self.cfg.kill_grace)  # fmt: skip
        self.bury(w)
        w.process.join()
        self.forget(w)
        w.conn.close()
        self.publish(w.slot, w.name, 0, active=False)
        w.process.close()

    # -- the slot sections of the metrics block ---------------------------------

    def publish(
        self, slot: int, name: str, pid: int, active: bool, lost: int = 0, healthy: bool = True
    ) -> None:
        section = self._sections[slot]
        old = section.read_own()
        created = old[4] or time.monotonic()
        restarts = self._restarts[slot]
        kind = 1 if slot < self.cfg.max_local_workers else 2  # local, remote_ssh (KIND_NAMES)
        section.write(name.encode(), kind, int(active), pid, created, restarts, old[6] + lost, int(healthy))

    def mark_unhealthy(self, w: Worker) -> None:
        self.publish(w.slot, w.name, w.pid, active=True, healthy=False)
