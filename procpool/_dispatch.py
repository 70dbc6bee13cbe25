"""How tasks reach workers: the manager hands each idle worker its next task over a line of its own.

    executor ── channel (one-way frames of items) ──▶ Dispatcher (manager process) ◀── "ready" ── worker
                                                          │  pops the TaskQueue
                                                          └── task frame, or STOP ──▶ worker

A worker says "ready" on its line when it can run a task, and then blocks on
the line. The dispatcher answers with the next task (recording the lease) or,
if the queue is empty, keeps the worker as idle and answers when a task comes:
no take call, no polling, and no worker ever holds a task it is not running.
The dispatcher is one thread with one epoll set over the lines, the executor's
channel and a wake-up pipe (for changes made by the manager's RPC threads), so
a submission and the dispatch it causes happen without a thread switch.

Every line is a ``multiprocessing.connection`` authenticated with the pool's
random authkey, on a socket in a private directory; an accept thread does the
handshake, so a stalled client never holds up dispatch.

Frames to workers: b"S" (stop), or pickle((task id, attempt, payload)). Every
socket is non-blocking on the manager's side: what a line does not take at once
(a payload bigger than its buffer) is sent by a thread of its own, so a frozen
idle worker cannot stall dispatch for everyone.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import pickle
import select
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Protocol

from ._inbox import Inbox, framed, read_frame

__all__ = ("STOP_FRAME", "Dispatcher", "TaskLine", "open_channel")

log = logging.getLogger(__name__)

STOP_FRAME = b"S"
READY = b"R"
_READY_FRAME = framed(READY)
_HELLO_WORKER = "worker"
_HELLO_CHANNEL = "channel"


class Queue(Protocol):
    """What the dispatcher needs of the ``TaskQueue``."""

    on_change: Callable[[], None]

    def put_frame(self, frame: bytes | bytearray | mmap.mmap) -> None: ...
    def pop(self, worker: str) -> tuple[str, int, bytes] | str | None: ...
    def end_lease(self, worker: str) -> None: ...
    def stopping(self, worker: str) -> bool: ...


class Dispatcher:
    """Runs in the manager process: accepts lines, and hands out tasks from ``queue``."""

    def __init__(self, queue: Queue, authkey: bytes) -> None:
        self.queue = queue
        self._listener = Listener(family="AF_UNIX", authkey=authkey)
        self.address = self._listener.address
        # epoll itself: a selectors.Selector costs a few microseconds more per wake-up, on
        # every task's path.
        self._epoll = select.epoll()
        self._lines: dict[int, _Line] = {}  # by fd, as registered with epoll
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._new: list[_Line] = []  # accepted, not yet in the epoll set
        self._new_lock = threading.Lock()
        self._idle: collections.deque[_Line] = collections.deque()  # asked, and wait for a task
        self._closing = False
        queue.on_change = self.wake
        threading.Thread(target=self._accept, name="procpool-accept", daemon=True).start()
        threading.Thread(target=self._run, name="procpool-dispatch", daemon=True).start()

    def wake(self) -> None:
        """Have the dispatch thread look at the queue again (from any thread)."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, BrokenPipeError):
            pass  # a wake-up is pending already, or the dispatcher has closed

    def close(self) -> None:
        """Stop both threads and close every line (the manager process ends without this)."""
        self._closing = True
        self._listener.close()  # the accept thread's accept() raises
        self.wake()

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn = self._listener.accept()
                kind, name = conn.recv()
            except Exception:  # noqa: BLE001 - a client that failed the handshake or left: refused
                continue
            with self._new_lock:
                self._new.append(_Line(kind, name, conn))
            self.wake()

    def _run(self) -> None:
        lines = self._lines
        while not self._closing:
            for fd, _ in self._epoll.poll():
                line = lines.get(fd)
                if line is not None:
                    self._read(line)
                elif fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    self._register_new()
            self._pump()
        for line in list(lines.values()):
            self._drop(line)
        self._epoll.close()
        os.close(self._wake_r)

    def _register_new(self) -> None:
        with self._new_lock:
            new, self._new = self._new, []
        for line in new:
            self._lines[line.fd] = line
            self._epoll.register(line.fd, select.EPOLLIN)

    def _read(self, line: _Line) -> None:
        for frame in line.inbox.read():
            if line.kind == _HELLO_CHANNEL:
                self.queue.put_frame(frame)
            else:  # "ready"
                self.queue.end_lease(line.name)
                self._idle.append(line)
        if line.inbox.closed:
            self._drop(line)

    def _drop(self, line: _Line) -> None:
        if line.closed:
            return
        line.closed = True
        del self._lines[line.fd]
        self._epoll.unregister(line.fd)
        line.conn.close()
        if line in self._idle:
            self._idle.remove(line)

    def _pump(self) -> None:
        """Hand tasks to idle workers, and STOP to those that must end."""
        idle, self._idle = self._idle, collections.deque()
        while idle:
            line = idle.popleft()
            if line.closed:
                continue
            item = self.queue.pop(line.name)
            if item is None:  # nothing queued: it waits, as do the rest
                self._idle.append(line)
                for other in idle:
                    if self.queue.stopping(other.name):
                        self._send(other, STOP_FRAME)
                    else:
                        self._idle.append(other)
                return
            self._send(line, STOP_FRAME if item == "stop" else pickle.dumps(item, 5))

    def _send(self, line: _Line, frame: bytes) -> None:
        """Send without blocking; what the socket does not take at once goes on a thread of its own."""
        data = memoryview(framed(frame))
        try:
            sent = os.write(line.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(line)  # it died; the supervisor releases its lease
            return
        if sent < len(data):  # a big payload: a frozen worker must not stall the others
            fd = os.dup(line.fd)  # the thread's own: this line may be closed meanwhile
            threading.Thread(
                target=_send_rest, args=(fd, data[sent:]), name="procpool-send", daemon=True
            ).start()


class _Line:
    """One accepted connection: a worker's line, or the executor's channel."""

    __slots__ = ("closed", "conn", "fd", "inbox", "kind", "name")

    def __init__(self, kind: str, name: str, conn: Connection) -> None:
        self.kind = kind
        self.name = name
        self.conn = conn
        self.fd = conn.fileno()
        self.inbox = Inbox(self.fd)  # non-blocking from here
        self.closed = False


def _send_rest(fd: int, data: memoryview) -> None:
    try:
        while data:
            select.select([], [fd], [])
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                continue
    except OSError:
        pass  # it died; the dispatch thread sees its line close
    finally:
        os.close(fd)


def _connect(address: Any, authkey: bytes, kind: str, name: str) -> Connection:
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    conn.send((kind, name))
    return conn


class TaskLine:
    """A worker's line to the dispatcher (in the worker, or in a remote slot's link process)."""

    def __init__(self, address: Any, authkey: bytes, key: str) -> None:
        self._conn = _connect(address, authkey, _HELLO_WORKER, key)
        # Past the handshake the socket is read and written directly: a task costs one
        # read and one write of it, and none of Connection's per-call checks.
        self._fd = self._conn.fileno()
        self._pending = bytearray()  # read past a frame (never, as the dispatcher sends)
        self._poll = select.poll()  # made once: Connection.poll builds a selector per call
        self._poll.register(self._fd, select.POLLIN)

    def ready(self) -> None:
        """Ask for the next task; this ends the lease of the last one."""
        if os.write(self._fd, _READY_FRAME) != len(_READY_FRAME):
            raise OSError("the dispatcher's line took part of a frame")  # a blocking socket never does

    def next(self, timeout: float) -> tuple[str, int, bytes] | str | None:
        """The task sent after ``ready``: (id, attempt, payload), "stop", or None after ``timeout``."""
        if not self._pending and not self._poll.poll(timeout * 1000):
            return None
        frame = read_frame(self._fd, self._pending)
        if frame == STOP_FRAME:
            return "stop"
        item: tuple[str, int, bytes] = pickle.loads(frame)
        return item

    def close(self) -> None:
        self._conn.close()


def open_channel(address: Any, authkey: bytes) -> Connection:
    """The executor's one-way channel for submissions (see ``_outbox``)."""
    return _connect(address, authkey, _HELLO_CHANNEL, "")
