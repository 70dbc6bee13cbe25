"""Remote workers against real OpenSSH servers on 127.0.0.1 (two servers act as two hosts)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import faults
import psutil
import pytest
from conftest import end_process, pid_alive, wait_until

from procpool import (
    DistributedExecutor,
    RemoteAuthError,
    RemoteHostKeyError,
    RemoteVersionError,
    TaskStatus,
    TaskTimeoutError,
    WorkerLostError,
)
from procpool._config import default_start_method
from stress import sshd

pytestmark = [
    pytest.mark.ssh,
    pytest.mark.skipif(not sshd.available(), reason="needs root and openssh-server (apt-get install it)"),
]

Make = Callable[..., DistributedExecutor]
Hosts = tuple[sshd.SSHServer, sshd.SSHServer]


@pytest.fixture(scope="module", autouse=True)
def _faults_by_value() -> Iterator[None]:
    # The remote interpreter cannot import the tests folder: send the fault catalogue by value.
    cloudpickle.register_pickle_by_value(faults)
    yield
    cloudpickle.unregister_pickle_by_value(faults)


def _agents() -> set[psutil.Process]:
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if "procpool._remote.agent" in " ".join(proc.info["cmdline"] or ()):
            found.add(proc)
    return found


@pytest.fixture(autouse=True)
def no_stray_agents() -> Iterator[None]:
    """No agent or its worker outlives its connection (orphans escape the children check)."""
    before = _agents()
    yield
    assert wait_until(lambda: not (_agents() - before), 10), f"agents left: {_agents() - before}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ssh")
    sshd.keygen(root / "user_key")
    sshd.keygen(root / "other_key")  # a key no server accepts
    return root


@pytest.fixture(scope="module")
def hosts(keys: Path) -> Iterator[tuple[sshd.SSHServer, sshd.SSHServer]]:
    a, b = sshd.SSHServer(keys / "a", keys / "user_key"), sshd.SSHServer(keys / "b", keys / "user_key")
    yield a, b
    a.kill()
    b.kill()


def add(executor: DistributedExecutor, server: sshd.SSHServer, **options: object) -> list[str]:
    return executor.add_remote_worker(**{**server.options(), **options})


@pytest.fixture
def gate(make_executor: Make, tmp_path: Path) -> Iterator[Path]:
    """A file whose creation lets a held local task end; made at teardown, before executors shut down."""
    path = tmp_path / "gate"
    yield path
    path.touch()


def hold_local(executor: DistributedExecutor, gate: Path) -> str:
    """Keep the one local worker busy until ``gate`` exists, so the next tasks go to remote slots.

    Call it before adding hosts: a remote slot would take the holding task as readily.
    """
    task_id = executor.submit_task(faults.wait_for_file, (str(gate), 60))
    assert wait_until(lambda: executor.get_task(task_id).status is TaskStatus.RUNNING, 30)
    return task_id


def remote_ready(executor: DistributedExecutor, names: list[str]) -> bool:
    workers = executor.get_stats()["workers"]
    return all(workers[n]["active"] and workers[n]["state"] == "idle" for n in names)


def test_tasks_spread_over_local_and_two_hosts(make_executor: Make, hosts: Hosts) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True, task_timeout=30)
    a_names = add(executor, hosts[0], slots=2)
    b_names = add(executor, hosts[1], slots=2)
    assert wait_until(lambda: remote_ready(executor, a_names + b_names), 30)
    ids = [executor.submit_task(faults.sleep_then, (0.3, i)) for i in range(20)]
    assert executor.wait_for_tasks(ids, timeout=60) == list(range(20))
    ran_on = Counter(executor.get_task(i).worker for i in ids)
    assert set(ran_on) == {"local-worker-0", *a_names, *b_names}, ran_on
    stats = executor.get_stats()
    for name in a_names + b_names:
        view = stats["workers"][name]
        assert view["type"] == "remote_ssh"
        assert view["host"] == f"127.0.0.1:{hosts[0 if name in a_names else 1].port}"
        assert view["completed"] == ran_on[name]
        assert view["heartbeat_age"] is not None and view["heartbeat_age"] < 5
    assert stats["completed_tasks"] == 20 and stats["active_workers"] == 5


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_remote_results_and_errors_come_back_as_locally(
    make_executor: Make, hosts: Hosts, gate: Path, method: str
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True, max_retries=1, start_method=method)
    hold_local(executor, gate)
    names = add(executor, hosts[0])
    raised = executor.submit_task(faults.raise_value_error, ("remote boom",))
    with pytest.raises(ValueError, match="remote boom") as info:
        executor.get_task_result(raised, timeout=30)
    assert "raise_value_error" in str(info.value.__cause__)
    died = executor.submit_task(faults.exit_abruptly, (7,))
    with pytest.raises(WorkerLostError, match="exited with code 7"):
        executor.get_task_result(died, timeout=30)
    record = executor.get_task(died)
    assert record.attempts == 2 and record.worker == names[0]  # retried once, seen at once each time


def test_hung_remote_task_is_killed_at_its_deadline_on_the_host(
    make_executor: Make, hosts: Hosts, tmp_path: Path, gate: Path
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True, kill_grace=0.3)
    hold_local(executor, gate)
    names = add(executor, hosts[0])
    assert wait_until(lambda: remote_ready(executor, names), 30)
    pid_file = tmp_path / "grandchild"
    started = time.monotonic()
    hung = executor.submit_task(faults.spawn_grandchild_and_hang, (str(pid_file),), timeout=1.5)
    with pytest.raises(TaskTimeoutError, match=f"on {names[0]} on 127.0.0.1:{hosts[0].port} was killed"):
        executor.get_task_result(hung, timeout=30)
    assert time.monotonic() - started < 1.5 + 0.3 + 2.0
    assert not pid_alive(int(pid_file.read_text()))  # the task's whole group died on the host
    deaf = executor.submit_task(faults.ignore_sigterm_and_hang, timeout=0.5)
    with pytest.raises(TaskTimeoutError, match="SIGKILL after SIGTERM"):
        executor.get_task_result(deaf, timeout=30)
    assert executor.get_task_result(executor.submit_task(faults.double, (21,)), timeout=30) == 42


def test_a_host_that_dies_mid_run_fails_over_and_comes_back(
    make_executor: Make, keys: Path, tmp_path: Path
) -> None:
    server = sshd.SSHServer(tmp_path / "c", keys / "user_key")
    try:
        executor = make_executor(max_local_workers=1, enable_remote=True, max_retries=2)
        ends: Counter[str] = Counter()
        executor.register_callback("task_complete", lambda task: ends.update([task.task_id]))
        executor.register_callback("task_failed", lambda task: ends.update([task.task_id]))
        names = add(executor, server, slots=2, heartbeat_timeout=2, reconnect_max=0.5)
        assert wait_until(lambda: remote_ready(executor, names), 30)
        ids = [executor.submit_task(faults.sleep_then, (1.0, i)) for i in range(8)]

        def running() -> set[str | None]:
            records = [executor.get_task(i) for i in ids]
            return {r.worker for r in records if r.status is TaskStatus.RUNNING}

        assert wait_until(lambda: set(names) <= running(), 30)
        server.kill()
        assert executor.wait_for_tasks(ids, timeout=60) == list(range(8))
        assert wait_until(lambda: sum(ends.values()) == 8, 10)
        assert set(ends) == set(ids) and set(ends.values()) == {1}  # none lost, none twice
        assert any(executor.get_task(i).attempts > 1 for i in ids)  # the in-flight ones failed over
        workers = executor.get_stats()["workers"]
        assert all(workers[n]["state"] != "running" for n in names)
        server.start()
        assert wait_until(lambda: remote_ready(executor, names), 30)
        after = [executor.submit_task(faults.sleep_then, (0.3, i)) for i in range(6)]
        assert executor.wait_for_tasks(after, timeout=30) == list(range(6))
        assert {executor.get_task(i).worker for i in after} >= set(names)  # each idle slot took one
    finally:
        server.kill()


def test_remove_remote_worker_drains_the_host(make_executor: Make, hosts: Hosts, gate: Path) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True)
    hold_local(executor, gate)
    names = add(executor, hosts[1])
    on_remote = executor.submit_task(faults.sleep_then, (1.0, "drained"))
    assert wait_until(lambda: executor.get_task(on_remote).status is TaskStatus.RUNNING, 30)
    executor.remove_remote_worker("127.0.0.1", hosts[1].port, timeout=30)
    assert executor.get_task_result(on_remote, timeout=0) == "drained"
    assert not executor.get_stats()["workers"][names[0]]["active"]
    assert wait_until(lambda: not hosts[1].sessions(), 10)  # its connection is closed
    with pytest.raises(ValueError, match="no remote host"):
        executor.remove_remote_worker("127.0.0.1", hosts[1].port)
    assert add(executor, hosts[1]) == names  # its slot is reused


def test_unknown_host_key_is_refused_unless_accepted(
    make_executor: Make, hosts: Hosts, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True)
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(RemoteHostKeyError, match=r"is not in .*known_hosts.*ssh-keyscan -p \d+ 127.0.0.1"):
        add(executor, hosts[0], known_hosts=str(empty))
    assert not any(v["type"] == "remote_ssh" for v in executor.get_stats()["workers"].values())
    with caplog.at_level(logging.WARNING):
        names = add(executor, hosts[0], known_hosts=str(empty), accept_unknown_host=True)
    assert "accepting the unknown host key" in caplog.text
    assert executor.get_stats()["workers"][names[0]]["type"] == "remote_ssh"


def test_changed_host_key_is_refused_even_when_unknown_ones_are_accepted(
    make_executor: Make, hosts: Hosts, tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True)
    other = Path(f"{hosts[1].host_key}.pub").read_text().split()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{hosts[0].port} {other[0]} {other[1]}\n")
    with pytest.raises(RemoteHostKeyError, match="CHANGED"):
        add(executor, hosts[0], known_hosts=str(wrong), accept_unknown_host=True)


def test_wrong_key_fails_fast_and_no_credential_is_shown(
    make_executor: Make, hosts: Hosts, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True)
    secret_path = str(keys / "other_key")
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(RemoteAuthError, match=r"root@127\.0\.0\.1") as info:
        add(executor, hosts[0], credentials={"username": "root", "key": secret_path})
    assert time.monotonic() - started < 5
    assert secret_path not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # paramiko's error is not shown
    names = add(executor, hosts[0], credentials={**hosts[0].credentials, "passphrase": "hunter2"})
    shown = f"{caplog.text} {executor!r} {executor.get_stats()} {executor._supervisor.remote.hosts!r}"
    assert names[0] in shown and "root" in shown
    for secret in (secret_path, hosts[0].credentials["key"], "hunter2"):
        assert secret not in shown


def test_version_mismatch_is_explained_and_shipping_fixes_it(
    make_executor: Make, hosts: Hosts, gate: Path
) -> None:
    system = shutil.which("python3", path="/usr/bin")
    if system is None or os.path.realpath(system) == os.path.realpath(sys.executable):
        pytest.skip("needs a system python3 apart from the test interpreter")
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
    if version.stdout.decode().strip() != str(sys.version_info[:2]):
        pytest.skip(
            f"needs a system python3 of this version ({sys.version_info[:2]}); it has {version.stdout}"
        )
    executor = make_executor(max_local_workers=1, enable_remote=True)
    with pytest.raises(RemoteVersionError, match=r"cannot import .*ship_package=True"):
        add(executor, hosts[0], python=system)
    hold_local(executor, gate)
    names = add(executor, hosts[0], python=system, ship_package=True)
    remote_python = executor.get_task_result(executor.submit_task(faults.interpreter), timeout=60)
    assert ".cache/procpool/" in remote_python
    assert executor.get_stats()["workers"][names[0]]["type"] == "remote_ssh"
    shutil.rmtree(Path(remote_python).parents[2], ignore_errors=True)  # the shipped venv, in ~/.cache


def test_remote_workers_need_enable_remote(make_executor: Make, hosts: Hosts) -> None:
    executor = make_executor(max_local_workers=1)
    with pytest.raises(RuntimeError, match="enable_remote=True"):
        add(executor, hosts[0])
    remote = make_executor(max_local_workers=1, enable_remote=True, max_remote_workers=1)
    with pytest.raises(ValueError, match="worker_type"):
        add(remote, hosts[0], worker_type="kubernetes")
    with pytest.raises(ValueError, match="max_remote_workers=1"):
        add(remote, hosts[0], slots=2)
    add(remote, hosts[0])
    with pytest.raises(ValueError, match="already added"):
        add(remote, hosts[0])


def test_remote_memory_is_sampled_on_the_host(make_executor: Make, hosts: Hosts) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True, memory_sample_interval=0.1)
    (name,) = add(executor, hosts[0])

    def sampled() -> bool:
        view = executor.get_stats()["workers"][name]
        return view["memory_mb"] is not None and view["processes"] == 2  # the agent and its worker child

    assert wait_until(sampled, 30)
    agent = next(p for p in hosts[0].sessions() if "procpool._remote.agent" in " ".join(p.cmdline()))
    kernel = sum(p.memory_full_info().uss for p in [agent, *agent.children(recursive=True)]) / 2**20
    assert executor.get_stats()["workers"][name]["memory_mb"] == pytest.approx(kernel, rel=0.3)
    assert psutil.pid_exists(agent.pid)


CALLER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import cloudpickle, faults
from procpool import DistributedExecutor, TaskStatus
cloudpickle.register_pickle_by_value(faults)
ex = DistributedExecutor(max_local_workers=1, enable_remote=True)
held = ex.submit_task(faults.hang)
while ex.get_task(held).status is not TaskStatus.RUNNING:
    time.sleep(0.01)
ex.add_remote_worker("127.0.0.1", {port}, credentials={credentials!r}, python=sys.executable,
                     known_hosts={known_hosts!r})
on_host = ex.submit_task(faults.spawn_grandchild_and_hang, ({pid_file!r},))
while ex.get_task(on_host).status is not TaskStatus.RUNNING or not os.path.exists({pid_file!r}):
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(3600)
"""


