"""The TaskQueue's logic, in-process (the manager only serves this object)."""

from __future__ import annotations

import threading

from procpool._queue import STOP, TaskQueue


def drain(queue: TaskQueue, worker: str = "w.0") -> list[str]:
    out = []
    while (item := queue.take(worker, 0)) is not None:
        assert isinstance(item, tuple)
        out.append(item[0])
    return out


def test_priority_first_then_submission_order() -> None:
    q = TaskQueue()
    q.put_many([(2, 1, "n1", 1, b""), (3, 2, "l1", 1, b""), (0, 3, "u1", 1, b"")])
    q.put(1, 4, "h1", 1, b"")
    q.put(0, 5, "u2", 1, b"")
    q.put(2, 6, "n2", 1, b"")
    assert drain(q) == ["u1", "u2", "h1", "n1", "n2", "l1"]


def test_a_retry_keeps_its_original_place() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"")
    q.put(2, 2, "b", 1, b"")
    assert q.take("w.0", 0) == ("a", 1, b"")
    q.put(2, 1, "a", 2, b"")  # attempt 2, same seq
    assert q.take("w.0", 0) == ("a", 2, b"")
    assert drain(q) == ["b"]


def test_cancel_removes_a_queued_task_and_names_the_lease_holder_of_a_taken_one() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"")
    q.put(2, 2, "b", 1, b"")
    assert q.cancel("b") == "removed"
    assert q.take("w.7", 0) == ("a", 1, b"")
    assert q.cancel("a") == "w.7"
    assert q.cancel("nope") is None
    assert q.take("w.7", 0) is None  # b was removed; a's lease ended with this take
    assert q.cancel("a") is None


def test_release_returns_the_lease_and_retires_the_worker() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"p")
    q.put(2, 2, "b", 1, b"p")
    assert q.take("w.1", 0) == ("a", 1, b"p")
    assert q.release("w.1") == ("a", 1)
    assert q.take("w.1", 0) == STOP
    assert q.release("w.2") is None
    assert q.take("w.3", 0) == ("b", 1, b"p")


def test_a_superseded_attempt_is_skipped() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"old")
    q.put(2, 1, "a", 2, b"new")
    assert q.take("w.0", 0) == ("a", 2, b"new")
    assert q.take("w.0", 0) is None
    assert q.depth() == 0


def test_close_wakes_a_blocked_take() -> None:
    q = TaskQueue()
    got: list[object] = []
    taker = threading.Thread(target=lambda: got.append(q.take("w.0", 30)))
    taker.start()
    q.close()
    taker.join(5)
    assert got == [STOP]


def test_put_wakes_a_blocked_take() -> None:
    q = TaskQueue()
    got: list[object] = []
    taker = threading.Thread(target=lambda: got.append(q.take("w.0", 30)))
    taker.start()
    q.put(1, 1, "a", 1, b"")
    taker.join(5)
    assert got == [("a", 1, b"")]
