"""A TaskFuture is a full concurrent.futures.Future, built lighter for the garbage collector."""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import weakref

import pytest

from procpool._task import TaskFuture


class NoExecutor:
    def cancel(self, task_id: str, kill: bool) -> bool:
        raise AssertionError("not called in these tests")


EXECUTOR = NoExecutor()
CANCEL = weakref.WeakMethod(EXECUTOR.cancel)  # made once, as the executor does for all its futures


def make() -> TaskFuture:
    return TaskFuture("task-1", CANCEL)


def test_waiters_in_other_threads_wake_on_the_result() -> None:
    future = make()
    got: list[object] = []
    waiters = [threading.Thread(target=lambda: got.append(future.result(10))) for _ in range(3)]
    for t in waiters:
        t.start()
    done, _ = concurrent.futures.wait([future], timeout=0.05)
    assert not done
    future.set_result(42)
    for t in waiters:
        t.join(10)
    assert got == [42, 42, 42]
    assert concurrent.futures.wait([future], timeout=0).done == {future}


def test_a_bounded_wait_times_out_and_the_lock_is_free_after() -> None:
    future = make()
    with pytest.raises(TimeoutError):
        future.result(0.05)
    condition = future._condition
    assert condition.acquire(timeout=1)
    condition.release()
    with condition, condition:  # reentrant, as the Future's own methods need
        future.set_exception(ValueError("boom"))
    assert isinstance(future.exception(0), ValueError)


def test_callbacks_and_as_completed_see_it() -> None:
    futures = [make() for _ in range(3)]
    seen: list[object] = []
    futures[1].add_done_callback(lambda f: seen.append(f.result()))
    threading.Timer(0.05, futures[1].set_result, ("b",)).start()
    first = next(concurrent.futures.as_completed(futures, timeout=10))
    assert first is futures[1] and seen == ["b"]


def test_each_future_holds_fewer_objects_for_the_collector() -> None:
    # A plain Future costs the cyclic collector ten objects (its Condition binds five
    # methods); it walks them all for as long as the task is held.
    def tracked_per_future(factory: object) -> float:
        gc.collect()
        before = len(gc.get_objects())
        kept = [factory() for _ in range(1000)]  # type: ignore[operator]
        count = (len(gc.get_objects()) - before) / len(kept)
        del kept
        return count

    plain = tracked_per_future(concurrent.futures.Future)
    ours = tracked_per_future(make)
    assert ours <= plain - 4, (ours, plain)
