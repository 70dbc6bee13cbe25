"""sessions: a pool of real headless Chromium browsers, one per account.

Each account gets its own browser (or its own incognito context in a shared
browser), never seeing another account's cookies or storage; its login is
saved and restored across evictions, recycles, crashes and restarts. Sessions
are reused while healthy, evicted least-recently-used, closed when idle,
probed for health, and measured for real (USS/PSS of the whole process tree).
Usable from plain code (blocking proxies) and from asyncio code.

With procpool, ``DistributedExecutor(companion=pinned_browsers())`` gives each
worker its own browser, owned by the pool's manager process; an async task
gets it with ``await current_browser()``, or its account's own incognito
context with ``await current_context(account)``.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("pyppeteer") is None:  # checked, not imported: _driver is its one importer
    raise ImportError("sessions needs pyppeteer, which is not installed: pip install 'procpool[browser]'")

from ._errors import (
    BrowserGoneError,
    BrowserLaunchError,
    BrowserNotFoundError,
    CallTimeoutError,
    PageCrashedError,
    ProfileInUseError,
    SessionError,
    SessionPoolClosedError,
    SessionPoolFullError,
)
from ._pinned import PinnedBrowsers, current_browser, current_context, pinned_browsers
from ._pool import DevTools, SessionPool, get_optimized_session_pool
from ._sync import Blocking

__all__ = (
    "Blocking",
    "BrowserGoneError",
    "BrowserLaunchError",
    "BrowserNotFoundError",
    "CallTimeoutError",
    "DevTools",
    "PageCrashedError",
    "PinnedBrowsers",
    "ProfileInUseError",
    "SessionError",
    "SessionPool",
    "SessionPoolClosedError",
    "SessionPoolFullError",
    "current_browser",
    "current_context",
    "get_optimized_session_pool",
    "pinned_browsers",
)
