"""Task priorities and the two state machines (tasks, workers): an enum, a table, one ``advance``."""

from __future__ import annotations

import enum
from typing import TypeVar

__all__ = ("TaskPriority", "TaskStatus", "WorkerState", "advance", "TERMINAL")


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


class WorkerState(enum.StrEnum):
    """Where a worker process is in its life, as the supervisor sees it. GONE is sticky."""

    ACTIVE = "active"  # takes tasks from the queue
    RETIRING = "retiring"  # takes no more (memory recycling, host removal): ends after its current task
    # Being killed for a task attempt whose start is not read yet: what it
    # says before that is about tasks it ran to the end, and still counts.
    DOOMED = "doomed"
    FENCED = "fenced"  # being killed; nothing it says counts any more
    GONE = "gone"  # exited, reaped and forgotten


_W = WorkerState
_WORKER_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    _W.ACTIVE: frozenset({_W.RETIRING, _W.DOOMED, _W.FENCED, _W.GONE}),
    _W.RETIRING: frozenset({_W.DOOMED, _W.FENCED, _W.GONE}),
    _W.DOOMED: frozenset({_W.FENCED, _W.GONE}),
    _W.FENCED: frozenset({_W.GONE}),
    _W.GONE: frozenset(),
}

_State = TypeVar("_State", TaskStatus, WorkerState)


def advance(current: _State, new: _State) -> _State:
    """Return ``new`` if the move is allowed; an illegal move is a bug and raises.

    PENDING -> RETRYING happens when a worker dies after taking a task but
    before the supervisor heard that it started.
    """
    allowed: frozenset[_State] = (
        _ALLOWED[current] if isinstance(current, TaskStatus) else _WORKER_MOVES[current]  # type: ignore[assignment]
    )
    if new not in allowed:
        kind = "task" if isinstance(current, TaskStatus) else "worker"
        raise AssertionError(f"illegal {kind} transition {current.name} -> {new.name}")
    return new
