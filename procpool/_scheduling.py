"""Pure scheduling decisions: timers, retries and how a dead worker is described.

Nothing here touches processes or clocks; the supervisor passes ``now`` in,
so tests drive it with a fake clock.
"""

from __future__ import annotations

import heapq
import signal
from collections.abc import Hashable

__all__ = ("Timers", "describe_exit", "should_retry")

# Signals that usually mean something worth telling the user about.
_SIGNAL_HINTS = {
    signal.SIGKILL: " (out of memory, or killed by another process?)",
    signal.SIGSEGV: " (a segmentation fault in native code?)",
    signal.SIGABRT: " (an abort() in native code?)",
    signal.SIGBUS: " (a bus error in native code?)",
}


class Timers:
    """Deadlines keyed by a hashable key; earliest first; cancelling is O(1).

    A key set again replaces its earlier deadline.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        self._live: dict[Hashable, tuple[float, int]] = {}
        self._counter = 0  # breaks ties so keys are never compared

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._live

    def set(self, key: Hashable, when: float) -> None:
        """Fire ``key`` at ``when``."""
        self._counter += 1
        self._live[key] = (when, self._counter)
        heapq.heappush(self._heap, (when, self._counter, key))

    def discard(self, key: Hashable) -> None:
        """Forget ``key`` if it is set."""
        self._live.pop(key, None)

    def next_due(self) -> float | None:
        """When the earliest live timer fires, or None if there is none."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Hashable]:
        """Remove and return every key due at ``now``, earliest first."""
        due: list[Hashable] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, key = heapq.heappop(self._heap)
            del self._live[key]
            due.append(key)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            when, counter, key = heap[0]
            if self._live.get(key) == (when, counter):
                return
            heapq.heappop(heap)


def should_retry(attempt: int, max_retries: int) -> bool:
    """Whether a task whose ``attempt`` just failed gets another one.

    Attempt 1 is the first run, so a task runs at most ``max_retries + 1`` times.
    """
    return attempt <= max_retries


def describe_exit(exitcode: int | None) -> str:
    """Say how a worker process ended, from its ``Process.exitcode``."""
    if exitcode is None:
        return "vanished"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        sig = signal.Signals(-exitcode)
    except ValueError:
        return f"was killed by signal {-exitcode}"
    return f"was killed by {sig.name}{_SIGNAL_HINTS.get(sig, '')}"
