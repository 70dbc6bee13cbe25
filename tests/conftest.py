"""Shared fixtures: executors that always end, and a leak check after every test.

Each test that starts processes must leave none behind (checked with psutil)
and no procpool shared-memory block in /dev/shm.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import forkserver, resource_tracker
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so workers can import faults

from procpool import DistributedExecutor
from stress import pg
from stress.pages import PageServer

SHUTDOWN_BUDGET = 10.0  # seconds a shutdown may take before the test fails
LEAK_WAIT = 5.0  # seconds for killed processes to be reaped before they count as leaked


def _children() -> set[int]:
    # multiprocessing's own helpers live as long as this process: not leaks.
    helpers = {
        resource_tracker._resource_tracker._pid,  # type: ignore[attr-defined]
        forkserver._forkserver._forkserver_pid,  # type: ignore[attr-defined]
    }
    return {p.pid for p in psutil.Process().children(recursive=True) if p.pid not in helpers}


def _blocks() -> set[str]:
    """procpool blocks made by this process or its descendants, or whose maker is gone.

    A block whose maker is another live process (a second test run on the machine) is not ours.
    """
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    blocks = set()
    for path in Path("/dev/shm").glob("procpool-*"):
        creator = int(path.name.split("-")[1])
        if creator in mine or not psutil.pid_exists(creator):
            blocks.add(path.name)
    return blocks


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` until true or ``timeout``; for conditions with no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.Server]:
    """One throwaway PostgreSQL server for the whole run (cluster mode's tests)."""
    if not pg.available():
        pytest.skip("PostgreSQL is not installed (./run tests installs it)")
    with pg.Server() as server:
        yield server


@pytest.fixture
def queue_dsn(pg_server: pg.Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on that server, dropped after the test."""
    name = "q_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    yield pg_server.database(name)
    pg_server.drop(name)


@pytest.fixture(scope="session", autouse=True)
def _tracker() -> None:
    # Started once, so that it is not taken for a leaked child later.
    resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a child process or a shared-memory block behind."""
    children, blocks = _children(), _blocks()
    yield
    assert wait_until(lambda: not (_children() - children), LEAK_WAIT), (
        f"leaked processes: {[psutil.Process(p).cmdline() for p in _children() - children]}"
    )
    assert not (_blocks() - blocks), f"leaked shared memory: {_blocks() - blocks}"


@pytest.fixture
def make_executor() -> Iterator[Callable[..., DistributedExecutor]]:
    """Create executors that are shut down (in bounded time) when the test ends."""
    made: list[DistributedExecutor] = []

    def make(**options: Any) -> DistributedExecutor:
        options.setdefault("max_local_workers", 2)
        options.setdefault("kill_grace", 0.3)
        executor = DistributedExecutor(**options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        start = time.monotonic()
        executor.shutdown(wait=True, cancel_futures=True)
        assert time.monotonic() - start < SHUTDOWN_BUDGET, "shutdown took too long"


@pytest.fixture
def executor(make_executor: Callable[..., DistributedExecutor]) -> DistributedExecutor:
    """Two workers, a 30 s default deadline, one retry."""
    return make_executor(task_timeout=30, max_retries=1)


def end_process(process: subprocess.Popen[str]) -> None:
    """Kill a helper process if it still runs, reap it and close its pipe."""
    if process.poll() is None:
        process.kill()
        process.wait(10)
    if process.stdout is not None:
        process.stdout.close()


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def make_pool() -> Iterator[Callable[..., Any]]:
    """Makes SessionPools (``SessionPool(**options)``), every one closed at teardown."""
    from sessions import SessionPool  # here, so tests that need no browser import no pyppeteer

    made: list[SessionPool] = []

    def make(**options: Any) -> SessionPool:
        pool = SessionPool(**options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture(scope="module")
def site() -> Iterator[PageServer]:
    """Test pages on 127.0.0.1 (see pages.py), one server per test module."""
    server = PageServer()
    yield server
    server.close()
