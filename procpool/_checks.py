"""The supervisor's health and memory checks: a timer reads every slot and acts on its verdict.

    supervisor timer ("health") ── read_health(slot) ──▶ judge() (pure, in _health)
        HUNG          ── kill the worker, retry its task
        OUT_OF_MEMORY ── kill the worker, fail its task with WorkerMemoryError
        RECYCLE       ── retire the worker: it ends after its current task

Run on the supervisor thread. It reads the worker set and shared memory, and acts
only through the two calls it is given: ``kill`` (the kill ladder) and ``retire``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ._config import Config
from ._health import Verdict, heartbeat_interval, judge, parse_stat, silent_for
from ._metrics import MB, MetricsBlock, SlotHealth, read_health
from ._scheduling import Timers
from ._states import WorkerState
from ._workers import Worker, WorkerSet

__all__ = ("HealthChecks",)

log = logging.getLogger("procpool._supervisor")

_STATES = {"T": "stopped", "t": "stopped", "D": "in an uninterruptible wait"}
_HEALTH_PERIOD_MIN = 0.05  # seconds; health checks read shared memory only, but need not spin


Kill = Callable[[Worker, str, "tuple[str, int] | None"], None]


class HealthChecks:
    """Judges every active worker on a timer; see the module docstring."""

    def __init__(
        self, cfg: Config, metrics: MetricsBlock, workers: WorkerSet, timers: Timers,
        kill: Kill, retire: Callable[[Worker], None],
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.metrics = metrics
        self.workers = workers
        self.timers = timers
        self._kill = kill
        self._retire = retire

    def arm(self, now: float) -> None:
        cfg = self.cfg
        periods = []
        if cfg.heartbeat_timeout is not None:
            periods.append(heartbeat_interval(cfg.heartbeat_timeout))
        if cfg.memory_sample_interval is not None and (cfg.max_worker_memory_mb or cfg.memory_threshold_mb):
            periods.append(cfg.memory_sample_interval)
        if periods:
            self.timers.set(("health",), now + max(min(periods), _HEALTH_PERIOD_MIN))

    def check(self, now: float) -> None:
        """Act on each worker's heartbeat and memory figures."""
        buf = self.metrics.shm.buf
        assert buf is not None
        mb = self.cfg.max_worker_memory_mb
        for w in self.workers:
            if w.state is not WorkerState.ACTIVE:
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
                self.workers.mark_unhealthy(w)
                self._kill(w, "hung", w.lease)
            elif verdict is Verdict.OUT_OF_MEMORY:
                w.note = _over_limit(health, mb)
                log.warning("worker %s (pid %d) %s; killing its task", w.name, pid, w.note)
                self._kill(w, "memory", w.lease)
            elif verdict is Verdict.RECYCLE:
                used = _over_limit(health, mb)
                log.info("worker %s (pid %d) %s; replacing it after its current task", w.name, pid, used)
                self._retire(w)

    def _look_for_life(self, w: Worker, now: float) -> None:
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

    def _warn_memory(self, w: Worker, health: SlotHealth) -> None:
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


def _over_limit(health: SlotHealth, limit: float | None) -> str:
    return f"uses {health.uss / MB:.0f} MB (USS of its process tree), over max_worker_memory_mb={limit}"
