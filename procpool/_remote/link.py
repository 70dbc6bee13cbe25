"""A remote worker slot: a local process that the supervisor treats like any worker.

    dispatcher ── task ──▶ link ══ frames over one SSH connection ══▶ agent (remote host)
    supervisor ◀── started / done / timedout / lost (pipe) ── link
               ──▶ the deadline of each started task; a go-ahead after a failure

- The link holds at most the one task it sent to its agent; the agent
  enforces the deadline on the remote host and reports how the task ended.
- The slot's heartbeat moves only when a beat arrives from the agent, and
  its memory figures are the agent's measures of the remote tree: the
  supervisor's health checks see the remote side, not this process.
- A connection silent for ``heartbeat_timeout``, or closed, ends the link
  (``EXIT_LOST``); the supervisor then retries its task elsewhere and starts
  a new link, which reconnects. Dying ends the connection, and the agent
  then kills its task: no late result can come from a lost lease.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .._dispatch import TaskLine
from .._errors import RemoteWorkerError
from .._metrics import MemoryWriter, SlotWriter
from .._process import guard_owner
from .._queue import STOP
from .._worker import needs_go_ahead, send_outcome
from .frames import FrameReader, encode
from .hosts import RemoteHost

__all__ = ("EXIT_LOST", "EXIT_UNREACHABLE", "LinkSpec", "describe_link_exit", "run_link")

EXIT_UNREACHABLE = 3  # could not connect or start the agent; the supervisor retries with a backoff
EXIT_LOST = 4  # the connection was lost: silent, closed, or the agent died
_IDLE_WAIT = 1.0  # seconds the link waits for a task before it checks its connection again
_NO_SAMPLES = 3600.0  # seconds between memory samples when sampling is off
_GONE = ("gone",)
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """Everything a link process needs; travels as Process arguments, never argv."""

    key: str  # unique per link process; leases are held under it
    slot: int
    address: Any  # the dispatcher's (see _dispatch)
    authkey: bytes = field(repr=False)  # the manager's; stays on this machine
    conn: Connection
    shm_name: str
    max_tasks: int | None  # per worker child on the host
    parent_pid: int
    host: RemoteHost  # its repr shows no secret
    kill_grace: float
    sample_interval: float | None
    initializer: bytes | None
    beat_interval: float  # seconds between the agent's beats: often enough for both heartbeat timeouts


def describe_link_exit(exitcode: int | None, host: RemoteHost) -> str | None:
    """Say how a link ended, if its exit code says more than the number."""
    if exitcode == EXIT_LOST:
        return f"lost its connection to {host.address}"
    if exitcode == EXIT_UNREACHABLE:
        return f"could not start a worker on {host.address}"
    return None


def run_link(spec: LinkSpec) -> None:
    """Entry point of a link process."""
    os.setpgid(0, 0)
    if not guard_owner(signal.SIGKILL, spec.parent_pid):
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    slot = SlotWriter(spec.shm_name, spec.slot)
    code = 0
    try:
        code = Link(spec, slot).serve()
    except (EOFError, OSError):
        pass  # the manager or the supervisor is gone
    finally:
        slot.close()
        spec.conn.close()
    sys.exit(code)


class Link:
    """One connection and the tasks sent over it."""

    def __init__(self, spec: LinkSpec, slot: SlotWriter) -> None:
        self.spec = spec
        self.slot = slot
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()  # agent frames, then _GONE
        self.lock = threading.Lock()  # one sender on the channel at a time
        self.session: Any = None
        self.memory = MemoryWriter(spec.shm_name)
        self.baseline = 0

    def serve(self) -> int:
        from . import ssh  # fabric is imported only where it is used

        host = self.spec.host
        connected = threading.Event()
        # Connecting takes up to a few connect timeouts; the slot shows "starting" and stays alive meanwhile.
        threading.Thread(target=self.beat_until, args=(connected,), name="connecting", daemon=True).start()
        try:
            self.session = ssh.open_agent(host)
        except RemoteWorkerError as exc:
            log.warning("remote worker %s: %s", self.spec.key, exc)
            return EXIT_UNREACHABLE
        finally:
            connected.set()
        try:
            return self.work()
        finally:
            self.session.close()
            self.memory.close()

    def beat_until(self, done: threading.Event) -> None:
        while not done.wait(self.spec.beat_interval):
            self.slot.beat()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.session.channel.sendall(encode(message))

    def work(self) -> int:
        spec, host = self.spec, self.spec.host
        self.session.channel.settimeout(host.heartbeat_timeout)
        sample = spec.sample_interval or _NO_SAMPLES
        self.send(
            ("hello", spec.beat_interval, host.heartbeat_timeout, spec.kill_grace, sample, spec.initializer,
             spec.max_tasks)
        )  # fmt: skip
        threading.Thread(target=self.read, name="agent-frames", daemon=True).start()
        threading.Thread(target=self.forward_stderr, name="agent-stderr", daemon=True).start()
        if self.events.get()[0] != "ready":
            log.warning("remote worker %s: the agent on %s did not start", spec.key, host.address)
            return EXIT_UNREACHABLE
        tasks = TaskLine(spec.address, spec.authkey, spec.key)
        self.slot.idle()
        tasks.ready()
        while True:  # the agent starts a fresh child after max_tasks: the connection stays
            if not self.events.empty():
                return EXIT_LOST  # nothing else arrives unasked: the connection is gone
            item = tasks.next(_IDLE_WAIT)
            if item is None:
                continue
            if item == STOP:
                break
            assert isinstance(item, tuple)
            if not self.run(*item):
                return EXIT_LOST
            tasks.ready()
        try:
            self.send(("stop",))  # the agent ends at once rather than when the connection closes
        except Exception:  # noqa: BLE001 - the connection is gone: the agent ends on its own
            pass
        return 0

    def run(self, task_id: str, attempt: int, payload: bytes) -> bool:
        """Run one task on the agent; False if the connection was lost meanwhile."""
        conn = self.spec.conn
        conn.send(("started", task_id, attempt))
        timeout = conn.recv()  # None: the task ended meanwhile (cancelled), skip it
        if timeout is None:
            return True
        self.slot.running(task_id, attempt)
        self.send(("run", task_id, attempt, payload, timeout))
        end = self.events.get()
        if end is _GONE:
            return False
        ok = end[0] == "done" and end[3]
        self.slot.finished(ok, end[5] if end[0] == "done" else end[3])
        if end[0] == "done":
            send_outcome(conn, end)
        else:
            conn.send(end)
        if needs_go_ahead(end):
            conn.recv()  # the supervisor has queued any retry: it keeps its place
        return True

    def read(self) -> None:
        """Frames from the agent: beats are handled here, the rest queued for the main thread."""
        reader = FrameReader(self.session.channel.recv)
        try:
            reader.skip_to_marker()
            while True:
                message = reader.read()
                if message[0] == "beat":
                    self.slot.beat()
                    self.record(message[1])
                    self.send(("ping",))  # the agent ends itself if these stop
                else:
                    self.events.put(message)
        except Exception as exc:  # noqa: BLE001 - a timeout, the end of the stream, a broken transport
            log.debug("remote worker %s: connection ended: %r", self.spec.key, exc)
        self.events.put(_GONE)

    def record(self, figures: tuple[int, int, int, int, float, bool] | None) -> None:
        if figures is None:
            return
        uss, pss, rss, processes, cpu, exact = figures
        self.baseline = self.baseline or uss
        self.memory.write(
            self.spec.slot, os.getpid(), uss, pss, rss, processes, cpu, time.monotonic(),
            self.baseline, int(exact), 0, 0, 0, 0,
        )  # fmt: skip

    def forward_stderr(self) -> None:
        """What remote tasks print goes to this process's stderr, as a local worker's would."""
        channel = self.session.channel
        while True:
            try:
                data = channel.recv_stderr(1 << 16)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - the connection is gone
                return
            if not data:
                return
            sys.stderr.buffer.write(data)
            sys.stderr.flush()
