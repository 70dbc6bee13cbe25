"""Submissions on their way to the manager: written by the submitter itself, never waited for.

    submitters ── add ──▶ Outbox ── one frame per add, non-blocking ──▶ channel ──▶ dispatcher

A submitter pickles its items into one frame and writes it to the channel
without blocking: the usual case costs one ``send`` and no thread switch. What
the socket does not take at once (the manager is frozen, or far behind) waits
here, in order, and a flusher thread sends it when the socket drains; later
submissions queue behind it, so the manager sees them in submission order.

``discard`` takes back a task that has not been written yet. Once written a
task is the manager's: ``TaskQueue.cancel`` waits until it has read that far.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import threading
from multiprocessing.connection import Connection

from ._inbox import framed
from ._queue import Item

__all__ = ("Outbox",)

log = logging.getLogger(__name__)

_CLOSE_WAIT = 5.0  # seconds the pool's end waits for unsent items (a frozen manager: not for ever)


def _frame(items: list[Item]) -> bytes:
    return framed(pickle.dumps(items, 5))


class Outbox:
    """Items on their way to the dispatcher, in submission order."""

    def __init__(self, channel: Connection) -> None:
        self._channel = channel
        self._fd = channel.fileno()
        os.set_blocking(self._fd, False)
        self._lock = threading.Condition()
        self._waiting: list[Item] = []  # not yet written: behind ``_rest``, or the socket was full
        self._rest = memoryview(b"")  # the unwritten end of a frame partly written
        self._broken = False  # the manager is gone: nothing more is sent
        self._closed = False
        self._thread: threading.Thread | None = None

    def add(self, items: list[Item]) -> None:
        """Send items, in order; returns at once, whatever the manager does."""
        with self._lock:
            if self._broken:
                return  # the supervisor sees the manager's pidfd and fails every task
            if self._rest or self._waiting:
                self._waiting.extend(items)  # behind what waits: in order
                return
            self._write(memoryview(_frame(items)))
            if self._rest:
                self._flusher()

    def discard(self, task_id: str) -> bool:
        """Take back a task not yet written. True if it was here."""
        with self._lock:
            for index, item in enumerate(self._waiting):
                if item[2] == task_id:
                    del self._waiting[index]
                    return True
            return False

    def close(self) -> None:
        """Send what is left (waiting a bounded time), then close the channel."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(_CLOSE_WAIT)
        with self._lock:
            self._broken = True
            self._channel.close()

    def _write(self, data: memoryview) -> None:
        """Write what the socket takes now; keep the rest. Called with the lock held."""
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            log.debug("outbox: the manager is gone; items not sent")
            self._broken = True
            self._waiting.clear()
            sent = len(data)
        self._rest = data[sent:]

    def _flusher(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._flush, name="procpool-outbox", daemon=True)
            self._thread.start()
        self._lock.notify()

    def _flush(self) -> None:
        while True:
            with self._lock:
                while not (self._rest or self._waiting) and not self._closed:
                    self._lock.wait()
                if self._broken or not (self._rest or self._waiting):
                    return
            try:
                select.select([], [self._fd], [], 1.0)  # the socket can take more (or a second passed)
            except (OSError, ValueError):
                return  # closed by close() after its bounded wait: the manager never drained it
            with self._lock:
                if self._broken:
                    return
                if self._rest:
                    self._write(self._rest)
                if not self._rest and self._waiting:
                    items, self._waiting = self._waiting, []
                    self._write(memoryview(_frame(items)))
