"""LRU, idle and memory verdicts of the session pool, with a fake clock."""

from __future__ import annotations

from sessions._policy import Usage, idle_expired, lru_victim, needs_recycle
from sessions._state import profile_name


def test_the_least_recently_used_free_session_is_the_victim() -> None:
    sessions = {"a": Usage(10.0, 0), "b": Usage(5.0, 1), "c": Usage(7.0, 0)}
    assert lru_victim(sessions) == "c"  # b is older but in use
    assert lru_victim({"b": Usage(5.0, 1)}) is None
    assert lru_victim({}) is None


def test_idle_sessions_expire_oldest_first_and_never_while_in_use() -> None:
    sessions = {"a": Usage(0.0, 0), "b": Usage(50.0, 0), "c": Usage(1.0, 2), "d": Usage(-5.0, 0)}
    assert idle_expired(sessions, now=100.0, timeout=60.0) == ["d", "a"]
    assert idle_expired(sessions, now=100.0, timeout=200.0) == []


def test_memory_recycles_only_past_the_threshold_and_when_quiet() -> None:
    def verdict(usage: Usage, threshold: float | None = 500.0, now: float = 100.0) -> bool:
        return needs_recycle(usage, threshold, now, quiet=10.0)

    assert verdict(Usage(0.0, 0, memory_mb=600.0))
    assert not verdict(Usage(0.0, 1, memory_mb=600.0))  # held
    assert not verdict(Usage(95.0, 0, memory_mb=600.0))  # used 5 s ago: a sync user reading a page
    assert verdict(Usage(90.0, 0, memory_mb=600.0))
    assert not verdict(Usage(0.0, 0, memory_mb=400.0))
    assert not verdict(Usage(0.0, 0, memory_mb=None))
    assert not verdict(Usage(0.0, 0, memory_mb=600.0), threshold=None)


def test_profile_names_are_safe_and_distinct() -> None:
    names = {profile_name(a) for a in ("ctr-prod", "ctr/prod", "ctr prod", "../etc", ".hidden")}
    assert len(names) == 5
    assert all("/" not in n and not n.startswith(".") for n in names)
    assert profile_name("ctr-prod").startswith("ctr-prod-")
