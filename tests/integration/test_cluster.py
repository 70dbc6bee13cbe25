"""Cluster mode end to end: real PostgreSQL, real ``procpool host`` processes, hostile events.

A host SIGKILLed or SIGSTOPped mid-task, the database restarted mid-run and
a submitter killed: every task still ends exactly once, and a stale attempt
is killed and its result refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import faults
import psutil
import pytest
from conftest import pid_alive, wait_until
from faults import (
    companion_pid,
    double,
    mark_then_wait,
    raise_value_error,
    record_run,
    second_attempt_wins,
    sleep_then,
)

from procpool import (
    DistributedExecutor,
    RemoteVersionError,
    TaskCancelledError,
    TaskPriority,
    TaskStatus,
    TaskTimeoutError,
)
from procpool._cluster.store import Store
from stress import pg, sshd

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

pytestmark = pytest.mark.timeout(120)


def hosts_seen(dsn: str) -> set[str]:
    store = Store(dsn)
    try:
        store.create_schema()
        return {h[0] for h in store.counts()["hosts"]}
    finally:
        store.close()


@pytest.fixture
def start_host(queue_dsn: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``python -m procpool host`` processes; each is ended (with its tree) after the test."""
    started: list[tuple[subprocess.Popen[str], list[psutil.Process]]] = []

    def start(name: str, slots: int = 1, lease: float = 1.0) -> subprocess.Popen[str]:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "procpool", "host", "--queue", queue_dsn, "--slots", str(slots),
             "--lease", str(lease), "--name", name],
            env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        log.close()
        started.append((process, []))
        assert wait_until(lambda: name in hosts_seen(queue_dsn), 30), (tmp_path / f"{name}.log").read_text()
        started[-1][1].extend(psutil.Process(process.pid).children(recursive=True))
        return process

    yield start
    for process, tree in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        assert wait_until(lambda t=tree: not any(pid_alive(p.pid) for p in t), 10), "a host left processes"


def test_seed_calls_work_in_cluster_mode(queue_dsn: str) -> None:
    dsn = queue_dsn.replace("postgres@", "postgres:n0t-a-real-pw@")  # trust auth: accepted, never shown
    completed: list[str] = []
    failed: list[str] = []
    with DistributedExecutor(max_local_workers=2, task_timeout=30, max_retries=1, queue=dsn, lease=2) as ex:
        assert isinstance(ex, DistributedExecutor) and "n0t-a-real-pw" not in repr(ex)
        ex.register_callback("task_complete", lambda rec: completed.append(rec.task_id))
        ex.register_callback("task_failed", lambda rec: failed.append(rec.task_id))
        ids = [ex.submit_task(function=double, args=(x,), priority=TaskPriority.HIGH) for x in range(10)]
        bad = ex.submit_task(raise_value_error, ("cluster",))
        assert ex.wait_for_tasks(ids, timeout=30) == [x * 2 for x in range(10)]
        with pytest.raises(ValueError, match="cluster") as raised:
            ex.get_task_result(bad, timeout=30)
        assert "raise_value_error" in str(raised.value.__cause__)  # the worker's traceback
        record = ex.get_task(bad)
        assert (record.status, record.attempts) == (TaskStatus.FAILED, 2)  # max_retries=1
        late = ex.submit_task(sleep_then, (30,), timeout=1)
        with pytest.raises(TaskTimeoutError):
            ex.get_task_result(late, timeout=30)
        running = ex.submit_task(sleep_then, (30,))
        assert wait_until(lambda: ex.get_task(running).status is TaskStatus.RUNNING, 30)
        assert ex.cancel_task(running) is True
        assert isinstance(ex.wait_for_tasks([running], timeout=30)[0], BaseException)
        assert ex.get_task(running).status is TaskStatus.CANCELLED
        assert ex.submit(double, 21).result(30) == 42
        assert list(ex.map(double, range(7), chunksize=3)) == [x * 2 for x in range(7)]
        with pytest.raises(KeyError):
            ex.get_task("task-999999")
        assert wait_until(lambda: ex.get_stats()["completed_tasks"] >= 12, 10)
        stats = ex.get_stats()
        parts = ("pending_tasks", "running_tasks", "completed_tasks", "failed_tasks", "cancelled_tasks")
        assert stats["total_tasks"] == sum(stats[k] for k in parts)
        assert stats["total_workers"] == 2 and "n0t-a-real-pw" not in repr(stats)
    assert set(ids) <= set(completed)  # and submit's and map's tasks, each reported once:
    assert len(completed) == len(set(completed)) == 10 + 1 + 3
    assert failed == [bad]  # each reported once


