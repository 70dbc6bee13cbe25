"""Remote hosts in the supervisor: their slots, link processes, reconnection and removal.

Run on the supervisor thread only. It owns which slot belongs to which host;
the processes themselves are the worker set's, started through ``spawn``.
Slots ``max_local_workers`` and up of the metrics block belong to remote
hosts; a removed host's slots are reused by the next host added.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from .._config import Config
from .._health import heartbeat_interval
from .._scheduling import Timers
from .._workers import Worker, WorkerSet
from .hosts import RemoteHost
from .link import LinkSpec, run_link

__all__ = ("RemoteSlots", "backoff")

log = logging.getLogger(__name__)

_BACKOFF_FIRST = 0.5  # seconds before the first reconnection attempt
DEADLINE_MARGIN = 2.0  # seconds past deadline + grace before the supervisor kills a link itself


def backoff(failures: int, cap: float) -> float:
    """Seconds to wait before reconnecting after ``failures`` failed attempts in a row."""
    return float(min(_BACKOFF_FIRST * 2 ** max(failures - 1, 0), cap))


class RemoteSlots:
    """Remote hosts' slots; see the module docstring."""

    def __init__(
        self, cfg: Config, workers: WorkerSet, timers: Timers, spawn: Callable[[int], None],
        retire: Callable[[Worker], None], link_setup: tuple[bytes, str, Callable[[], bytes | None]],
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.workers = workers
        self.timers = timers
        self._spawn = spawn
        self._retire = retire
        self._authkey, self._metrics_name, self._initializer = link_setup
        self.hosts: dict[int, RemoteHost] = {}  # slot -> its host, for every remote slot in use
        self.host_names: dict[str, str] = {}  # worker name -> "host:port"; replaced whole, read by get_stats
        self._removals: dict[str, concurrent.futures.Future[None]] = {}  # address -> done when drained

    def remote_name(self, slot: int) -> str:
        return f"remote-worker-{slot - self.cfg.max_local_workers}"

    def add_host(self, host: RemoteHost, result: concurrent.futures.Future[list[str]]) -> None:
        """Give ``host`` its slots and start their links."""
        if any(h.address == host.address for h in self.hosts.values()):
            result.set_exception(ValueError(f"{host.address} was already added; remove it first"))
            return
        first = self.cfg.max_local_workers
        free = [s for s in range(first, first + self.cfg.max_remote_workers) if s not in self.hosts]
        if len(free) < host.slots:
            result.set_exception(
                ValueError(
                    f"{host.slots} more remote slots would pass max_remote_workers="
                    f"{self.cfg.max_remote_workers} ({len(free)} free)"
                )
            )
            return
        slots = free[: host.slots]
        for slot in slots:
            self.hosts[slot] = host
        self.host_names = {**self.host_names, **{self.remote_name(s): host.address for s in slots}}
        for slot in slots:
            self._spawn(slot)
        log.info("remote host %s added with %d slots", host.address, host.slots)
        result.set_result([self.remote_name(s) for s in slots])

    def remove_host(self, address: str, result: concurrent.futures.Future[None]) -> None:
        """Drain ``address``: its links finish their tasks and exit; ``result`` is set once all did."""
        slots = [s for s, h in self.hosts.items() if h.address == address]
        if not slots or address in self._removals:
            result.set_exception(ValueError(f"no remote host {address} to remove"))
            return
        self._removals[address] = result
        for slot in slots:
            w = self.workers.get(slot)
            if w is None:
                self.drop(slot)  # between reconnection attempts
            else:
                self._retire(w)

    def end(self) -> None:
        """The pool ended: every removal still draining is done."""
        for result in self._removals.values():
            result.set_result(None)
        self._removals.clear()

    def removing(self, slot: int) -> bool:
        host = self.hosts.get(slot)
        return host is not None and host.address in self._removals

    def drop(self, slot: int) -> None:
        host = self.hosts.pop(slot)
        self.timers.discard(("respawn", slot))
        names = dict(self.host_names)
        names.pop(self.remote_name(slot), None)
        self.host_names = names
        if not any(h.address == host.address for h in self.hosts.values()):
            log.info("remote host %s removed", host.address)
            self._removals.pop(host.address).set_result(None)

    def link_process(self, slot: int, host: RemoteHost, key: str, writer: Connection, address: Any) -> Any:
        """The local link process of a remote slot (not started); ``address``: the dispatcher's."""
        silence = min(host.heartbeat_timeout, self.cfg.heartbeat_timeout or host.heartbeat_timeout)
        beat = heartbeat_interval(silence)
        spec = LinkSpec(
            key, slot, address, self._authkey, writer, self._metrics_name,
            self.cfg.max_tasks_per_worker, os.getpid(), host, self.cfg.kill_grace,
            self.cfg.memory_sample_interval, self._initializer(), beat,
        )  # fmt: skip
        return self.cfg.context.Process(target=run_link, args=(spec,), name=self.remote_name(slot))
