"""Tasks and callers that misbehave the way real code does: the pool holds, and says what happened."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faults
import pytest
from conftest import end_process, pid_alive, wait_until

from procpool import DistributedExecutor, TaskCancelledError, TaskStatus, WorkerLostError
from procpool._containment import Jail, Jails

Make = Callable[..., DistributedExecutor]


@pytest.fixture
def pid_files(tmp_path: Path) -> Iterator[list[Path]]:
    """Where tasks record the pids of what they started; anything still alive is killed at the end."""
    made: list[Path] = []
    yield made
    for path in made:
        if path.exists() and pid_alive(pid := int(path.read_text())):
            os.kill(pid, signal.SIGKILL)


def test_a_task_that_forks_and_returns_twice_reports_once(make_executor: Make) -> None:
    executor = make_executor(max_local_workers=1)
    ids = [executor.submit_task(faults.fork_and_return, (i,)) for i in range(5)]
    assert executor.wait_for_tasks(ids, timeout=30) == list(range(5))
    stats = executor.get_stats()
    assert stats["completed_tasks"] == 5 and stats["workers"]["local-worker-0"]["restarts"] == 0
    assert executor.submit(faults.double, 4).result(timeout=10) == 8  # the worker itself serves on


def test_a_worker_death_is_seen_at_once_though_a_daemon_holds_its_fds(
    make_executor: Make, tmp_path: Path, pid_files: list[Path]
) -> None:
    executor = make_executor(max_local_workers=1, max_retries=0, heartbeat_timeout=30)
    pid_files.append(tmp_path / "daemon")
    start = time.monotonic()
    task_id = executor.submit_task(faults.daemon_then_exit, (str(pid_files[0]),))
    with pytest.raises(WorkerLostError, match="exited with code 5"):
        executor.get_task_result(task_id, timeout=20)
    assert time.monotonic() - start < 5  # seen by its pidfd, not after the 30 s heartbeat
    # From the daemon's pid written (just before the worker exits) to the failure reported:
    # reaped through its pidfd, not after a join that waits on the pipe the daemon holds (1 s).
    finished = executor.get_task(task_id).finished_at
    assert finished is not None and finished - pid_files[0].stat().st_mtime < 0.5
    assert executor.submit(faults.double, 1).result(timeout=10) == 2


def test_a_first_result_wins_callback_may_cancel_its_siblings(make_executor: Make, tmp_path: Path) -> None:
    executor = make_executor(max_local_workers=2)
    gate = tmp_path / "never"
    futures = [executor.submit(faults.double, 1)] + [
        executor.submit(faults.wait_for_file, str(gate)) for _ in range(3)
    ]
    seen: list[bool] = []

    def first_wins(done: object) -> None:
        for other in futures[1:]:
            seen.append(executor.cancel_task(other.task_id))  # type: ignore[attr-defined]

    futures[0].add_done_callback(first_wins)
    assert futures[0].result(timeout=10) == 2
    assert wait_until(lambda: len(seen) == 3, 10) and all(seen)
    assert all(f.cancelled() for f in futures[1:])
    assert executor.submit(faults.double, 5).result(timeout=10) == 10  # the pool goes on


def test_shutdown_from_a_callback_while_the_caller_shuts_down_too(make_executor: Make) -> None:
    executor = make_executor()
    executor.register_callback("task_complete", lambda record: executor.shutdown(wait=True))
    future = executor.submit(faults.sleep_then, 0.1, "done")
    future.add_done_callback(lambda f: executor.shutdown(wait=True))
    start = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - start < 10 and future.result(timeout=0) == "done"


def test_a_callback_that_raises_systemexit_is_logged_and_the_next_runs(
    make_executor: Make, caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_executor()
    ran: list[str] = []

    def exits(record: object) -> None:
        raise SystemExit(3)

    executor.register_callback("task_complete", exits)
    executor.register_callback("task_complete", lambda record: ran.append(record.task_id))  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="procpool"):
        ids = [executor.submit_task(faults.double, (i,)) for i in range(10)]
        executor.wait_for_tasks(ids, timeout=10)
        assert wait_until(lambda: len(ran) == 10, 10)
    assert sorted(ran) == sorted(ids)
    assert sum("SystemExit" in (r.exc_text or "") for r in caplog.records) == 10


def test_a_deadline_a_month_away_does_not_break_the_supervisor(make_executor: Make) -> None:
    executor = make_executor(heartbeat_timeout=None, memory_sample_interval=None)
    task_id = executor.submit_task(faults.sleep_then, (0.2, "late"), timeout=30 * 24 * 3600)
    assert executor.get_task_result(task_id, timeout=10) == "late"
    assert executor.get_task(task_id).status is TaskStatus.COMPLETED


@pytest.fixture(params=["cgroup", "subreaper"])
def containment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each containment test runs with a cgroup per worker (where one can be made) and without."""
    if request.param == "subreaper":
        monkeypatch.setenv("PROCPOOL_NO_CGROUP", "1")
        return "subreaper"
    probe = Jails()
    available = probe.root is not None
    probe.close()
    if not available:
        pytest.skip("no writable cgroup v2 here: only the subreaper fallback applies")
    return "cgroup"


