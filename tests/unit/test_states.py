from __future__ import annotations

import pytest

from procpool._states import TERMINAL, TaskStatus, advance


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
