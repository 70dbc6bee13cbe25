"""Submissions on their way to the manager queue, sent in batches by one thread.

    submitters ── add ──▶ Outbox ── put_many (one IPC per batch) ──▶ manager queue

A submitter only appends and returns, so submitting one task costs no IPC
round trip; while one batch is in flight the next one gathers, so under load
tasks travel many per call, and when idle a task leaves at once.
"""

from __future__ import annotations

import logging
import threading

from ._queue import Item, TaskQueueProxy

__all__ = ("Outbox",)

log = logging.getLogger(__name__)


class Outbox:
    """Queued items not yet sent; ``flush_lock`` is held while a batch is in flight."""

    def __init__(self, queue: TaskQueueProxy) -> None:
        self._queue = queue
        self._items: list[Item] = []
        self._cond = threading.Condition()
        self._closed = False
        self.flush_lock = threading.Lock()  # held by cancel to see a task either here or in the queue
        self._thread = threading.Thread(target=self._run, name="procpool-outbox", daemon=True)
        self._thread.start()

    def add(self, items: list[Item]) -> None:
        """Queue items for sending, in order."""
        with self._cond:
            self._items.extend(items)
            self._cond.notify()

    def discard(self, task_id: str) -> bool:
        """Drop a task not yet sent; call with ``flush_lock`` held. True if it was here."""
        with self._cond:
            for index, item in enumerate(self._items):
                if item[2] == task_id:
                    del self._items[index]
                    return True
            return False

    def close(self) -> None:
        """Send what is left, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
            with self.flush_lock:  # never held while waiting: cancel takes it
                with self._cond:
                    items, self._items = self._items, []
                if not items:
                    continue  # a cancel took the last one meanwhile
                try:
                    self._queue.put_many(items)
                except (OSError, EOFError):
                    # The manager is gone; the supervisor sees its pidfd and
                    # fails every unfinished task, these included.
                    log.debug("outbox: manager gone, %d tasks not sent", len(items))
                    return
