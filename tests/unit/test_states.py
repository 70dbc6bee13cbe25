from __future__ import annotations

import pytest

from procpool._states import TERMINAL, TaskStatus, WorkerState, advance


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
@pytest.mark.parametrize("target", list(TaskStatus))
def test_terminal_states_are_sticky(terminal: TaskStatus, target: TaskStatus) -> None:
    with pytest.raises(AssertionError, match="illegal task transition"):
        advance(terminal, target)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (TaskStatus.PENDING, TaskStatus.RUNNING),
        (TaskStatus.RUNNING, TaskStatus.RETRYING),
        (TaskStatus.RETRYING, TaskStatus.RUNNING),
        (TaskStatus.RUNNING, TaskStatus.COMPLETED),
        (TaskStatus.PENDING, TaskStatus.CANCELLED),
    ],
)
def test_allowed_moves(old: TaskStatus, new: TaskStatus) -> None:
    assert advance(old, new) is new


def test_a_pending_task_cannot_complete_without_running() -> None:
    with pytest.raises(AssertionError):
        advance(TaskStatus.PENDING, TaskStatus.COMPLETED)


def test_status_values_are_plain_strings() -> None:
    assert TaskStatus.COMPLETED == "completed"
    assert {s.name for s in TaskStatus} == {
        "PENDING", "RUNNING", "COMPLETED", "FAILED", "RETRYING", "CANCELLED"
    }  # fmt: skip


@pytest.mark.parametrize("target", list(WorkerState))
def test_a_gone_worker_stays_gone(target: WorkerState) -> None:
    with pytest.raises(AssertionError, match="illegal worker transition"):
        advance(WorkerState.GONE, target)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (WorkerState.FENCED, WorkerState.DOOMED),  # a fenced worker's messages never count again
        (WorkerState.DOOMED, WorkerState.ACTIVE),  # a worker being killed never takes work again
        (WorkerState.RETIRING, WorkerState.ACTIVE),
    ],
)
def test_a_worker_never_comes_back(old: WorkerState, new: WorkerState) -> None:
    with pytest.raises(AssertionError):
        advance(old, new)


def test_every_worker_state_can_end() -> None:
    for state in WorkerState:
        if state is not WorkerState.GONE:
            assert advance(state, WorkerState.GONE) is WorkerState.GONE
