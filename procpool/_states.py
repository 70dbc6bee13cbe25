"""Task priorities and the task state machine: one enum, one table, one function."""

from __future__ import annotations

import enum

__all__ = ("TaskPriority", "TaskStatus", "advance", "TERMINAL")


class TaskPriority(enum.IntEnum):
    """Queue order: a lower value runs first; FIFO within a level."""

    URGENT = 0  # runs before anything else
    HIGH = 1
    NORMAL = 2  # the default
    LOW = 3  # runs only when nothing else waits


class TaskStatus(enum.StrEnum):
    """Where a task is in its life. Terminal states are sticky."""

    PENDING = "pending"  # queued, not yet started by a worker
    RUNNING = "running"  # a worker holds the lease for the current attempt
    RETRYING = "retrying"  # an attempt failed; queued again in its original place
    COMPLETED = "completed"  # terminal: the function returned
    FAILED = "failed"  # terminal: every attempt failed, or the pool broke
    CANCELLED = "cancelled"  # terminal: cancelled by the user, or killed at its deadline


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

_S = TaskStatus
_ALLOWED: dict[TaskStatus, frozenset[TaskStatus]] = {
    _S.PENDING: frozenset({_S.RUNNING, _S.RETRYING, _S.FAILED, _S.CANCELLED}),
    _S.RUNNING: frozenset({_S.COMPLETED, _S.FAILED, _S.RETRYING, _S.CANCELLED}),
    _S.RETRYING: frozenset({_S.RUNNING, _S.RETRYING, _S.FAILED, _S.CANCELLED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


def advance(current: TaskStatus, new: TaskStatus) -> TaskStatus:
    """Return ``new`` if the move is allowed; an illegal move is a bug and raises.

    PENDING -> RETRYING happens when a worker dies after taking a task but
    before the supervisor heard that it started.
    """
    if new not in _ALLOWED[current]:
        raise AssertionError(f"illegal task transition {current.name} -> {new.name}")
    return new
