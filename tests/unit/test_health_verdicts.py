"""Heartbeat and memory verdicts, as pure functions of the slot's figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from procpool._health import Verdict, heartbeat_interval, judge, recycle_limit, silent_for
from procpool._metrics import MB, SlotHealth

PID = 4242


def health(beat: float = 100.0, uss_mb: float = 50, baseline_mb: float = 20, pid: int = PID) -> SlotHealth:
    return SlotHealth(pid, beat, pid, int(uss_mb * MB), int(baseline_mb * MB), beat)


def verdict(
    now: float, h: SlotHealth, limit_mb: float | None = None, hard: bool = False, busy: bool = False
) -> Verdict:
    limit = None if limit_mb is None else int(limit_mb * MB)
    return judge(now, 90.0, PID, h, heartbeat_timeout=2.0, memory_limit=limit, hard=hard, busy=busy)


def test_a_worker_is_hung_only_after_the_timeout_since_its_last_beat() -> None:
    assert verdict(101.9, health(beat=100.0)) is Verdict.OK
    assert verdict(102.1, health(beat=100.0)) is Verdict.HUNG


def test_a_beat_of_the_slot_s_previous_process_does_not_count() -> None:
    old = health(beat=200.0, pid=1)
    assert silent_for(now=95.0, spawned=90.0, pid=PID, health=old) == 5.0  # since its own start
    assert judge(95.0, 90.0, PID, old, heartbeat_timeout=2.0, memory_limit=None, hard=False, busy=False) is (
        Verdict.HUNG
    )


def test_no_heartbeat_timeout_means_never_hung() -> None:
    h = health(beat=0.0)
    assert (
        judge(1e6, 0.0, PID, h, heartbeat_timeout=None, memory_limit=None, hard=False, busy=False)
        is Verdict.OK
    )


def test_over_the_limit_recycles_and_with_a_hard_limit_kills_a_busy_worker() -> None:
    h = health(uss_mb=150, baseline_mb=20)
    assert verdict(100.5, h, limit_mb=200) is Verdict.OK
    assert verdict(100.5, h, limit_mb=100) is Verdict.RECYCLE
    assert verdict(100.5, h, limit_mb=100, hard=True, busy=False) is Verdict.RECYCLE
    assert verdict(100.5, h, limit_mb=100, hard=True, busy=True) is Verdict.OUT_OF_MEMORY


def test_a_worker_that_starts_over_the_limit_gets_twice_its_fresh_size() -> None:
    assert recycle_limit(100, baseline=300) == 600
    assert recycle_limit(100, baseline=30) == 100
    assert verdict(100.5, health(uss_mb=500, baseline_mb=300), limit_mb=100) is Verdict.OK
    assert verdict(100.5, health(uss_mb=601, baseline_mb=300), limit_mb=100) is Verdict.RECYCLE


def test_memory_of_another_or_a_starting_process_is_not_judged() -> None:
    h = SlotHealth(PID, 100.0, 1, 10_000 * MB, 10, 100.0)  # a sample of the slot's previous process
    assert verdict(100.5, h, limit_mb=100) is Verdict.OK
    h = SlotHealth(PID, 100.0, PID, 10_000 * MB, 0, 100.0)  # no baseline: its start-up is not over
    assert verdict(100.5, h, limit_mb=100) is Verdict.OK


@pytest.mark.parametrize(("timeout", "interval"), [(None, 1.0), (30.0, 1.0), (1.0, 0.25)])
def test_beats_come_several_times_per_timeout(timeout: float | None, interval: float) -> None:
    assert heartbeat_interval(timeout) == interval


def test_proc_stat_gives_state_and_cpu_ticks_even_with_spaces_in_the_name() -> None:
    from procpool._health import parse_stat

    text = "4123 (python (my task)) S 1 4123 4123 0 -1 4194560 1 0 0 0 250 17 0 0 20 0 3 0 99 0 0"
    assert parse_stat(text) == ("S", 267)
    assert parse_stat(Path("/proc/self/stat").read_text())[0] in "RS"
