"""Hypothesis: the queue's order and the timers against simple models."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from procpool._queue import TaskQueue
from procpool._scheduling import Timers

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 3)),
        st.tuples(st.just("take"), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 40)),
        st.tuples(st.just("fail"), st.just(0)),  # the last taken task fails and is put back
    ),
    max_size=60,
)


@given(ops)
def test_pop_always_returns_the_best_waiting_task(steps: list[tuple[str, int]]) -> None:
    queue = TaskQueue()
    waiting: dict[str, tuple[int, int]] = {}  # task id -> (priority, seq)
    seq = 0
    last: tuple[str, int, int] | None = None  # id, priority, seq of the last task taken
    for op, arg in steps:
        if op == "put":
            seq += 1
            queue.put(arg, seq, f"t{seq}", 1, b"")
            waiting[f"t{seq}"] = (arg, seq)
        elif op == "take":
            item = queue.pop("w.0")
            if not waiting:
                assert item is None
                continue
            best = min(waiting, key=waiting.__getitem__)
            assert isinstance(item, tuple) and item[0] == best
            last = (best, *waiting.pop(best))
        elif op == "cancel":
            removed = queue.cancel(f"t{arg}") == "removed"
            assert removed == (f"t{arg}" in waiting)
            waiting.pop(f"t{arg}", None)
        elif op == "fail" and last is not None:
            task_id, priority, old_seq = last
            queue.put(priority, old_seq, task_id, 2, b"")  # a retry keeps its seq
            waiting[task_id] = (priority, old_seq)
            last = None
    assert queue.depth() == len(waiting)


@given(
    st.lists(st.tuples(st.integers(0, 9), st.floats(0, 100, allow_nan=False)), max_size=40), st.floats(0, 100)
)
def test_timers_pop_exactly_the_due_keys_in_order(sets: list[tuple[int, float]], now: float) -> None:
    timers = Timers()
    model: dict[int, float] = {}
    for key, when in sets:
        timers.set(key, when)
        model[key] = when
    due = timers.pop_due(now)
    assert sorted(due, key=lambda k: model[k]) == due
    assert set(due) == {k for k, w in model.items() if w <= now}
    assert len(timers) == len(model) - len(due)
