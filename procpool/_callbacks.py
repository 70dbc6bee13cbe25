"""User callbacks, run on their own thread so a slow or failing one never stalls the pool."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ("EVENTS", "Callbacks")

log = logging.getLogger(__name__)

EVENTS = ("task_complete", "task_failed", "task_retrying", "task_cancelled")


class Callbacks:
    """Registered callbacks and the thread that runs them, in order of events."""

    def __init__(self) -> None:
        self._by_event: dict[str, list[Callable[[Any], object]]] = {e: [] for e in EVENTS}
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], object], Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def register(self, event: str, fn: Callable[[Any], object]) -> None:
        """Add ``fn`` for ``event``; raises ValueError or TypeError on bad input."""
        if event not in self._by_event:
            raise ValueError(f"unknown callback event {event!r}; expected one of {', '.join(EVENTS)}")
        if not callable(fn):
            raise TypeError(f"callback for {event!r} must be callable, not {type(fn).__name__}")
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="procpool-callbacks", daemon=True)
                self._thread.start()
            self._by_event[event].append(fn)

    def fire(self, event: str | None, record: Any) -> None:
        """Queue every callback of ``event`` with ``record``."""
        if event is None:
            return
        for fn in self._by_event[event]:
            self._queue.put((fn, record))

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, record = item
            try:
                fn(record)
            except Exception:
                log.exception("procpool callback %r failed for task %s", fn, getattr(record, "task_id", "?"))
