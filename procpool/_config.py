"""Executor configuration and the checks that make bad input fail at the call that made it."""

from __future__ import annotations

import math
import multiprocessing
import sys
from dataclasses import dataclass
from typing import Any

from ._states import TaskPriority

__all__ = ("Config", "check_positive", "check_priority", "default_start_method")

START_METHODS = ("fork", "spawn", "forkserver")


def default_start_method() -> str:
    """fork on Linux with Python 3.11 (a worker starts in ~3 ms); forkserver on 3.12+; else the platform's.

    From 3.12, fork in a process with threads (the supervisor is one) warns
    of deadlocks in the child, and 3.14 makes forkserver the default.
    """
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_start_method()
    return "fork" if sys.version_info < (3, 12) else "forkserver"


@dataclass(frozen=True, slots=True)
class Config:
    """Validated executor settings."""

    max_local_workers: int
    task_timeout: float
    max_retries: int
    max_tasks_per_worker: int | None
    kill_grace: float
    start_method: str
    enable_remote: bool
    max_remote_workers: int  # remote slots the pool can hold (0 unless enable_remote)
    heartbeat_timeout: float | None  # seconds without a heartbeat before a worker counts as hung
    memory_sample_interval: float | None  # seconds between samples of each worker's tree
    max_worker_memory_mb: float | None  # recycle a worker whose tree's USS passes this
    hard_memory_limit: bool  # also kill a task whose worker passes it mid-task
    memory_threshold_mb: float | None  # log a warning when a worker passes this
    mp_context: Any = None  # the caller's own multiprocessing context, if given (mp_context=)
    max_finished_tasks: int | None = 10_000  # finished records kept for get_task (None: all)
    finished_task_ttl: float | None = 3600.0  # seconds a finished record is kept (None: for ever)

    @property
    def context(self) -> Any:  # a ForkContext, SpawnContext, ...; typeshed lacks .Process on the base
        if self.mp_context is not None:
            return self.mp_context
        return multiprocessing.get_context(self.start_method)

    @classmethod
    def build(cls, **values: Any) -> Config:
        """Check every setting; raise ValueError or TypeError naming the bad one."""
        _check_int("max_local_workers", values["max_local_workers"], minimum=1)
        _check_int("max_retries", values["max_retries"], minimum=0)
        _check_int("max_remote_workers", values["max_remote_workers"], minimum=0)
        if values["max_tasks_per_worker"] is not None:
            _check_int("max_tasks_per_worker", values["max_tasks_per_worker"], minimum=1)
        context = values.get("mp_context")
        method = values["start_method"]
        if context is not None:
            if not callable(getattr(context, "get_start_method", None)):
                raise TypeError(f"mp_context must be a multiprocessing context, not {type(context).__name__}")
            if method is not None and method != context.get_start_method():
                raise ValueError("give start_method or mp_context, not both")
            method = context.get_start_method()
        method = method or default_start_method()
        if method not in START_METHODS:
            raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, not {method!r}")
        if values.get("max_finished_tasks") is not None:
            _check_int("max_finished_tasks", values["max_finished_tasks"], minimum=0)
        memory = _optional_positive(values, "max_worker_memory_mb")
        interval = _optional_positive(values, "memory_sample_interval")
        if memory is not None and interval is None:
            raise ValueError("max_worker_memory_mb needs memory sampling: set memory_sample_interval")
        if values["hard_memory_limit"] and memory is None:
            raise ValueError("hard_memory_limit=True needs max_worker_memory_mb")
        return cls(
            max_local_workers=values["max_local_workers"],
            task_timeout=check_positive("task_timeout", values["task_timeout"]),
            max_retries=values["max_retries"],
            max_tasks_per_worker=values["max_tasks_per_worker"],
            kill_grace=check_positive("kill_grace", values["kill_grace"]),
            start_method=method,
            enable_remote=bool(values["enable_remote"]),
            max_remote_workers=values["max_remote_workers"] if values["enable_remote"] else 0,
            heartbeat_timeout=_optional_positive(values, "heartbeat_timeout"),
            memory_sample_interval=interval,
            max_worker_memory_mb=memory,
            hard_memory_limit=bool(values["hard_memory_limit"]),
            memory_threshold_mb=_optional_positive(values, "memory_threshold_mb"),
            mp_context=context,
            max_finished_tasks=values.get("max_finished_tasks", 10_000),
            finished_task_ttl=_optional_positive(
                {"finished_task_ttl": values.get("finished_task_ttl", 3600.0)}, "finished_task_ttl"
            ),
        )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}")


def _optional_positive(values: dict[str, Any], name: str) -> float | None:
    value = values[name]
    return None if value is None else check_positive(name, value)


def check_positive(name: str, value: object) -> float:
    """A finite number of seconds above zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds above zero, not {value!r}")
    return float(value)


def check_priority(value: object) -> TaskPriority:
    """A TaskPriority, given as a member, its name or its value."""
    if isinstance(value, TaskPriority):
        return value
    if isinstance(value, str) and value.upper() in TaskPriority.__members__:
        return TaskPriority[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return TaskPriority(value)
        except ValueError:
            pass
    names = ", ".join(p.name for p in TaskPriority)
    raise ValueError(f"unknown priority {value!r}; use TaskPriority.{{{names}}}")
