from __future__ import annotations

import multiprocessing
import sys
from typing import Any

import pytest

from procpool import TaskPriority
from procpool._config import Config, check_positive, check_priority

GOOD: dict[str, Any] = dict(
    max_local_workers=2, task_timeout=5, enable_remote=False, max_retries=1,
    max_tasks_per_worker=None, kill_grace=0.5, start_method=None, heartbeat_timeout=30.0,
    memory_sample_interval=2.0, max_worker_memory_mb=None, hard_memory_limit=False,
    memory_threshold_mb=None, max_remote_workers=16,
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("max_local_workers", 0, ValueError),
        ("max_local_workers", 1.5, TypeError),
        ("max_retries", -1, ValueError),
        ("task_timeout", 0, ValueError),
        ("task_timeout", float("nan"), ValueError),
        ("task_timeout", "5", TypeError),
        ("kill_grace", -1, ValueError),
        ("max_tasks_per_worker", 0, ValueError),
        ("start_method", "threads", ValueError),
        ("heartbeat_timeout", 0, ValueError),
        ("memory_sample_interval", -2, ValueError),
        ("max_worker_memory_mb", "lots", TypeError),
        ("memory_threshold_mb", float("inf"), ValueError),
        ("max_remote_workers", -1, ValueError),
    ],
)
def test_bad_settings_fail_with_the_setting_named(name: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=name):
        Config.build(**{**GOOD, name: value})


def test_the_default_start_method_is_fork_on_3_11_and_forkserver_after() -> None:
    expected = "fork" if sys.version_info < (3, 12) else "forkserver"
    assert Config.build(**GOOD).start_method == expected


def test_a_context_sets_the_start_method_and_conflicts_are_refused() -> None:
    spawn = multiprocessing.get_context("spawn")
    assert Config.build(**{**GOOD, "mp_context": spawn}).context is spawn
    with pytest.raises(ValueError, match="not both"):
        Config.build(**{**GOOD, "mp_context": spawn, "start_method": "fork"})
    with pytest.raises(TypeError, match="mp_context"):
        Config.build(**{**GOOD, "mp_context": "spawn"})


@pytest.mark.parametrize("value", [TaskPriority.HIGH, "HIGH", "high", 1])
def test_priorities_by_member_name_or_value(value: object) -> None:
    assert check_priority(value) is TaskPriority.HIGH


@pytest.mark.parametrize("value", ["SOON", 7, None, True, 1.0])
def test_unknown_priorities_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="unknown priority"):
        check_priority(value)


def test_timeouts_must_be_positive_finite_numbers() -> None:
    assert check_positive("timeout", 2) == 2.0
    for bad in (0, -1, float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            check_positive("timeout", bad)


def test_memory_settings_that_need_each_other() -> None:
    with pytest.raises(ValueError, match="memory_sample_interval"):
        Config.build(**{**GOOD, "max_worker_memory_mb": 100, "memory_sample_interval": None})
    with pytest.raises(ValueError, match="max_worker_memory_mb"):
        Config.build(**{**GOOD, "hard_memory_limit": True})
    off = Config.build(**{**GOOD, "heartbeat_timeout": None, "memory_sample_interval": None})
    assert (off.heartbeat_timeout, off.memory_sample_interval) == (None, None)
