"""Remote hosts in the supervisor: their slots, link processes, reconnection and removal.

Mixed into the Supervisor and run on its thread only, like the rest of it.
Slots ``max_local_workers`` and up of the metrics block belong to remote
hosts; a removed host's slots are reused by the next host added.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from .._errors import TaskTimeoutError, WorkerLostError
from .._health import heartbeat_interval
from .._states import TaskStatus
from .hosts import RemoteHost
from .link import LinkSpec, run_link

if TYPE_CHECKING:
    from .._config import Config
    from .._executor import DistributedExecutor
    from .._ledger import Ledger
    from .._metrics import MetricsBlock
    from .._queue import QueueManager
    from .._scheduling import Timers
    from .._task import Task

__all__ = ("RemoteSlots", "backoff")

log = logging.getLogger(__name__)

_BACKOFF_FIRST = 0.5  # seconds before the first reconnection attempt
DEADLINE_MARGIN = 2.0  # seconds past deadline + grace before the supervisor kills a link itself


def backoff(failures: int, cap: float) -> float:
    """Seconds to wait before reconnecting after ``failures`` failed attempts in a row."""
    return float(min(_BACKOFF_FIRST * 2 ** max(failures - 1, 0), cap))


class RemoteSlots:
    """The remote part of the supervisor; see the module docstring."""

    if TYPE_CHECKING:
        cfg: Config
        ex: DistributedExecutor
        metrics: MetricsBlock
        ledger: Ledger
        manager: QueueManager | None
        timers: Timers
        workers: dict[int, Any]

        def _publish_slot(
            self, slot: int, name: str, pid: int, active: bool, lost: int = 0, healthy: bool = True
        ) -> None: ...
        def _retire(self, key: str) -> None: ...
        def _fail_attempt(self, task: Task, worker: str, error: BaseException, retryable: bool) -> None: ...

    def _init_remote(self) -> None:
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
            self._spawn(slot)  # type: ignore[attr-defined]
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
                self._drop_slot(slot)  # between reconnection attempts
            else:
                w.recycling = True
                self._retire(w.key)

    def _end_remote(self) -> None:
        """The pool ended: every removal still draining is done."""
        for result in self._removals.values():
            result.set_result(None)
        self._removals.clear()

    def _removing(self, slot: int) -> bool:
        host = self.hosts.get(slot)
        return host is not None and host.address in self._removals

    def _drop_slot(self, slot: int) -> None:
        host = self.hosts.pop(slot)
        self.timers.discard(("respawn", slot))
        names = dict(self.host_names)
        names.pop(self.remote_name(slot), None)
        self.host_names = names
        if not any(h.address == host.address for h in self.hosts.values()):
            log.info("remote host %s removed", host.address)
            self._removals.pop(host.address).set_result(None)

    def _link_process(self, slot: int, host: RemoteHost, key: str, writer: Any) -> Any:
        assert self.manager is not None
        silence = min(host.heartbeat_timeout, self.cfg.heartbeat_timeout or host.heartbeat_timeout)
        beat = heartbeat_interval(silence)
        spec = LinkSpec(
            key, slot, self.manager.address, self.ex._authkey, writer, self.metrics.name,
            self.cfg.max_tasks_per_worker, os.getpid(), host, self.cfg.kill_grace,
            self.cfg.memory_sample_interval, self.ex._remote_initializer, beat,
        )  # fmt: skip
        return self.cfg.context.Process(target=run_link, args=(spec,), name=self.remote_name(slot))

    def _answer_started(self, w: Any, task: Task | None) -> None:
        """Tell a link the deadline of the task it started, or None to skip it (it ended meanwhile)."""
        try:
            w.conn.send(None if task is None else task.timeout)
        except OSError:
            pass  # it died meanwhile; its sentinel tells the rest

    def _on_remote_end(self, w: Any, message: tuple[Any, ...]) -> None:
        """A task that the agent killed at its deadline ("timedout") or whose process died ("lost")."""
        kind, task_id, attempt, elapsed, detail = message
        w.lease = None
        task = self.ex._tasks.get(task_id)
        live = task is not None and task.attempt == attempt and task.status is TaskStatus.RUNNING
        if live and not w.fenced:
            assert task is not None
            self.timers.discard(("deadline", task_id, attempt))
            where = f"{w.name} on {w.host.address}"
            if kind == "timedout":
                how = "SIGKILL after SIGTERM" if detail else "SIGTERM"
                timed_out = TaskTimeoutError(
                    f"task {task_id} exceeded its {task.timeout:g} s deadline; its process group on "
                    f"{where} was killed ({how})"
                )
                end = time.time()
                self.ledger.move(
                    task, TaskStatus.CANCELLED, error=timed_out, finished_at=end, execution_time=elapsed
                )
            else:
                retries = self.cfg.max_retries + 1
                error = WorkerLostError(
                    f"the worker process of {where} {detail} while running task {task_id} "
                    f"(attempt {attempt} of {retries})"
                )
                self._fail_attempt(task, w.name, error, retryable=True)
        try:
            w.conn.send(True)  # go ahead: any retry is queued
        except OSError:
            pass
