"""sessions: a pool of real headless Chromium browsers, one per account.

Each account gets its own browser on its own profile directory; sessions are
reused while healthy, evicted least-recently-used, closed when idle, probed
for health, and measured for real (USS/PSS of the whole process tree).
Usable from plain code and from asyncio code.
"""

from __future__ import annotations

from ._errors import (
    BrowserLaunchError,
    BrowserNotFoundError,
    ProfileInUseError,
    SessionError,
    SessionPoolClosedError,
    SessionPoolFullError,
)
from ._pool import SessionPool, get_optimized_session_pool

__all__ = (
    "BrowserLaunchError",
    "BrowserNotFoundError",
    "ProfileInUseError",
    "SessionError",
    "SessionPool",
    "SessionPoolClosedError",
    "SessionPoolFullError",
    "get_optimized_session_pool",
)