def test_nothing_outlives_a_caller_killed_with_sigkill_on_the_host(hosts: Hosts, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    tests = os.path.dirname(os.path.dirname(__file__))
    script = CALLER.format(
        tests=tests, port=hosts[0].port, credentials=hosts[0].credentials,
        known_hosts=str(hosts[0].known_hosts), pid_file=str(pid_file),
    )  # fmt: skip
    before = _agents()
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert caller.stdout is not None
        assert caller.stdout.readline() == "ready\n"
        on_host = [*(_agents() - before), psutil.Process(int(pid_file.read_text()))]
        assert len(on_host) == 3  # the agent, its worker child and the task's grandchild
        caller.kill()
        caller.wait(10)
        assert wait_until(lambda: not any(pid_alive(p.pid) for p in on_host), 15), on_host
    finally:
        end_process(caller)


def test_output_before_the_agent_starts_is_skipped(make_executor: Make, hosts: Hosts, tmp_path: Path) -> None:
    noisy = tmp_path / "noisy-python"
    noisy.write_text(f'#!/bin/sh\necho "Welcome! (a login script printing)"\nexec {sys.executable} "$@"\n')
    noisy.chmod(0o755)
    executor = make_executor(max_local_workers=1, enable_remote=True)
    names = add(executor, hosts[0], python=str(noisy), slots=2)
    assert wait_until(lambda: remote_ready(executor, names), 30)
    ids = [executor.submit_task(faults.sleep_then, (0.2, i)) for i in range(6)]
    assert executor.wait_for_tasks(ids, timeout=30) == list(range(6))


def test_a_frozen_host_is_given_up_after_its_heartbeat_timeout(make_executor: Make, hosts: Hosts) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True)
    names = add(executor, hosts[1], heartbeat_timeout=1.5, reconnect_max=0.5)
    assert wait_until(lambda: remote_ready(executor, names), 30)
    (agent,) = hosts[1].agents()
    agent.send_signal(signal.SIGSTOP)  # as a cut network looks: nothing closes, nothing arrives
    try:
        stopped = time.monotonic()
        assert wait_until(lambda: executor.get_stats()["workers"][names[0]]["restarts"] >= 1, 10)
        assert 1.5 <= time.monotonic() - stopped < 1.5 + 2.0
        assert wait_until(lambda: remote_ready(executor, names), 30)  # reconnected, to a new agent
        ids = [executor.submit_task(faults.sleep_then, (0.3, i)) for i in range(4)]
        assert executor.wait_for_tasks(ids, timeout=30) == list(range(4))
    finally:
        agent.send_signal(signal.SIGCONT)  # it then finds its connection gone and ends
    assert wait_until(lambda: not pid_alive(agent.pid), 10)


