"""Prometheus metrics for a pool (optional: ``pip install procpool[prometheus]``).

    executor.get_stats()  or  Watcher(block name)  ──▶  PoolCollector.collect()  ──▶  /metrics

In the pool's own process::

    server, port = start_metrics_server(executor, port=9464)

From another process, by the pool's block name (``get_stats()["metrics_block"]``)::

    registry.register(PoolCollector("procpool-4123-9f2c0a1b3d4e"))

Each scrape reads the shared-memory block once; it makes no IPC call to the pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._executor import DistributedExecutor
from ._metrics import MB
from ._watch import Watcher

__all__ = ("PoolCollector", "start_metrics_server")

# Per-worker figures: metric name, help, kind, how to get it from a worker's stats.
_WORKER_METRICS: tuple[tuple[str, str, str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("up", "1 while the worker process runs", "gauge", lambda w: float(w["active"])),
    ("healthy", "1 while the worker sends heartbeats", "gauge", lambda w: float(w["healthy"])),
    ("tasks_completed", "tasks the worker completed", "counter", lambda w: w["completed"]),
    ("tasks_failed", "tasks that failed on the worker, deaths included", "counter", lambda w: w["failed"]),
    ("restarts", "times the worker process was replaced", "counter", lambda w: w["restarts"]),
    ("busy_ratio", "share of the worker's life spent running tasks", "gauge", lambda w: w["load"]),
    ("memory_uss_bytes", "USS of the worker's process tree", "gauge", lambda w: _bytes(w["memory_mb"])),
    ("memory_pss_bytes", "PSS of the worker's process tree", "gauge", lambda w: _bytes(w["pss_mb"])),
    ("processes", "processes in the worker's tree", "gauge", lambda w: w["processes"]),
    ("cpu_percent", "CPU use of the worker's tree (100 is one core)", "gauge", lambda w: w["cpu_percent"]),
    (
        "heartbeat_age_seconds",
        "seconds since the worker's last heartbeat",
        "gauge",
        lambda w: w["heartbeat_age"],
    ),
)


def _bytes(mb: float | None) -> float | None:
    return None if mb is None else mb * MB


class PoolCollector(Collector):
    """Collects one pool's figures: an executor in this process, or a block name from any process."""

    def __init__(self, pool: DistributedExecutor | str) -> None:
        if isinstance(pool, str):
            self._watcher: Watcher | None = Watcher(pool)
            self._read = self._watcher.snapshot
        else:
            self._watcher = None
            self._read = pool.get_stats

    def close(self) -> None:
        """Release the block (for a collector made from a name)."""
        if self._watcher is not None:
            self._watcher.close()

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        pool = [s["metrics_block"]]
        submitted = CounterMetricFamily("procpool_tasks_submitted", "tasks submitted", labels=["pool"])
        submitted.add_metric(pool, s["total_tasks"])
        yield submitted
        waiting = GaugeMetricFamily("procpool_tasks", "unfinished tasks by state", labels=["pool", "state"])
        for state in ("pending", "running"):
            waiting.add_metric([*pool, state], s[f"{state}_tasks"])
        yield waiting
        finished = CounterMetricFamily(
            "procpool_tasks_finished", "tasks that reached a final state", labels=["pool", "state"]
        )
        for state in ("completed", "failed", "cancelled"):
            finished.add_metric([*pool, state], s[f"{state}_tasks"])
        yield finished
        retries = CounterMetricFamily("procpool_task_retries", "retries scheduled", labels=["pool"])
        retries.add_metric(pool, s["retried_tasks"])
        yield retries
        depth = GaugeMetricFamily(
            "procpool_queue_depth", "queued tasks by priority", labels=["pool", "priority"]
        )
        for priority, count in s["queue_depth"].items():
            depth.add_metric([*pool, priority], count)
        yield depth
        memory = GaugeMetricFamily("procpool_memory_uss_bytes", "USS of every worker tree", labels=["pool"])
        memory.add_metric(pool, s["memory_mb"] * MB)
        yield memory
        yield from _worker_metrics(pool[0], s["workers"])


def _worker_metrics(pool: str, workers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    for name, help_text, kind, get in _WORKER_METRICS:
        family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        metric = family(f"procpool_worker_{name}", help_text, labels=["pool", "worker"])
        for worker, view in workers.items():
            value = get(view)
            if value is not None:
                metric.add_metric([pool, worker], value)
        yield metric


def start_metrics_server(
    pool: DistributedExecutor | str, port: int = 0, addr: str = "127.0.0.1"
) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` for ``pool`` from a daemon thread; returns the server and its port.

    Listens on loopback unless ``addr`` says otherwise. Stop it with
    ``server.shutdown(); server.server_close()``.
    """
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))
    server, _ = start_http_server(port, addr, registry=registry)
    return server, server.server_port
