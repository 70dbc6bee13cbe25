"""sessions: a pool of real headless Chromium browsers, one per account.

Each account gets its own browser on its own profile directory; sessions are
reused while healthy, evicted least-recently-used, closed when idle, probed
for health, and measured for real (USS/PSS of the whole process tree).
Usable from plain code and from asyncio code.

With procpool, ``DistributedExecutor(companion=pinned_browsers())`` gives each
worker its own browser, owned by the pool's manager process; an async task
gets it with ``await current_browser()``.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("pyppeteer") is None:  # checked, not imported: _driver is its one importer
    raise ImportError("sessions needs pyppeteer, which is not installed: pip install 'procpool[browser]'")

from ._errors import (
    BrowserLaunchError,
    BrowserNotFoundError,
    ProfileInUseError,
    SessionError,
    SessionPoolClosedError,
    SessionPoolFullError,
)
from ._pinned import PinnedBrowsers, current_browser, pinned_browsers
from ._pool import SessionPool, get_optimized_session_pool

__all__ = (
    "BrowserLaunchError",
    "BrowserNotFoundError",
    "PinnedBrowsers",
    "ProfileInUseError",
    "SessionError",
    "SessionPool",
    "SessionPoolClosedError",
    "SessionPoolFullError",
    "current_browser",
    "get_optimized_session_pool",
    "pinned_browsers",
)
