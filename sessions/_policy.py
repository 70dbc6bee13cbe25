"""Pure verdicts: which session to evict, which are idle, which to recycle.

No browsers and no clocks here: the pool passes what it knows and ``now``
(monotonic seconds), so tests drive these with a fake clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

__all__ = ("Usage", "idle_expired", "lru_victim", "needs_recycle")


class Usage(NamedTuple):
    """What the policies know of a session."""

    last_used: float  # monotonic
    in_use: int  # open ``session()`` blocks; a session in use is never closed by policy
    healthy: bool = True
    memory_mb: float | None = None


def lru_victim(sessions: Mapping[str, Usage]) -> str | None:
    """The least recently used session not in use, or None if every one is in use."""
    free = [(u.last_used, account) for account, u in sessions.items() if not u.in_use]
    return min(free)[1] if free else None


def idle_expired(sessions: Mapping[str, Usage], now: float, timeout: float) -> list[str]:
    """Sessions not in use and unused for longer than ``timeout``, oldest first."""
    expired = [(u.last_used, a) for a, u in sessions.items() if not u.in_use and now - u.last_used > timeout]
    return [account for _, account in sorted(expired)]


def needs_recycle(usage: Usage, threshold_mb: float | None, now: float, quiet: float) -> bool:
    """A session past the memory threshold is recycled once nobody holds it or used it for ``quiet`` s."""
    over = threshold_mb is not None and usage.memory_mb is not None and usage.memory_mb > threshold_mb
    return over and not usage.in_use and now - usage.last_used >= quiet