def _gone(pid_file: Path) -> bool:
    return pid_file.exists() and not pid_alive(int(pid_file.read_text()))


@pytest.mark.parametrize("fn", [faults.daemon_then_hang, faults.spawn_escapee_and_hang])
def test_a_detached_daemon_dies_with_its_task_at_the_deadline(
    make_executor: Make, tmp_path: Path, pid_files: list[Path], containment: str, fn: Callable[..., None]
) -> None:
    executor = make_executor(max_local_workers=1, kill_grace=0.2)
    pid_files.append(tmp_path / "daemon")
    task_id = executor.submit_task(fn, (str(pid_files[0]),), timeout=1.0)
    with pytest.raises(TimeoutError):
        executor.get_task_result(task_id, timeout=20)
    assert wait_until(lambda: _gone(pid_files[0]), 5), f"the daemon outlived its task ({containment})"


def test_a_daemon_left_by_a_finished_task_dies_with_its_worker(
    make_executor: Make, tmp_path: Path, pid_files: list[Path], containment: str
) -> None:
    executor = make_executor(max_local_workers=1, max_tasks_per_worker=1)
    pid_files.append(tmp_path / "daemon")
    executor.submit(faults.daemon_then_return, str(pid_files[0])).result(timeout=20)
    assert wait_until(lambda: _gone(pid_files[0]), 5), f"the daemon outlived its worker ({containment})"
    assert executor.submit(faults.double, 3).result(timeout=20) == 6


