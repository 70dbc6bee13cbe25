"""The supervisor's health and memory checks: a timer reads every slot and acts on its verdict.

    supervisor timer ("health") ── read_health(slot) ──▶ judge() (pure, in _health)
        HUNG          ── kill the worker, retry its task
        OUT_OF_MEMORY ── kill the worker, fail its task with WorkerMemoryError
        RECYCLE       ── retire the worker: it ends after its current task

It runs on the supervisor thread, as part of the Supervisor class (a mixin).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._health import Verdict, heartbeat_interval, judge, parse_stat, silent_for
from ._metrics import MB, SlotHealth, read_health

if TYPE_CHECKING:
    from ._config import Config
    from ._manager_link import ManagerLink
    from ._metrics import MetricsBlock
    from ._queue import TaskQueueProxy
    from ._scheduling import Timers

__all__ = ("HealthChecks",)

log = logging.getLogger("procpool._supervisor")

_STATES = {"T": "stopped", "t": "stopped", "D": "in an uninterruptible wait"}
_HEALTH_PERIOD_MIN = 0.05  # seconds; health checks read shared memory only, but need not spin


class HealthChecks:
    """Mixed into Supervisor; uses its workers, timers, queue and kill ladder."""

    if TYPE_CHECKING:
        cfg: Config
        metrics: MetricsBlock
        queue: TaskQueueProxy | None
        link: ManagerLink
        timers: Timers
        workers: dict[int, Any]

        def _publish_slot(
            self, slot: int, name: str, pid: int, active: bool, lost: int = 0, healthy: bool = True
        ) -> None: ...

        def _doom(self, w: Any, reason: str, doomed: tuple[str, int] | None) -> None: ...

    def _arm_health(self, now: float) -> None:
        cfg = self.cfg
        periods = []
        if cfg.heartbeat_timeout is not None:
            periods.append(heartbeat_interval(cfg.heartbeat_timeout))
        if cfg.memory_sample_interval is not None and (cfg.max_worker_memory_mb or cfg.memory_threshold_mb):
            periods.append(cfg.memory_sample_interval)
        if periods:
            self.timers.set(("health",), now + max(min(periods), _HEALTH_PERIOD_MIN))

    def _check_health(self, now: float) -> None:
        """Act on each worker's heartbeat and memory figures."""
        buf = self.metrics.shm.buf
        assert buf is not None
        mb = self.cfg.max_worker_memory_mb
        for w in list(self.workers.values()):
            if w.doom is not None or w.recycling:
                continue
            pid = w.process.pid
            health = read_health(buf, w.slot)
            self._warn_memory(w, health)
            if self.cfg.heartbeat_timeout is not None and silent_for(now, w.alive_at, pid, health) > 2 * (
                heartbeat_interval(self.cfg.heartbeat_timeout)
            ):
                self._look_for_life(w, now)
            verdict = judge(
                now, w.alive_at, pid, health, heartbeat_timeout=self.cfg.heartbeat_timeout,
                memory_limit=None if mb is None else int(mb * MB), hard=self.cfg.hard_memory_limit,
                busy=w.lease is not None,
            )  # fmt: skip
            if verdict is Verdict.HUNG:
                silent = silent_for(now, w.alive_at, pid, health)
                w.note = f"sent no heartbeat and used no CPU for {silent:.1f} s ({w.state_seen})"
                log.warning("worker %s (pid %d) %s; killing and replacing it", w.name, pid, w.note)
                self._publish_slot(w.slot, w.name, pid, active=True, healthy=False)
                self._doom(w, "hung", w.lease)
            elif verdict is Verdict.OUT_OF_MEMORY:
                w.note = _over_limit(health, mb)
                log.warning("worker %s (pid %d) %s; killing its task", w.name, pid, w.note)
                self._doom(w, "memory", w.lease)
            elif verdict is Verdict.RECYCLE:
                used = _over_limit(health, mb)
                log.info("worker %s (pid %d) %s; replacing it after its current task", w.name, pid, used)
                w.recycling = True
                self._retire(w.key)

    def _look_for_life(self, w: Any, now: float) -> None:
        """A silent worker whose CPU time grows and that is not stopped is busy, not hung."""
        try:
            with open(f"/proc/{w.process.pid}/stat") as f:
                state, ticks = parse_stat(f.read())
        except (OSError, ValueError, IndexError):
            return  # gone, or no /proc: the heartbeat alone decides
        w.state_seen = _STATES.get(state, "wedged")
        if 0 <= w.cpu_ticks < ticks and state not in ("T", "t"):
            w.alive_at = now  # busy in a call that holds the GIL: that is life
        w.cpu_ticks = ticks

    def _warn_memory(self, w: Any, health: SlotHealth) -> None:
        threshold = self.cfg.memory_threshold_mb
        if threshold is None or health.memory_pid != w.process.pid:
            return
        over = health.uss > threshold * MB
        if over and not w.over_threshold:
            log.warning(
                "worker %s (pid %d) uses %.0f MB (USS of its process tree), over memory_threshold_mb=%g",
                w.name, w.process.pid, health.uss / MB, threshold,
            )  # fmt: skip
        w.over_threshold = over

    def _retire(self, key: str) -> None:
        queue = self.queue
        assert queue is not None
        self.link.send(lambda: queue.retire(key))  # off this thread: the manager may be frozen


def _over_limit(health: SlotHealth, limit: float | None) -> str:
    return f"uses {health.uss / MB:.0f} MB (USS of its process tree), over max_worker_memory_mb={limit}"