def test_a_refused_password_fails_fast_and_is_never_shown(
    make_executor: Make, hosts: Hosts, caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True)
    started = time.monotonic()
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(RemoteAuthError, match="refused the credentials") as info,
    ):
        add(executor, hosts[0], credentials={"username": "root", "password": "s3cret-pw"})
    assert time.monotonic() - started < 5
    assert "s3cret-pw" not in f"{info.value!r} {caplog.text}"


def test_max_tasks_per_worker_gives_fresh_processes_on_one_connection(
    make_executor: Make, hosts: Hosts, gate: Path
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True, max_tasks_per_worker=1)
    hold_local(executor, gate)
    (name,) = add(executor, hosts[0])
    pids = [
        executor.get_task_result(executor.submit_task(faults.pid_after, (0,)), timeout=30) for _ in range(4)
    ]
    assert len(set(pids)) == 4  # a fresh process for each task ...
    assert executor.get_stats()["workers"][name]["restarts"] == 0  # ... with no new connection


def test_the_initializer_runs_on_the_host_and_one_that_cannot_travel_is_refused(
    make_executor: Make, hosts: Hosts, gate: Path
) -> None:
    executor = make_executor(
        max_local_workers=1, enable_remote=True, initializer=faults.remember, initargs=("set up",)
    )
    hold_local(executor, gate)
    add(executor, hosts[0])
    assert executor.get_task_result(executor.submit_task(faults.initialized), timeout=30) == "set up"
    channel = multiprocessing.get_context(default_start_method()).Queue()
    bound = make_executor(enable_remote=True, initializer=faults.remember, initargs=(channel,))
    with pytest.raises(TypeError, match="initializer for remote workers"):
        add(bound, hosts[1])
    assert bound.submit(faults.double, 2).result(timeout=30) == 4  # the local workers got it
    channel.close()
    channel.join_thread()


def test_a_remote_worker_death_is_seen_at_once_though_a_daemon_holds_its_fds(
    make_executor: Make, hosts: Hosts, gate: Path, tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1, enable_remote=True, max_retries=0)
    hold_local(executor, gate)
    add(executor, hosts[0])
    pid_file = tmp_path / "daemon"
    start = time.monotonic()
    task_id = executor.submit_task(faults.daemon_then_exit, (str(pid_file),))
    with pytest.raises(WorkerLostError, match="exited with code 5"):
        executor.get_task_result(task_id, timeout=30)
    assert time.monotonic() - start < 5  # the agent watches its child's pidfd, not a pipe the daemon holds
    assert wait_until(lambda: not pid_alive(int(pid_file.read_text())), 5)  # and the daemon went too
