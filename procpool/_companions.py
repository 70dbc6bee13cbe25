"""Companion processes (such as a browser per worker), launched and owned by the manager process.

    worker ── queue.companion(slot) ──▶ manager connection thread ──▶ Companions thread
                                                                      launch / reuse / replace
    Sampler (manager) ── pids() ──▶ measures each companion's tree into its worker's slot
    pool end, or owner death ──▶ stop(): every companion is closed

A companion belongs to a worker *slot*, not to a worker process: when a
worker is killed (deadline, crash) its replacement gets the same companion,
still running. Launches happen on one long-lived thread, because a process
started with a parent-death signal gets it when the thread that started it
ends, and the manager's connection threads end with their worker.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Protocol

__all__ = ("Companion", "CompanionFactory", "Companions")

_LAUNCH_WAIT = 120.0  # seconds a worker waits for its companion to start


class Companion(Protocol):
    """What a companion factory returns for a slot."""

    pid: int  # the root of its process tree
    info: dict[str, Any]  # handed to the worker (picklable), e.g. {"endpoint": ...}

    def alive(self) -> bool: ...

    def kill(self) -> None:
        """Stop it; a replacement will be started for the slot."""

    def close(self) -> None:
        """Stop it for good (the pool is ending): also remove what it left on disk."""


class CompanionFactory(Protocol):
    def __call__(self, slot: int) -> Companion: ...


class Companions:
    """The manager's companions, one per slot."""

    def __init__(self, factory: CompanionFactory) -> None:
        self._factory = factory
        self._handles: dict[int, Companion] = {}
        self._lock = threading.Lock()  # guards _handles: the sampler reads it
        self._requests: queue.Queue[tuple[int, bool, Future[dict[str, Any]]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="procpool-companions", daemon=True)
        self._thread.start()

    def get(self, slot: int, replace: bool) -> dict[str, Any]:
        """The slot's companion info, starting one if it has none, or a dead one, or ``replace``."""
        done: Future[dict[str, Any]] = Future()
        self._requests.put((slot, replace, done))
        return done.result(_LAUNCH_WAIT)

    def pids(self) -> dict[int, int]:
        with self._lock:
            return {slot: handle.pid for slot, handle in self._handles.items()}

    def stop(self) -> None:
        """Close every companion and end the launching thread. Never raises."""
        self._requests.put(None)
        self.kill_all()

    def kill_all(self) -> None:
        """Close every companion (also from the manager's signal handler: takes no lock the
        main thread could hold). Never raises."""
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - the others must be closed all the same
                pass

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            slot, replace, done = request
            try:
                done.set_result(self._ensure(slot, replace).info)
            except BaseException as exc:  # noqa: BLE001 - the worker that asked gets it
                done.set_exception(exc)

    def _ensure(self, slot: int, replace: bool) -> Companion:
        with self._lock:
            handle = self._handles.get(slot)
        if handle is not None and (replace or not handle.alive()):
            handle.kill()
            handle = None
        if handle is None:
            handle = self._factory(slot)
            with self._lock:
                self._handles[slot] = handle
        return handle
