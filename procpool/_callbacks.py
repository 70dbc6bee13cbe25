"""Calls made off the supervisor thread, so a slow or failing one never stalls the pool.

    supervisor ── put ──▶ Lane "procpool-futures"    settles each task's Future (done-callbacks run here)
               └─ fire ─▶ Lane "procpool-callbacks"  register_callback() callbacks, in event order

Two lanes: a user callback may wait for another task's result, which the
futures lane settles meanwhile. A Future's done-callback waiting for another
Future would wait for ever, as in ``concurrent.futures``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ("EVENTS", "Callbacks", "Lane")

log = logging.getLogger(__name__)

EVENTS = ("task_complete", "task_failed", "task_retrying", "task_cancelled")


class Lane:
    """One thread that runs calls in order. A call that raises (even SystemExit) is logged; the next runs."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], object], Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, fn: Callable[[Any], object], arg: Any) -> None:
        """Run ``fn(arg)`` on the lane's thread, after everything put before it."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        self._queue.put((fn, arg))

    def is_current(self) -> bool:
        return self._thread is threading.current_thread()

    def close(self) -> None:
        """Run what is queued, then stop the thread (not waited for when called from it)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, arg = item
            try:
                fn(arg)
            except BaseException:  # SystemExit and KeyboardInterrupt too: the next call still runs
                log.exception("procpool %s: %r failed for %s", self._name, fn, getattr(arg, "task_id", arg))
            del item, fn, arg  # while it waits for the next, it must hold no result alive


class Callbacks:
    """Registered callbacks, run on their own lane in order of events."""

    def __init__(self) -> None:
        self._by_event: dict[str, list[Callable[[Any], object]]] = {e: [] for e in EVENTS}
        self.lane = Lane("procpool-callbacks")

    def register(self, event: str, fn: Callable[[Any], object]) -> None:
        """Add ``fn`` for ``event``; raises ValueError or TypeError on bad input."""
        if event not in self._by_event:
            raise ValueError(f"unknown callback event {event!r}; expected one of {', '.join(EVENTS)}")
        if not callable(fn):
            raise TypeError(f"callback for {event!r} must be callable, not {type(fn).__name__}")
        self._by_event[event] = [*self._by_event[event], fn]  # replaced whole: fire() reads it unlocked

    def count(self, event: str) -> int:
        """How many callbacks ``event`` has."""
        return len(self._by_event[event])

    def fire(self, event: str | None, record: Any) -> int:
        """Queue every callback of ``event`` with ``record``; returns how many."""
        if event is None:
            return 0
        callbacks = self._by_event[event]
        for fn in callbacks:
            self.lane.put(fn, record)
        return len(callbacks)

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self.lane.close()
