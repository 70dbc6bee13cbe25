"""The supervisor's calls to the manager, made on a thread of their own.

    supervisor ── send(call, then) ──▶ ManagerLink thread ── call(queue) (blocks while the manager is frozen)
               ◀── supervisor.call(then(result)) ──┘

It is the supervisor's one door to the manager: each call is given the queue proxy.

The supervisor never waits on the manager: kills, death reports and deadlines
go on while a call is stuck. Calls run in the order sent, so a retry's put
comes before the go-ahead that lets its worker take again. A call that fails
because the manager is gone gives None; the manager's pidfd reports the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._queue import TaskQueueProxy

__all__ = ("ManagerLink",)

log = logging.getLogger(__name__)

_CLOSE_WAIT = 5.0  # seconds the pool's end waits for calls in flight (a frozen manager: not for ever)

Then = Callable[[Any], object]
Call = Callable[["TaskQueueProxy"], Any]


class ManagerLink:
    """Runs ``call(queue)`` in order off the supervisor's thread; ``post`` brings each result back."""

    def __init__(self, post: Callable[[Callable[[], None]], bool], queue_proxy: TaskQueueProxy) -> None:
        self._post = post  # Supervisor.call: runs a function on the supervisor thread soon
        self._queue = queue_proxy
        self._calls: queue.SimpleQueue[tuple[Call, Then | None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="procpool-manager-link", daemon=True)
        self._thread.start()

    def send(self, call: Call, then: Then | None = None) -> None:
        """Run ``call(queue)`` on the link's thread; then ``then(result)`` on the supervisor's."""
        self._calls.put((call, then))

    def close(self) -> None:
        """Make the calls already sent, then stop (waiting a bounded time)."""
        self._calls.put(None)
        self._thread.join(_CLOSE_WAIT)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            call, then = item
            try:
                result = call(self._queue)
            except (OSError, EOFError):
                result = None  # the manager is gone
            except Exception:
                log.exception("procpool: a call to the manager failed")
                result = None
            if then is not None:
                self._post(lambda then=then, result=result: then(result))  # type: ignore[misc]
            del item, call, then
