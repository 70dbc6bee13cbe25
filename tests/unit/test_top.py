"""The top view's pure parts: the frame and the throughput window."""

from __future__ import annotations

from typing import Any

from procpool._top import Throughput, render


def stats(done: int) -> dict[str, Any]:
    worker = {
        "type": "local", "active": True, "healthy": False, "state": "running", "current_task": "task-7",
        "completed": done, "failed": 1, "load": 0.5, "pid": 321, "restarts": 0, "heartbeat_age": 4.25,
        "memory_mb": 12.5, "pss_mb": 9.0, "processes": 2, "cpu_percent": 99.0, "memory_source": "uss",
        "browser": None,
    }  # fmt: skip
    return {
        "metrics_block": "procpool-1-ab", "creator_pid": 1, "created": 0.0, "active_workers": 1,
        "total_workers": 1, "memory_mb": 12.5, "total_tasks": done + 3, "pending_tasks": 2,
        "running_tasks": 1, "completed_tasks": done, "failed_tasks": 0, "cancelled_tasks": 0,
        "retried_tasks": 1, "queue_depth": {"URGENT": 0, "HIGH": 2, "NORMAL": 0, "LOW": 0},
        "workers": {"local-worker-0": worker},
    }  # fmt: skip


def test_a_frame_shows_totals_queue_and_each_worker() -> None:
    frame = render(stats(40), rate=12.345)
    assert "throughput 12.3/s" in frame and "HIGH 2" in frame and "memory 12.5 MB" in frame
    row = frame.splitlines()[-1].split()
    assert row == [
        "local-worker-0",
        "running",
        "321",
        "task-7",
        "40",
        "1",
        "50%",
        "12.5",
        "9.0",
        "2",
        "99",
        "4.2",
        "HUNG",
    ]


def test_throughput_over_a_sliding_window() -> None:
    rates = Throughput(window=5.0)
    assert rates.add(0.0, stats(0)) is None
    assert rates.add(1.0, stats(10)) == 10.0
    assert rates.add(2.0, stats(30)) == 15.0
    assert rates.add(10.0, stats(30)) == 0.0  # the busy seconds left the window