def test_a_host_killed_mid_task_loses_it_to_another_host(
    queue_dsn: str, start_host: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    hosts = {name: start_host(name) for name in ("h0", "h1")}
    with DistributedExecutor(max_local_workers=0, queue=queue_dsn, max_retries=2) as ex:
        task = ex.submit_task(second_attempt_wins, (str(tmp_path / "marker"), 60))
        assert wait_until((tmp_path / "marker").exists, 30)  # attempt 1 runs (RUNNING: claimed)
        victim = ex.get_task(task).worker
        assert victim in hosts
        tree = psutil.Process(hosts[victim].pid).children(recursive=True)
        hosts[victim].kill()
        assert ex.get_task_result(task, timeout=30) == "second"
        record = ex.get_task(task)
        assert record.attempts == 2 and record.worker != victim
        first_pid = int((tmp_path / "marker").read_text())
    assert wait_until(lambda: not pid_alive(first_pid), 10), "the killed host's task ran on"
    assert wait_until(lambda: not any(pid_alive(p.pid) for p in tree), 10)


def test_a_frozen_host_has_its_stale_attempt_killed_and_its_result_refused(
    queue_dsn: str, start_host: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    hosts = {name: start_host(name) for name in ("h0", "h1")}
    with DistributedExecutor(max_local_workers=0, queue=queue_dsn, max_retries=2) as ex:
        task = ex.submit_task(second_attempt_wins, (str(tmp_path / "marker"), 4))
        assert wait_until((tmp_path / "marker").exists, 30)
        frozen = ex.get_task(task).worker
        assert frozen in hosts
        os.kill(hosts[frozen].pid, signal.SIGSTOP)
        assert ex.get_task_result(task, timeout=30) == "second"  # its lease ran out: another host ran it
        first_pid = int((tmp_path / "marker").read_text())
        os.kill(hosts[frozen].pid, signal.SIGCONT)
        assert wait_until(lambda: not pid_alive(first_pid), 10), "the stale attempt ran on"
        time.sleep(4)  # past the first attempt's end, had it been left to run
        record = ex.get_task(task)
        assert (record.result, record.attempts, record.status) == ("second", 2, TaskStatus.COMPLETED)


def test_tasks_outlive_a_killed_submitter(
    queue_dsn: str, start_host: Callable[..., subprocess.Popen[str]]
) -> None:
    start_host("h0", slots=2)
    script = textwrap.dedent(f"""
        import os, sys
        from faults import sleep_then
        from procpool import DistributedExecutor
        ex = DistributedExecutor(max_local_workers=0, queue={queue_dsn!r})
        ids = [ex.submit_task(sleep_then, (0.5, i)) for i in range(4)]
        print(" ".join(ids), flush=True)
        os.kill(os.getpid(), 9)
    """)
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    ids = done.stdout.split()
    with DistributedExecutor(max_local_workers=0, queue=queue_dsn) as reader:
        assert reader.wait_for_tasks(ids, timeout=30) == [0, 1, 2, 3]
        assert [reader.get_task_result(i) for i in ids] == [0, 1, 2, 3]


def test_the_database_restarted_mid_run_loses_nothing_and_runs_nothing_twice(
    queue_dsn: str, pg_server: pg.Server, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    with DistributedExecutor(max_local_workers=2, queue=queue_dsn, lease=10) as ex:
        ids = ex.submit_batch([(record_run, (str(runs), k)) for k in range(300)])
        assert wait_until(lambda: len(list(runs.iterdir())) >= 20, 30)
        restart = threading.Thread(target=lambda: (pg_server.stop("fast"), time.sleep(1), pg_server.start()))
        restart.start()
        restart.join(60)
        assert ex.wait_for_tasks(ids, timeout=60) == list(range(300))
    ran = Counter(int(p.name.split("-")[0]) for p in runs.iterdir())
    assert set(ran) == set(range(300)) and max(ran.values()) == 1, ran.most_common(3)


def test_a_submitter_with_no_host_ends_at_once_and_its_tasks_wait_in_the_queue(queue_dsn: str) -> None:
    submitter = DistributedExecutor(max_local_workers=0, queue=queue_dsn)
    queued = submitter.submit_task(double, (4,), priority=TaskPriority.LOW)
    begin = time.monotonic()
    submitter.shutdown(wait=True)
    assert time.monotonic() - begin < 5
    assert submitter.get_stats()["pending_tasks"] == 1
    with pytest.raises(RuntimeError, match="after shutdown"):
        submitter.submit_task(double, (1,))
    with DistributedExecutor(max_local_workers=1, queue=queue_dsn) as server:
        assert server.get_task_result(queued, timeout=30) == 8
        assert server.get_task(queued).attempts == 1


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--slots", "0"], "slots must be an int >= 1"),
        (["--lease", "-1"], "lease must be at least 0.2 seconds"),
        (["--task-timeout", "0"], "task_timeout must be a finite number of seconds above zero"),
        (["--companion", "nosuchmodule:factory"], "No module named 'nosuchmodule'"),
    ],
)
def test_a_bad_host_option_is_said_in_one_line_before_any_connection(option: list[str], said: str) -> None:
    unreachable = "postgresql://nobody@127.0.0.1:1/none"  # refused if it were tried
    command = [sys.executable, "-m", "procpool", "host", "--queue", unreachable, *option]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("procpool host: error: ") and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "unreachable" not in done.stderr


def test_bad_input_in_cluster_mode_fails_at_the_call(queue_dsn: str) -> None:
    with pytest.raises(ValueError, match="DSN"):
        DistributedExecutor(queue="postgresql://u@h/db?no_such_option=1")
    with pytest.raises(TypeError, match="DSN"):
        DistributedExecutor(queue=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue is empty"):
        DistributedExecutor(queue=" ")
    with pytest.raises(ValueError, match="max_local_workers"):
        DistributedExecutor(max_local_workers=-1, queue=queue_dsn)
    with pytest.raises(TypeError, match="task_timout"):
        DistributedExecutor(max_local_workers=0, queue=queue_dsn, task_timout=5)  # a typo is not ignored
    with pytest.raises(ValueError, match="lease"):
        DistributedExecutor(max_local_workers=0, queue=queue_dsn, lease=0)
    with DistributedExecutor(max_local_workers=0, queue=queue_dsn) as ex:
        with pytest.raises(TypeError, match="pickle"):
            ex.submit_task(double, (threading.Lock(),))
        with pytest.raises(ValueError):
            ex.submit_task(double, (1,), priority="SOON")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            ex.submit_task(double, (1,), timeout=-1)
        with pytest.raises(KeyError):
            ex.get_task_result("not-a-task")
        assert ex._store.counts()["states"] == {}  # nothing was queued by the bad calls


@pytest.mark.slow
@pytest.mark.skipif(not pg.available(), reason="needs PostgreSQL")
def test_failover_to_a_synchronous_standby_loses_no_acknowledged_submit_or_result(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    with pg.Server("procpool-pg-primary-", durable=True) as primary, primary.standby() as standby:
        hosts = f"{primary.root},{standby.root}"
        dsn = f"postgresql://{primary.user}@/postgres?host={hosts}&target_session_attrs=read-write"
        with DistributedExecutor(max_local_workers=2, queue=dsn, lease=10) as ex:
            acknowledged = ex.submit_batch([(record_run, (str(runs), k)) for k in range(200)])
            assert wait_until(lambda: len(list(runs.iterdir())) >= 30, 30)
            primary.stop("immediate")  # a crash: the standby has every acknowledged commit
            with pytest.raises(ConnectionError):  # refused, not lost, while there is no primary
                ex.submit_task(record_run, (str(runs), 999))
            standby.promote()
            more: list[str] = []
            deadline = time.monotonic() + 30
            while not more and time.monotonic() < deadline:
                try:
                    more = ex.submit_batch([(record_run, (str(runs), k)) for k in range(200, 250)])
                except ConnectionError:
                    time.sleep(0.2)
            assert ex.wait_for_tasks(acknowledged + more, timeout=90) == list(range(250))
    ran = Counter(int(p.name.split("-")[0]) for p in runs.iterdir())
    assert set(ran) == set(range(250)) and max(ran.values()) == 1, ran.most_common(3)


@pytest.mark.ssh
@pytest.mark.skipif(not sshd.available(), reason="needs root and openssh-server")
def test_a_host_started_over_ssh_serves_the_queue_and_ends_with_the_executor(
    queue_dsn: str, tmp_path: Path
) -> None:
    secret_dsn = queue_dsn.replace("postgres@", "postgres:n0t-a-real-pw@")
    with (
        sshd.loopback_hosts(1) as (server,),
        DistributedExecutor(max_local_workers=0, queue=secret_dsn) as ex,
    ):
        options = {**server.options(), "python": sys.executable}  # this venv: procpool, psycopg
        with pytest.raises(ValueError, match="worker_type"):
            ex.add_remote_worker(**options, worker_type="ftp")
        (name,) = ex.add_remote_worker(**options, worker_type="host", slots=2)
        started = [p for p in psutil.process_iter(["cmdline"]) if name in " ".join(p.info["cmdline"] or ())]
        pids = {p.pid for p in started}
        started = [p for p in started if p.ppid() not in pids]  # the host, not its forked pool
        assert len(started) == 1 and "n0t-a-real-pw" not in " ".join(started[0].cmdline())
        cloudpickle.register_pickle_by_value(faults)  # the host there cannot import the tests folder
        try:
            ids = ex.submit_batch([(double, (i,)) for i in range(6)])
        finally:
            cloudpickle.unregister_pickle_by_value(faults)
        assert ex.wait_for_tasks(ids, timeout=60) == [i * 2 for i in range(6)]
        assert {ex.get_task(i).worker for i in ids} == {name}
        with pytest.raises(ValueError, match="already"):
            ex.add_remote_worker(**options, worker_type="host")
        tree = [started[0], *started[0].children(recursive=True)]
    assert wait_until(lambda: not any(pid_alive(p.pid) for p in tree), 30), "the host outlived the executor"


@pytest.mark.ssh
@pytest.mark.skipif(not sshd.available(), reason="needs root and openssh-server")
def test_ship_package_brings_procpool_and_psycopg_to_a_bare_python(queue_dsn: str) -> None:
    system = shutil.which("python3", path="/usr/bin")
    if system is None or os.path.realpath(system) == os.path.realpath(sys.executable):
        pytest.skip("needs a system python3 apart from the test interpreter")
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
    if version.stdout.decode().strip() != str(sys.version_info[:2]):
        pytest.skip(f"needs a system python3 of this version ({sys.version_info[:2]})")
    with sshd.loopback_hosts(1) as (server,), DistributedExecutor(max_local_workers=0, queue=queue_dsn) as ex:
        options = {**server.options(), "python": system}
        with pytest.raises(RemoteVersionError, match="ship_package=True"):
            ex.add_remote_worker(**options, worker_type="host")
        ex.add_remote_worker(**options, worker_type="host", ship_package=True)
        cloudpickle.register_pickle_by_value(faults)
        try:
            task = ex.submit_task(faults.interpreter)
        finally:
            cloudpickle.unregister_pickle_by_value(faults)
        shipped = ex.get_task_result(task, timeout=60)
        assert ".cache/procpool/" in shipped
    shutil.rmtree(Path(shipped).parents[2], ignore_errors=True)  # the shipped venv, in ~/.cache


def test_cancel_reaches_a_task_running_on_another_host_and_sigterm_drains_a_host(
    queue_dsn: str, start_host: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    host = start_host("h0", slots=2)
    with DistributedExecutor(max_local_workers=0, queue=queue_dsn) as ex:
        doomed = ex.submit_task(second_attempt_wins, (str(tmp_path / "doomed"), 60))
        assert wait_until((tmp_path / "doomed").exists, 30)
        assert ex.cancel_task(doomed) is True
        assert isinstance(ex.wait_for_tasks([doomed], timeout=30)[0], TaskCancelledError)
        assert wait_until(lambda: not pid_alive(int((tmp_path / "doomed").read_text())), 10)
        held = ex.submit_task(mark_then_wait, (str(tmp_path / "started"), str(tmp_path / "gate")))
        assert wait_until((tmp_path / "started").exists, 30)
        host.terminate()  # drains: claims no more, ends once its running task is written
        queued = ex.submit_task(double, (5,))
        time.sleep(1)
        assert host.poll() is None and ex.get_task(queued).status is TaskStatus.PENDING
        (tmp_path / "gate").touch()
        assert ex.get_task_result(held, timeout=30) == str(tmp_path / "gate")
        assert host.wait(30) == 0
        assert "h0" not in hosts_seen(queue_dsn)
        assert ex.get_task(queued).status is TaskStatus.PENDING  # left for the next host
        ex.cancel_task(queued)


def test_top_shows_the_cluster(queue_dsn: str, start_host: Callable[..., subprocess.Popen[str]]) -> None:
    start_host("h0", slots=2)
    with DistributedExecutor(max_local_workers=0, queue=queue_dsn) as ex:
        ex.wait_for_tasks(ex.submit_batch([(double, (i,)) for i in range(5)], priority="LOW"), timeout=30)
        ex.submit_task(sleep_then, (0,), priority=TaskPriority.URGENT)
        command = [sys.executable, "-m", "procpool", "top", "--queue", queue_dsn, "--once", "--json"]
        view = json.loads(subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=60).stdout)
        assert view["tasks"].get("completed", 0) >= 5
        assert [h["name"] for h in view["hosts"]] == ["h0"] and view["hosts"][0]["slots"] == 2
        plain = subprocess.run(command[:-1], env=ENV, capture_output=True, text=True, timeout=60).stdout
        assert "h0" in plain and "URGENT" in plain


@pytest.mark.browser
def test_a_host_with_pinned_browsers_gives_each_slot_its_browser(queue_dsn: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "procpool", "host", "--queue", queue_dsn, "--slots", "2",
               "--name", "b0", "--companion", "sessions:pinned_browsers"]  # fmt: skip
    host = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: "b0" in hosts_seen(queue_dsn), 60)
        with DistributedExecutor(max_local_workers=0, queue=queue_dsn) as ex:
            pids = ex.wait_for_tasks(ex.submit_batch([(companion_pid, ()) for _ in range(6)]), timeout=120)
        assert all(isinstance(p, int) for p in pids) and 1 <= len(set(pids)) <= 2, pids
        assert all(psutil.Process(p).name().startswith("chrom") for p in set(pids))
    finally:
        host.terminate()
        host.wait(60)
    assert wait_until(lambda: not any(pid_alive(p) for p in set(pids)), 20), "a browser outlived its host"


def test_a_host_that_cannot_renew_for_half_a_lease_kills_its_task(
    queue_dsn: str, pg_server: pg.Server, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    with DistributedExecutor(max_local_workers=1, queue=queue_dsn, lease=2) as ex:
        task = ex.submit_task(second_attempt_wins, (str(marker), 60))
        assert wait_until(marker.exists, 30)
        first = int(marker.read_text())
        pg_server.stop("fast")
        try:
            assert wait_until(lambda: not pid_alive(first), 5), "the attempt ran on past half its lease"
            assert not pg_server.running  # it was the host's own doing: the database is still down
        finally:
            pg_server.start()
        assert ex.get_task_result(task, timeout=30) == "second"
        assert ex.get_task(task).attempts == 2


def test_two_submitters_share_the_queue_and_each_hears_of_its_own_tasks(
    queue_dsn: str, start_host: Callable[..., subprocess.Popen[str]]
) -> None:
    start_host("h0", slots=2)
    heard: dict[str, list[str]] = {"a": [], "b": []}
    with (
        DistributedExecutor(max_local_workers=0, queue=queue_dsn) as a,
        DistributedExecutor(max_local_workers=0, queue=queue_dsn) as b,
    ):
        a.register_callback("task_complete", lambda rec: heard["a"].append(rec.task_id))
        b.register_callback("task_complete", lambda rec: heard["b"].append(rec.task_id))
        mine: dict[str, list[str]] = {"a": [], "b": []}
        for i in range(10):
            mine["a"].append(a.submit_task(double, (i,), priority=TaskPriority.LOW))
            mine["b"].append(b.submit_task(double, (100 + i,), priority=TaskPriority.HIGH))
        assert a.wait_for_tasks(mine["a"], timeout=60) == [i * 2 for i in range(10)]
        assert b.wait_for_tasks(mine["b"], timeout=60) == [(100 + i) * 2 for i in range(10)]
        assert a.get_task_result(mine["b"][0]) == 200  # any executor reads any task
    assert sorted(heard["a"]) == sorted(mine["a"]) and sorted(heard["b"]) == sorted(mine["b"])
