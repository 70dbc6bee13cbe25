"""How tasks reach workers: the manager's dispatcher, its lines, and what a worker that dies holds."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import faults
import pytest
from conftest import wait_until

from procpool import DistributedExecutor, TaskStatus
from procpool._dispatch import Dispatcher, TaskLine
from procpool._queue import TaskQueue

Make = Callable[..., DistributedExecutor]

KEY = b"k" * 32


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    d = Dispatcher(TaskQueue(), KEY)
    yield d
    d.close()


def test_a_frozen_idle_worker_holding_a_big_payload_holds_up_no_one(dispatcher: Dispatcher) -> None:
    queue = dispatcher.queue
    frozen = TaskLine(dispatcher.address, KEY, "frozen")
    frozen.ready()  # and then never reads, as a worker stopped while idle
    assert wait_until(lambda: bool(dispatcher._idle), 5)
    healthy = TaskLine(dispatcher.address, KEY, "healthy")
    big = b"x" * (32 << 20)  # far more than a socket buffer holds
    queue.put_frame(pickle.dumps([(2, 1, "big", 1, big)]))
    queue.put_frame(pickle.dumps([(2, i, f"small-{i}", 1, b"") for i in range(2, 6)]))
    got = []
    start = time.monotonic()
    for _ in range(4):
        healthy.ready()
        item = healthy.next(5)
        assert isinstance(item, tuple)
        got.append(item[0])
    assert got == ["small-2", "small-3", "small-4", "small-5"]
    assert time.monotonic() - start < 2.0
    assert frozen.next(10) == ("big", 1, big)  # the frozen one gets it whole once it reads
    frozen.close()
    healthy.close()


def test_a_client_without_the_authkey_is_refused_and_dispatch_goes_on(dispatcher: Dispatcher) -> None:
    with pytest.raises(AuthenticationError):
        Client(dispatcher.address, family="AF_UNIX", authkey=b"wrong" * 7)
    dispatcher.queue.put(1, 1, "a", 1, b"p")
    line = TaskLine(dispatcher.address, KEY, "w")
    line.ready()
    assert line.next(5) == ("a", 1, b"p")
    line.close()


def test_a_retired_idle_worker_is_told_to_stop(dispatcher: Dispatcher) -> None:
    line = TaskLine(dispatcher.address, KEY, "w")
    line.ready()
    assert line.next(0.2) is None  # nothing queued: it waits
    dispatcher.queue.retire("w")
    assert line.next(5) == "stop"
    line.close()


def test_a_task_handed_to_a_worker_that_dies_before_starting_it_runs_elsewhere(make_executor: Make) -> None:
    # A worker asks for its next task as soon as a task returns, while the result is
    # pickled. Here the pickling kills it, holding the next task it was handed.
    executor = make_executor(max_local_workers=1, max_retries=0)
    doomed = executor.submit_task(faults.return_death_on_pickling)
    innocent = executor.submit_task(faults.double, args=(21,))
    assert executor.get_task_result(innocent, timeout=30) == 42
    assert executor.get_task(innocent).attempts == 1  # it never ran on the dead worker
    assert executor.get_task(doomed).status is TaskStatus.FAILED
    assert executor.get_stats()["total_tasks"] == 2


def test_submissions_from_many_threads_all_run_once(make_executor: Make) -> None:
    executor = make_executor(max_local_workers=2)
    ids: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        mine = [executor.submit_task(faults.double, args=(i,)) for i in range(200)]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(executor.wait_for_tasks(ids, timeout=60)) == sorted(
        2 * i for i in range(200) for _ in range(4)
    )
    stats = executor.get_stats()
    assert stats["completed_tasks"] == 800 and stats["total_tasks"] == 800


def test_tasks_queued_behind_one_killed_on_a_deaf_worker_run_once(make_executor: Make) -> None:
    # A worker deaf to SIGTERM runs on through its kill grace: the task it is killed for
    # ends as a timeout, and the tasks queued behind it run once each, elsewhere or after.
    executor = make_executor(max_local_workers=1, max_retries=0, kill_grace=1.5)
    pid = executor.submit(faults.deafen).result(timeout=20)
    slow = executor.submit_task(faults.sleep_then, args=(0.5, "late"), timeout=0.2)
    after = [executor.submit_task(faults.double, args=(i,)) for i in range(3)]
    assert executor.wait_for_tasks(after, timeout=30) == [0, 2, 4]
    assert executor.get_task(slow).status is TaskStatus.CANCELLED  # its deadline: it was killed
    assert all(executor.get_task(t).attempts == 1 for t in after)
    assert wait_until(lambda: executor.get_stats()["workers"]["local-worker-0"]["pid"] != pid, 10)


def test_submissions_never_block_on_a_frozen_manager_and_all_arrive_in_order(
    make_executor: Make, tmp_path: Path
) -> None:
    executor = make_executor(max_local_workers=1)
    manager = executor._supervisor.manager._process.pid  # type: ignore[union-attr]
    log = tmp_path / "order.log"
    os.kill(manager, signal.SIGSTOP)
    try:
        start = time.monotonic()
        pad = "x" * 2048  # a few MB in all: far more than the channel's socket holds
        ids = [executor.submit_task(faults.record_order, args=(str(log), f"{i} {pad}")) for i in range(1500)]
        assert time.monotonic() - start < 10.0  # none waited for the frozen manager
        assert executor._outbox._waiting  # the socket is full: the rest waits, in order
        dropped = ids[-1]
        assert executor.cancel_task(dropped) is True  # taken back before it was ever written
    finally:
        os.kill(manager, signal.SIGCONT)
    assert len(executor.wait_for_tasks(ids[:-1], timeout=120)) == 1499
    order = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert order == list(range(1499))  # one worker: submission order, and the cancelled one never ran
