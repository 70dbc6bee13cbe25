"""Watching a running pool from another process: ``top`` and the Prometheus collector."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import faults
import pytest
from conftest import wait_until

from procpool import DistributedExecutor
from procpool._metrics import MetricsBlock
from procpool._watch import Watcher, list_pools
from procpool.prometheus import PoolCollector, start_metrics_server

STABLE = ("total_tasks", "completed_tasks", "failed_tasks", "pending_tasks", "queue_depth", "total_workers")


def top(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procpool", "top", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def busy(make_executor: Callable[..., DistributedExecutor]) -> DistributedExecutor:
    """A pool with finished work and memory figures to show."""
    executor = make_executor(memory_sample_interval=0.05)
    executor.wait_for_tasks([executor.submit_task(faults.double, args=(i,)) for i in range(6)])
    sampled = lambda: all(w["memory_mb"] for w in executor.get_stats()["workers"].values())  # noqa: E731
    assert wait_until(sampled, 10)
    return executor


def test_top_once_json_from_another_process_matches_get_stats(busy: DistributedExecutor) -> None:
    name = busy.metrics_block
    out = top(name, "--once", "--json")
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    mine = busy.get_stats()
    assert {k: seen[k] for k in STABLE} == {k: mine[k] for k in STABLE}
    assert seen["metrics_block"] == name
    for worker, view in mine["workers"].items():
        theirs = seen["workers"][worker]
        assert (theirs["pid"], theirs["completed"], theirs["state"]) == (
            view["pid"],
            view["completed"],
            view["state"],
        )
    # The watcher must leave the block alone when it exits (no resource tracker unlinks it).
    assert (Path("/dev/shm") / name).exists()
    assert top(name, "--once", "--json").returncode == 0


def test_top_lists_running_pools_and_draws_a_table(busy: DistributedExecutor) -> None:
    listing = top()
    assert busy.metrics_block in listing.stdout and f"creator pid {os.getpid()} (running)" in listing.stdout
    assert busy.metrics_block in [p.name for p in list_pools()]
    frame = top(busy.metrics_block, "--once").stdout
    assert "local-worker-0" in frame and "local-worker-1" in frame and "completed 6" in frame
    assert "\x1b[" not in frame  # no terminal effects into a pipe


def test_top_follows_a_pool_until_it_ends(make_executor: Callable[..., DistributedExecutor]) -> None:
    executor = make_executor()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "procpool", "top", executor.metrics_block, "--interval", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        assert "WORKER" in "".join(watcher.stdout.readline() for _ in range(6))
        executor.shutdown()
        tail = watcher.communicate(timeout=20)[0]
    finally:
        watcher.kill()
        watcher.wait()
    assert watcher.returncode == 0 and "the pool has ended" in tail


def test_top_explains_a_missing_or_foreign_block() -> None:
    missing = top("procpool-1-000000", "--once")
    assert missing.returncode == 1 and "python -m procpool top" in missing.stderr
    block = MetricsBlock(slots=1)
    try:
        assert block.shm.buf is not None
        struct.pack_into("<I", block.shm.buf, 8, 1)  # an older layout version
        foreign = top(block.name, "--once")
        assert foreign.returncode == 1 and "layout version" in foreign.stderr
        with pytest.raises(ValueError, match="different release"):
            Watcher(block.name)
    finally:
        block.close()


def test_prometheus_scrape_of_a_pool(busy: DistributedExecutor) -> None:
    server, port = start_metrics_server(busy)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    pool = busy.metrics_block
    assert f'procpool_tasks_finished_total{{pool="{pool}",state="completed"}} 6.0' in body
    assert f'procpool_tasks_submitted_total{{pool="{pool}"}} 6.0' in body
    assert f'procpool_worker_up{{pool="{pool}",worker="local-worker-0"}} 1.0' in body
    assert "procpool_worker_memory_uss_bytes{" in body and "procpool_queue_depth{" in body


def test_prometheus_collector_by_name_reads_the_same_figures(busy: DistributedExecutor) -> None:
    collector = PoolCollector(busy.metrics_block)
    try:
        families = {f.name: f for f in collector.collect()}
    finally:
        collector.close()
    completed = {s.labels["worker"]: s.value for s in families["procpool_worker_tasks_completed"].samples}
    assert completed == {name: w["completed"] for name, w in busy.get_stats()["workers"].items()}
