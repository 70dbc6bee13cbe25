from __future__ import annotations

import signal

from procpool._scheduling import Timers, describe_exit, should_retry


def test_timers_fire_in_deadline_order_with_a_fake_clock() -> None:
    timers = Timers()
    timers.set("b", 2.0)
    timers.set("a", 1.0)
    timers.set("c", 3.0)
    assert timers.next_due() == 1.0
    assert timers.pop_due(0.5) == []
    assert timers.pop_due(2.0) == ["a", "b"]
    assert timers.next_due() == 3.0
    assert len(timers) == 1


def test_discarded_and_replaced_timers_do_not_fire() -> None:
    timers = Timers()
    timers.set("x", 1.0)
    timers.set("y", 1.5)
    timers.discard("x")
    timers.set("y", 5.0)  # replaces the 1.5 deadline
    assert timers.pop_due(4.0) == []
    assert "y" in timers and "x" not in timers
    assert timers.pop_due(5.0) == ["y"]
    assert timers.next_due() is None


def test_retry_budget_counts_attempts_from_one() -> None:
    assert [should_retry(a, max_retries=2) for a in (1, 2, 3)] == [True, True, False]
    assert not should_retry(1, max_retries=0)


def test_exit_descriptions_name_the_signal_and_a_likely_cause() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert "SIGKILL" in describe_exit(-signal.SIGKILL) and "out of memory" in describe_exit(-signal.SIGKILL)
    assert "SIGSEGV" in describe_exit(-signal.SIGSEGV)
    assert describe_exit(-200) == "was killed by signal 200"
    assert describe_exit(None) == "vanished"
