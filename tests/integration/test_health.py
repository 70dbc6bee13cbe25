"""Real memory figures, recycling at a memory limit, and hung workers replaced."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import faults
import pytest
from conftest import wait_until

from procpool import DistributedExecutor, TaskStatus, WorkerMemoryError

MB = 1024 * 1024
SAMPLE = 0.05  # seconds between memory samples in these tests


def kernel_memory(pid: int) -> tuple[int, int]:
    """USS and PSS of one process, from the kernel's own summary."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def only_worker(executor: DistributedExecutor) -> dict[str, object]:
    (view,) = executor.get_stats()["workers"].values()
    return view  # type: ignore[no-any-return]


def test_memory_figures_match_the_kernel(make_executor: Callable[..., DistributedExecutor]) -> None:
    executor = make_executor(max_local_workers=1, memory_sample_interval=SAMPLE)
    pid = executor.get_task_result(executor.submit_task(faults.hold_memory, args=(200,)), timeout=30)

    def sampled_after_allocating() -> bool:
        view = only_worker(executor)
        return view["pid"] == pid and (view["memory_mb"] or 0) > 200  # type: ignore[operator]

    assert wait_until(sampled_after_allocating, 10)
    uss, pss = kernel_memory(pid)
    view = only_worker(executor)
    assert view["memory_mb"] == pytest.approx(uss / MB, rel=0.1)
    assert view["pss_mb"] == pytest.approx(pss / MB, rel=0.1)
    assert view["processes"] == 1 and view["memory_source"] == "uss"
    stats = executor.get_stats()
    assert stats["memory_mb"] == pytest.approx(view["memory_mb"])


def test_a_leaking_worker_is_recycled_and_no_task_is_lost(
    make_executor: Callable[..., DistributedExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_executor(
        max_local_workers=1, memory_sample_interval=SAMPLE, max_worker_memory_mb=150, memory_threshold_mb=100
    )
    with caplog.at_level(logging.INFO, logger="procpool"):
        ids = [executor.submit_task(faults.hold_memory, args=(40, 0.3)) for _ in range(8)]
        pids = executor.wait_for_tasks(ids, timeout=60)
    assert all(isinstance(pid, int) for pid in pids), pids
    assert len(set(pids)) >= 2  # a fresh process took over after the limit
    assert all(executor.get_task(i).attempts == 1 for i in ids)  # recycled between tasks, not killed
    stats = executor.get_stats()
    assert stats["completed_tasks"] == 8 and stats["failed_tasks"] == 0
    assert only_worker(executor)["restarts"] == len(set(pids)) - 1
    assert "over memory_threshold_mb=100" in caplog.text
    assert "replacing it after its current task" in caplog.text


def test_a_worker_that_starts_over_the_limit_is_not_recycled_in_a_loop(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    executor = make_executor(
        max_local_workers=1,
        memory_sample_interval=SAMPLE,
        max_worker_memory_mb=50,
        initializer=faults.hold_memory,
        initargs=(120,),  # every fresh worker is already past the limit
    )
    first = executor.get_task_result(executor.submit_task(os.getpid), timeout=30)
    assert wait_until(lambda: only_worker(executor)["memory_mb"] is not None, 10)
    ids = [executor.submit_task(faults.pid_after, args=(0.05,)) for _ in range(20)]
    assert set(executor.wait_for_tasks(ids, timeout=30)) == {first}
    assert only_worker(executor)["restarts"] == 0


def test_the_hard_limit_kills_the_task_that_passes_it(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    # Samples a second apart: the worker's first one comes while its first task already holds
    # 200 MB. Its limit still counts from its size before that task (it measures itself).
    executor = make_executor(
        max_local_workers=1, memory_sample_interval=1.0, max_worker_memory_mb=100, hard_memory_limit=True
    )
    task_id = executor.submit_task(faults.hold_memory, args=(200, 30))
    assert wait_until(lambda: executor.get_task(task_id).status is not TaskStatus.PENDING, 10)
    with pytest.raises(WorkerMemoryError, match="max_worker_memory_mb=100"):
        executor.get_task_result(task_id, timeout=20)
    record = executor.get_task(task_id)
    assert record.status is TaskStatus.FAILED and record.attempts == 1
    assert executor.get_task_result(executor.submit_task(faults.double, args=(4,)), timeout=20) == 8


def test_a_stopped_worker_is_replaced_and_its_task_retried(
    make_executor: Callable[..., DistributedExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_executor(max_local_workers=1, heartbeat_timeout=1.0, max_retries=1)
    task_id = executor.submit_task(faults.sleep_then, args=(1.0, "done"))
    assert wait_until(lambda: executor.get_task(task_id).status is TaskStatus.RUNNING, 10)
    stopped = only_worker(executor)["pid"]
    assert isinstance(stopped, int)
    os.kill(stopped, signal.SIGSTOP)
    assert wait_until(lambda: only_worker(executor)["healthy"] is False, 5)
    assert executor.get_task_result(task_id, timeout=20) == "done"
    record = executor.get_task(task_id)
    assert record.attempts == 2 and "(stopped)" in str(record.error)
    view = only_worker(executor)
    assert view["pid"] != stopped and view["restarts"] == 1 and view["healthy"] is True
    assert "sent no heartbeat" in caplog.text


def test_a_task_busy_in_c_with_the_gil_held_is_not_taken_for_hung(
    make_executor: Callable[..., DistributedExecutor],
) -> None:
    # Its heartbeat thread cannot run for 4 s, but its CPU time grows: busy, not hung.
    executor = make_executor(max_local_workers=1, heartbeat_timeout=1.0, max_retries=1)
    task_id = executor.submit_task(faults.hold_gil, args=(4.0,), timeout=60)
    assert executor.get_task_result(task_id, timeout=60) == sum(range(int(4.0 * 4e7)))
    record = executor.get_task(task_id)
    assert record.attempts == 1 and only_worker(executor)["restarts"] == 0


def test_an_idle_stopped_worker_is_replaced(make_executor: Callable[..., DistributedExecutor]) -> None:
    executor = make_executor(max_local_workers=1, heartbeat_timeout=1.0)
    assert wait_until(lambda: only_worker(executor)["heartbeat_age"] is not None, 10)
    stopped = only_worker(executor)["pid"]
    assert isinstance(stopped, int)
    os.kill(stopped, signal.SIGSTOP)
    assert wait_until(lambda: only_worker(executor)["pid"] not in (stopped, 0), 10)
    assert executor.get_task_result(executor.submit_task(faults.double, args=(2,)), timeout=20) == 4
