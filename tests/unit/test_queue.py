"""The TaskQueue's logic, in-process (the manager only serves this object)."""

from __future__ import annotations

import pickle
import threading

from procpool._queue import STOP, TaskQueue


def drain(queue: TaskQueue, worker: str = "w.0") -> list[str]:
    out = []
    while (item := queue.pop(worker)) is not None:
        assert isinstance(item, tuple)
        out.append(item[0])
    return out


def test_priority_first_then_submission_order() -> None:
    q = TaskQueue()
    q.put_frame(pickle.dumps([(2, 1, "n1", 1, b""), (3, 2, "l1", 1, b""), (0, 3, "u1", 1, b"")]))
    q.put(1, 4, "h1", 1, b"")
    q.put(0, 5, "u2", 1, b"")
    q.put(2, 6, "n2", 1, b"")
    assert drain(q) == ["u1", "u2", "h1", "n1", "n2", "l1"]


def test_a_retry_keeps_its_original_place() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"")
    q.put(2, 2, "b", 1, b"")
    assert q.pop("w.0") == ("a", 1, b"")
    q.put(2, 1, "a", 2, b"")  # attempt 2, same seq
    assert q.pop("w.0") == ("a", 2, b"")
    assert drain(q) == ["b"]


def test_cancel_removes_a_queued_task_and_names_the_lease_holder_of_a_taken_one() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"")
    q.put(2, 2, "b", 1, b"")
    assert q.cancel("b") == "removed"
    assert q.pop("w.7") == ("a", 1, b"")
    assert q.cancel("a") == "w.7"
    assert q.cancel("nope") is None
    q.end_lease("w.7")  # it asked for more: a has ended
    assert q.pop("w.7") is None  # and b was removed
    assert q.cancel("a") is None


def test_release_returns_the_lease_and_retires_the_worker() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"p")
    q.put(2, 2, "b", 1, b"p")
    assert q.pop("w.1") == ("a", 1, b"p")
    assert q.release("w.1") == ("a", 1)
    assert q.pop("w.1") == STOP
    assert q.release("w.2") is None
    assert q.pop("w.3") == ("b", 1, b"p")


def test_a_superseded_attempt_is_skipped() -> None:
    q = TaskQueue()
    q.put(2, 1, "a", 1, b"old")
    q.put(2, 1, "a", 2, b"new")
    assert q.pop("w.0") == ("a", 2, b"new")
    assert q.pop("w.0") is None
    assert q.depth() == 0


def test_close_and_retire_stop_workers_and_tell_the_dispatcher() -> None:
    q = TaskQueue()
    changes: list[int] = []
    q.on_change = lambda: changes.append(1)
    q.put(1, 1, "a", 1, b"")
    q.retire("w.0")
    assert q.pop("w.0") == STOP and q.stopping("w.0") and not q.stopping("w.1")
    q.close()
    assert q.pop("w.1") == STOP and q.stopping("w.1")
    assert len(changes) == 3  # the put, the retire and the close


def test_cancel_waits_for_a_task_still_on_its_way_through_the_channel() -> None:
    q = TaskQueue()
    got: list[object] = []
    canceller = threading.Thread(target=lambda: got.append(q.cancel("a", 1)))
    canceller.start()
    canceller.join(0.2)
    assert canceller.is_alive() and not got  # task 1 has not been read yet
    q.put_frame(pickle.dumps([(2, 1, "a", 1, b"")]))
    canceller.join(5)
    assert got == ["removed"] and q.pop("w.0") is None
