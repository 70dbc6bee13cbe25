"""Stats from shared memory, a dying manager, and a caller killed with SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from multiprocessing.managers import BaseProxy
from pathlib import Path

import faults
import psutil
import pytest
from conftest import end_process, pid_alive, wait_until

from procpool import BrokenPoolError, DistributedExecutor, TaskStatus

TESTS = os.path.dirname(os.path.dirname(__file__))


def test_stats_have_the_seed_shape_and_add_up(executor: DistributedExecutor) -> None:
    ids = [executor.submit_task(faults.double, (i,)) for i in range(6)]
    ids.append(executor.submit_task(faults.raise_value_error))
    executor.wait_for_tasks(ids, timeout=20)
    stats = executor.get_stats()
    for key in ("total_tasks", "completed_tasks", "failed_tasks", "pending_tasks", "active_workers",
                "total_workers", "avg_execution_time", "workers", "running_tasks", "cancelled_tasks",
                "retried_tasks"):  # fmt: skip
        assert key in stats
    assert (stats["total_tasks"], stats["completed_tasks"], stats["failed_tasks"]) == (7, 6, 1)
    parts = ("pending_tasks", "running_tasks", "completed_tasks", "failed_tasks", "cancelled_tasks")
    assert stats["total_tasks"] == sum(stats[k] for k in parts)
    worker = stats["workers"]["local-worker-0"]
    assert worker["type"] == "local" and worker["active"] is True and 0.0 <= worker["load"] <= 1.0
    assert {"current_task", "completed", "failed"} <= set(worker)
    assert sum(w["completed"] for w in stats["workers"].values()) == 6
    assert sum(w["failed"] for w in stats["workers"].values()) == 2  # the raise, and its retry


def test_get_stats_makes_no_ipc_call(executor: DistributedExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("get_stats made an IPC call")

    monkeypatch.setattr(BaseProxy, "_callmethod", refuse)
    assert executor.get_stats()["total_workers"] == 2


def test_the_block_is_private_and_gone_after_shutdown(executor: DistributedExecutor) -> None:
    path = Path("/dev/shm") / executor.metrics_block
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    executor.shutdown()
    assert not path.exists()
    assert executor.get_stats()["active_workers"] == 0  # the last figures stay readable


def test_a_dead_manager_fails_waiting_calls_promptly(executor: DistributedExecutor, tmp_path: Path) -> None:
    task_id = executor.submit_task(faults.wait_for_file, (str(tmp_path / "never"),))
    assert wait_until(lambda: executor.get_task(task_id).status is TaskStatus.RUNNING, 10)
    manager = executor._supervisor.manager._process  # type: ignore[union-attr]
    supervisor = executor._supervisor
    sockets = [Path(supervisor.dispatch_address), Path(supervisor.manager.address)]  # type: ignore[union-attr]
    os.kill(manager.pid, signal.SIGKILL)
    with pytest.raises(BrokenPoolError, match="manager process"):
        executor.get_task_result(task_id, timeout=10)
    with pytest.raises(BrokenPoolError):
        executor.submit_task(faults.double, (1,))
    assert executor.get_task(task_id).status is TaskStatus.FAILED
    assert not any(path.exists() for path in sockets), "a killed manager's sockets stayed behind"
    # Their folder too, unless it is this process's, which a forked manager shares.
    folder = sockets[0].parent
    assert not folder.exists() or str(folder) == multiprocessing.current_process()._config.get("tempdir")


CALLER = """
import json, multiprocessing, os, sys, time
sys.path.insert(0, {tests!r})
import faults
from procpool import DistributedExecutor, TaskStatus
if __name__ == "__main__":
  ex = DistributedExecutor(max_local_workers=2, start_method={method!r})
  ids = [ex.submit_task(faults.spawn_grandchild_and_hang, ({pid_file!r},)), ex.submit_task(faults.hang)]
  while any(ex.get_task(i).status is not TaskStatus.RUNNING for i in ids) or not os.path.exists({pid_file!r}):
      time.sleep(0.01)
  stats = ex.get_stats()
  pids = [w["pid"] for w in stats["workers"].values()] + [ex._supervisor.manager._process.pid]
  address = ex._supervisor.dispatch_address  # a socket in the manager's own folder
  own = multiprocessing.current_process()._config.get("tempdir")  # the fork server's socket is there
  print(json.dumps({{"pids": pids, "block": ex.metrics_block, "socket": address, "own": own}}), flush=True)
  time.sleep(3600)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_nothing_outlives_a_caller_killed_with_sigkill(tmp_path: Path, method: str) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(CALLER.format(tests=TESTS, pid_file=str(pid_file), method=method))
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None
        info = json.loads(caller.stdout.readline())
        pids = [*info["pids"], int(pid_file.read_text())]
        assert all(pid_alive(p) for p in pids)
        caller.kill()
        caller.wait(10)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10), [
            psutil.Process(p).cmdline() for p in pids if pid_alive(p)
        ]
        block = Path("/dev/shm") / info["block"]
        assert wait_until(lambda: not block.exists(), 10), "the metrics block outlived its owner"
        sockets = Path(info["socket"]).parent
        assert wait_until(lambda: not sockets.exists(), 10), "the manager's sockets outlived it"
        if method == "forkserver":  # the caller's own folder, where the fork server's socket was
            assert info["own"] and wait_until(lambda: not Path(info["own"]).exists(), 10)
    finally:
        end_process(caller)


def test_interpreter_exit_without_shutdown_ends_everything(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        import faults
        from procpool import DistributedExecutor
        ex = DistributedExecutor(max_local_workers=2)
        ex.submit_task(faults.sleep_then, (0.2, 1))
        print(ex.metrics_block)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == ""
    assert not (Path("/dev/shm") / out.stdout.strip()).exists()


def test_ctrl_c_in_a_with_block_cancels_what_is_queued() -> None:
    start = time.monotonic()
    with (
        pytest.raises(KeyboardInterrupt),
        DistributedExecutor(max_local_workers=1, kill_grace=0.2) as executor,
    ):
        running = executor.submit_task(faults.hang, timeout=1.0)
        queued = [executor.submit_task(faults.sleep_then, args=(5,)) for _ in range(5)]
        assert wait_until(lambda: executor.get_task(running).status is TaskStatus.RUNNING, 10)
        raise KeyboardInterrupt
    assert time.monotonic() - start < 10  # not the 25 s the queued tasks would take
    assert all(executor.get_task(t).status is TaskStatus.CANCELLED for t in [running, *queued])
