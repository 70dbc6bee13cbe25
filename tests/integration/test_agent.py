"""The remote agent driven through pipes, as a link drives it over SSH: deadlines, deaths, silence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import faults
import psutil
import pytest
from conftest import pid_alive, wait_until

from procpool import companion_info
from procpool._payload import dump_call
from procpool._remote.frames import FrameReader, encode

GRACE = 0.3


class Driver:
    """Plays the link: sends frames on the agent's stdin, reads them from its stdout, answers beats."""

    def __init__(
        self, silence: float = 10.0, initializer: bytes | None = None, max_tasks: int | None = None
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "procpool._remote.agent"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        out = self.process.stdout.fileno()
        self.reader = FrameReader(lambda n: os.read(out, n))
        self.reader.skip_to_marker()
        self.send(("hello", 0.1, silence, GRACE, 0.1, initializer, max_tasks))

    def send(self, message: tuple[Any, ...]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(encode(message))
        self.process.stdin.flush()

    def next(self, ping: bool = True) -> tuple[Any, ...]:
        """The next frame that is not a beat."""
        while True:
            message = self.reader.read()
            if message[0] != "beat":
                return message
            if ping:
                self.send(("ping",))

    def run(
        self, fn: Any, args: tuple[Any, ...] = (), timeout: float = 10.0, task: str = "t"
    ) -> tuple[Any, ...]:
        self.send(("run", task, 1, dump_call(cloudpickle.dumps(fn), args, {}), timeout))
        return self.next()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def agent() -> Iterator[Driver]:
    driver = Driver()
    assert driver.next()[0] == "ready"
    yield driver
    driver.close()


@pytest.fixture(scope="module", autouse=True)
def _faults_by_value() -> Iterator[None]:
    cloudpickle.register_pickle_by_value(faults)  # as a remote host sees them
    yield
    cloudpickle.unregister_pickle_by_value(faults)


def test_results_and_errors_come_back_as_from_a_local_worker(agent: Driver) -> None:
    done = agent.run(faults.double, (21,))
    assert done[:5] == ("done", "t", 1, True, False) and cloudpickle.loads(done[6]) == 42
    failed = agent.run(faults.raise_value_error, ("remote",))
    assert failed[3] is False and failed[7] == "ValueError" and "remote" in failed[8]


def test_a_task_past_its_deadline_is_killed_with_its_group(agent: Driver, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    end = agent.run(faults.spawn_grandchild_and_hang, (str(pid_file),), timeout=0.5)
    assert end[0] == "timedout" and end[4] is False  # SIGTERM was enough
    assert 0.5 <= time.monotonic() - started < 0.5 + GRACE + 1.0
    assert wait_until(lambda: not pid_alive(int(pid_file.read_text())), 5)
    deaf = agent.run(faults.ignore_sigterm_and_hang, timeout=0.3)
    assert deaf[0] == "timedout" and deaf[4] is True  # SIGKILL after the grace
    assert agent.run(faults.double, (1,))[3] is True  # a new child serves the next task


def test_max_tasks_gives_a_fresh_child_without_a_new_connection() -> None:
    driver = Driver(max_tasks=1)
    try:
        assert driver.next()[0] == "ready"
        pids = [cloudpickle.loads(driver.run(os.getpid, task=f"t{i}")[6]) for i in range(3)]
        assert len(set(pids)) == 3 and driver.process.poll() is None
    finally:
        driver.close()


def test_companions_are_local_only(agent: Driver) -> None:
    failed = agent.run(companion_info)
    assert failed[3] is False and "not available on a remote worker" in failed[8]


def test_a_death_mid_task_is_reported_at_once(agent: Driver) -> None:
    end = agent.run(faults.exit_abruptly, (9,))
    assert end[0] == "lost" and end[4] == "exited with code 9" and end[3] < 1.0
    assert agent.run(faults.kill_self)[4].startswith("was killed by SIGKILL")
    assert agent.run(faults.double, (2,))[3] is True


def start_hanging(driver: Driver, tmp_path: Path) -> int:
    """Send a task that starts a grandchild and hangs; returns the grandchild's pid once it runs."""
    pid_file = tmp_path / "pid"
    payload = dump_call(cloudpickle.dumps(faults.spawn_grandchild_and_hang), (str(pid_file),), {})
    driver.send(("run", "t", 1, payload, 60))
    assert wait_until(pid_file.exists, 10)
    return int(pid_file.read_text())


def test_a_silent_link_ends_the_agent_and_its_task(tmp_path: Path) -> None:
    driver = Driver(silence=1.0)
    try:
        assert driver.next(ping=False)[0] == "ready"
        grandchild = start_hanging(driver, tmp_path)
        assert driver.process.wait(10) == 0  # no pings: it gave up after 1 s of silence
        assert wait_until(lambda: not pid_alive(grandchild), 5)
    finally:
        driver.close()


def test_a_closed_channel_ends_the_agent_and_its_task(agent: Driver, tmp_path: Path) -> None:
    grandchild = start_hanging(agent, tmp_path)
    assert agent.process.stdin is not None
    agent.process.stdin.close()
    assert agent.process.wait(10) == 0
    assert wait_until(lambda: not pid_alive(grandchild), 5)


def test_sigterm_ends_the_agent_and_its_task(agent: Driver, tmp_path: Path) -> None:
    # As when sshd's session ends (the parent-death signal), repeatedly: no handler may cut the cleanup short.
    grandchild = start_hanging(agent, tmp_path)
    for _ in range(3):
        agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(10) == 0
    assert wait_until(lambda: not pid_alive(grandchild), 5)


def test_a_killed_agent_takes_its_worker_child_along(agent: Driver) -> None:
    (child,) = psutil.Process(agent.process.pid).children()
    agent.process.kill()
    agent.process.wait(10)
    assert wait_until(lambda: not pid_alive(child.pid), 5)


def test_a_failing_initializer_ends_the_agent() -> None:
    driver = Driver(initializer=dump_call(cloudpickle.dumps(faults.raise_value_error), ("no init",), {}))
    try:
        assert driver.next(ping=False)[0] == "ready"
        with pytest.raises(EOFError):
            driver.next()
        assert driver.process.wait(10) == 3
    finally:
        driver.close()