def test_a_task_that_leaves_its_group_is_still_killed(make_executor: Make, containment: str) -> None:
    executor = make_executor(max_local_workers=1, kill_grace=0.2)
    task_id = executor.submit_task(faults.leave_group_and_hang, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        executor.get_task_result(task_id, timeout=20)
    assert time.monotonic() - start < 5
    assert executor.submit(faults.double, 3).result(timeout=20) == 6


def test_daemons_die_at_shutdown(tmp_path: Path, pid_files: list[Path], containment: str) -> None:
    pid_files.append(tmp_path / "daemon")
    with DistributedExecutor(max_local_workers=1, kill_grace=0.2) as executor:
        executor.submit(faults.daemon_then_return, str(pid_files[0])).result(timeout=20)
        assert pid_alive(int(pid_files[0].read_text()))
    assert wait_until(lambda: _gone(pid_files[0]), 5), f"the daemon outlived the pool ({containment})"


OWNER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import faults
from procpool import DistributedExecutor
if __name__ == "__main__":
    ex = DistributedExecutor(max_local_workers=1)
    ex.submit_task(faults.daemon_then_hang, ({pid_file!r},))
    while not os.path.exists({pid_file!r}):
        time.sleep(0.01)
    print("ready", ex.metrics_block, flush=True)
    time.sleep(3600)
"""


def test_a_daemon_dies_when_the_owner_is_killed(tmp_path: Path, pid_files: list[Path]) -> None:
    probe = Jails()
    available = probe.root is not None
    probe.close()
    if not available:
        pytest.skip("needs a writable cgroup v2: a subreaper's orphans go to init when the owner is killed")
    pid_files.append(tmp_path / "daemon")
    script = OWNER.format(tests=str(Path(faults.__file__).parent), pid_file=str(pid_files[0]))
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        ready, block = owner.stdout.readline().split()
        assert ready == "ready" and pid_alive(int(pid_files[0].read_text()))
        owner.kill()
        owner.wait(10)
        assert wait_until(lambda: _gone(pid_files[0]), 10), "the daemon outlived its killed owner"
        assert wait_until(lambda: not (Path("/dev/shm") / block).exists(), 10)  # the tracker unlinks it
    finally:
        end_process(owner)


def _deadline_lateness(executor: DistributedExecutor, timeout: float) -> float:
    """Seconds between a hung task's deadline and its report (its start read from its record)."""
    task_id = executor.submit_task(faults.hang, timeout=timeout)
    with pytest.raises(TimeoutError):
        executor.get_task_result(task_id, timeout=60)
    record = executor.get_task(task_id)
    assert record.started_at is not None and record.finished_at is not None
    return record.finished_at - record.started_at - timeout


def test_a_result_slow_to_unpickle_does_not_delay_another_deadline(make_executor: Make) -> None:
    executor = make_executor(max_local_workers=2, kill_grace=0.2)
    slow = executor.submit_task(faults.return_slow_to_unpickle, (4.0, "slow"))
    assert _deadline_lateness(executor, 1.0) < 0.5  # not the 4 s the unpickling takes
    assert executor.get_task_result(slow, timeout=30) == "slow"


def test_a_big_result_slow_to_unpickle_does_not_delay_its_workers_next_task(make_executor: Make) -> None:
    # One worker: the next task's "started" comes right behind the big result, on the same pipe.
    executor = make_executor(max_local_workers=1, kill_grace=0.2)
    slow = executor.submit_task(faults.return_slow_to_unpickle, (4.0, b"x" * (4 << 20)))
    assert _deadline_lateness(executor, 1.0) < 0.5  # not the 4 s its unpickling takes
    assert executor.get_task_result(slow, timeout=30) == b"x" * (4 << 20)


def test_a_worker_frozen_mid_result_does_not_delay_another_deadline(make_executor: Make) -> None:
    executor = make_executor(max_local_workers=2, kill_grace=0.2, heartbeat_timeout=3.0, max_retries=0)
    huge = executor.submit_task(faults.return_huge, (300,), timeout=60)
    assert wait_until(lambda: executor.get_task(huge).worker is not None, 10)
    sender = executor.get_stats()["workers"][executor.get_task(huge).worker]

    def sending() -> bool:  # its slot counts the task done just before the result goes out
        return executor.get_stats()["workers"][sender["name"]]["completed"] == 1

    sender["name"] = executor.get_task(huge).worker
    assert wait_until(sending, 30)
    os.kill(sender["pid"], signal.SIGSTOP)
    try:
        # Waiting on the frozen sender would be for ever (15 s and more before); what a deadline
        # costs here is a fork and an exit of a worker beside a caller holding a 300 MB frame.
        assert _deadline_lateness(executor, 1.0) < 1.0
    finally:
        os.kill(sender["pid"], signal.SIGCONT)
    executor.wait_for_tasks([huge], timeout=60)  # it completes, or is lost with its frozen worker


PRE_FORK = """
import os, sys, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the point of this test
from pathlib import Path
from procpool import DistributedExecutor, get_distributed_executor
ex = get_distributed_executor(max_workers=1)
assert ex.submit(abs, -1).result(timeout=30) == 1
pid = os.fork()
if pid == 0:  # a pre-fork server's child: it must not touch its parent's pool, and must not hang
    try:
        ex.submit_task(abs, (-2,))
    except RuntimeError as error:
        print("child:", error, flush=True)
    fresh = get_distributed_executor(max_workers=1)
    print("child own pool:", fresh is not ex, fresh.submit(abs, -3).result(timeout=30), flush=True)
    import multiprocessing.util  # a hook multiprocessing runs last, after it joins its children
    multiprocessing.util.Finalize(None, print, ("child: exit hooks ran",), {"flush": True}, exitpriority=-1)
    sys.exit(0)  # its exit hooks run: they must leave the parent's pool alone
os.waitpid(pid, 0)
alive = Path("/dev/shm", ex.metrics_block).exists()
print("parent:", alive, ex.submit(abs, -4).result(timeout=30), flush=True)
"""


def test_a_forked_caller_leaves_its_pool_intact_and_the_child_is_told() -> None:
    done = subprocess.run([sys.executable, "-c", PRE_FORK], capture_output=True, text=True, timeout=90)
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout + done.stderr
    assert lines[0].startswith("child: this DistributedExecutor belongs to process")
    assert lines[1] == "child own pool: True 3"
    assert lines[2] == "child: exit hooks ran"  # multiprocessing did not try to join the parent's workers
    assert lines[3] == "parent: True 4"
    assert "Exception ignored" not in done.stderr, done.stderr
    assert done.returncode == 0


FD_LIMIT = """
import resource, psutil
from multiprocessing import forkserver, resource_tracker
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
resource_tracker.ensure_running()
from procpool import DistributedExecutor
try:
    DistributedExecutor(max_local_workers=200)
except Exception as error:
    print(type(error).__name__, error)
helpers = {resource_tracker._resource_tracker._pid, forkserver._forkserver._forkserver_pid}
print(len([p for p in psutil.Process().children(recursive=True) if p.pid not in helpers]))
"""


def test_too_many_workers_for_the_fd_limit_fail_clearly_and_leave_no_process() -> None:
    done = subprocess.run([sys.executable, "-c", FD_LIMIT], capture_output=True, text=True, timeout=120)
    error, left = done.stdout.splitlines()
    assert error.startswith("BrokenPoolError") and "Too many open files" in error
    assert left == "0"


def test_a_frozen_manager_delays_no_deadline_and_no_kill(make_executor: Make) -> None:
    executor = make_executor(max_local_workers=2, kill_grace=0.2, heartbeat_timeout=None)
    hung = executor.submit_task(faults.hang, timeout=1.0)
    other = executor.submit_task(faults.hang, timeout=60)
    assert wait_until(lambda: executor.get_task(other).status is TaskStatus.RUNNING, 10)
    assert wait_until(lambda: executor.get_task(hung).status is TaskStatus.RUNNING, 10)
    manager = executor._supervisor.manager._process.pid  # type: ignore[union-attr]
    os.kill(manager, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert executor.cancel_task(other) is True  # a running task: killed without the manager
        assert time.monotonic() - start < 1.0
        with pytest.raises(TimeoutError):
            executor.get_task_result(hung, timeout=10)
        record = executor.get_task(hung)
        assert record.finished_at is not None and record.started_at is not None
        assert record.finished_at - record.started_at < 1.0 + 0.5  # its deadline, on time
    finally:
        os.kill(manager, signal.SIGCONT)
    assert executor.submit(faults.double, 2).result(timeout=20) == 4  # and it goes on once thawed


def test_a_queued_task_is_cancelled_at_once_under_a_frozen_manager(
    make_executor: Make, tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1, kill_grace=0.2, heartbeat_timeout=None)
    gate = tmp_path / "gate"
    busy = executor.submit_task(faults.wait_for_file, args=(str(gate),))
    assert wait_until(lambda: executor.get_task(busy).status is TaskStatus.RUNNING, 10)
    ran = tmp_path / "ran.log"
    queued = executor.submit_task(faults.record_order, args=(str(ran), "queued"))
    queue = executor._supervisor.queue
    assert queue is not None
    assert wait_until(lambda: queue.depth() == 1, 5)  # in the manager's queue now, behind the busy task
    manager = executor._supervisor.manager._process.pid  # type: ignore[union-attr]
    os.kill(manager, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert executor.cancel_task(queued) is True
        assert time.monotonic() - start < 1.0
        assert executor.get_task(queued).status is TaskStatus.CANCELLED
        with pytest.raises(TaskCancelledError):
            executor.get_task_result(queued, timeout=5)
    finally:
        os.kill(manager, signal.SIGCONT)
    reached = threading.Event()  # calls to the manager run in order: the queue's cancel is done
    executor._supervisor.events.link.send(lambda _queue: reached.set())  # type: ignore[union-attr]
    assert reached.wait(10)
    gate.write_text("go")  # only now is the worker free to take a task
    assert executor.get_task_result(busy, timeout=20) == str(gate)
    assert executor.submit(faults.double, 2).result(timeout=20) == 4
    assert not ran.exists()  # it never ran


def test_a_worker_stopped_before_it_entered_its_cgroup_is_still_killed(containment: str) -> None:
    # A worker started by a fork server is not our child: a SIGSTOP (or a slow start) can
    # catch it before it moved into its cgroup and its own process group.
    jails = Jails()
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        Jail(worker.pid, jails.path_for("early-worker")).kill()
        assert worker.wait(timeout=10) == -signal.SIGKILL
    finally:
        worker.kill()
        worker.wait()
        jails.close()
