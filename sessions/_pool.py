"""SessionPool: the public face of the async core, for plain code and for asyncio code.

    sync caller ── get_session / run / close_* ──▶ ┐
                                                    ├─ run_coroutine_threadsafe ─▶ Core (pool loop thread)
    async caller ── get_session_async / session ──▶ ┘   then connects a Browser on its own loop

A pyppeteer Browser belongs to the loop it was connected on. ``get_session``
returns the pool loop's connection (drive it with ``pool.run(coro)``);
``get_session_async`` and ``session()`` return a connection on the caller's
loop to the same Chromium (a connect costs ~2 ms).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures.thread  # noqa: F401 - registers its exit hook before the pool's (see below)
import contextlib
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from ._core import HOOKS, Core, Settings
from ._driver import Browser, connect, find_chromium
from ._errors import SessionPoolClosedError

__all__ = ("SessionPool", "get_optimized_session_pool")

T = TypeVar("T")
_default: SessionPool | None = None
_default_lock = threading.Lock()


class SessionPool:
    """One headless Chromium per account, kept healthy, measured and evicted LRU.

    Args:
        max_sessions: browsers open at once; the least recently used one not in
            use is closed to make room.
        session_idle_timeout: seconds a session may sit unused before it is closed.
        health_check_interval: seconds between health checks of every session
            (a browser-level call and a page-level evaluate, each bounded).
        memory_threshold_mb: a session whose browser tree passes this (USS) is
            warned about and recycled when next idle, on the same profile.
        profile_root: where each account's profile lives (cookies and logins
            survive a recycle and a restart); a temporary folder by default,
            removed by ``close()``.
        executable_path: the Chromium to run (else $SESSIONS_CHROMIUM, else found).
        launch_timeout: seconds Chromium gets to start listening.
        call_timeout: seconds any CDP call made by the pool may take.
        memory_sample_interval: seconds between memory samples of every browser.

    Raises:
        BrowserNotFoundError: no Chromium (the message says how to install it).
        ValueError: a setting out of range.
    """

    def __init__(
        self,
        max_sessions: int = 3,
        session_idle_timeout: float = 600,
        health_check_interval: float = 60,
        memory_threshold_mb: float | None = 500.0,
        *,
        profile_root: str | Path | None = None,
        executable_path: str | Path | None = None,
        launch_timeout: float = 30.0,
        call_timeout: float = 10.0,
        memory_sample_interval: float = 30.0,
    ) -> None:
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an int of at least 1, not {max_sessions!r}")
        timing = dict(
            session_idle_timeout=session_idle_timeout, health_check_interval=health_check_interval,
            launch_timeout=launch_timeout, call_timeout=call_timeout,
            memory_sample_interval=memory_sample_interval,
        )  # fmt: skip
        for name, value in timing.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds above zero, not {value!r}")
        if memory_threshold_mb is not None and not memory_threshold_mb > 0:
            raise ValueError(f"memory_threshold_mb must be above zero or None, not {memory_threshold_mb!r}")
        executable = find_chromium(executable_path)
        self._temp_root = profile_root is None
        root = Path(tempfile.mkdtemp(prefix="sessions-")) if profile_root is None else Path(profile_root)
        settings = Settings(
            max_sessions, float(session_idle_timeout), float(health_check_interval), memory_threshold_mb,
            float(memory_sample_interval), executable, root, float(launch_timeout), float(call_timeout),
        )  # fmt: skip
        self._core = Core(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sessions-loop", daemon=True)
        self._thread.start()
        self._closed = False
        self._upkeep = self._submit(self._core.maintain())
        self._connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Browser]] = (
            weakref.WeakKeyDictionary()
        )
        self._connections_lock = threading.Lock()
        self._owner = os.getpid()  # a forked child (a pool worker) inherits this object, not its loop
        _register_exit_hook(weakref.ref(self))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._core.sessions)} sessions"
        return f"<SessionPool {state} max_sessions={self._core.settings.max_sessions}>"

    # -- plain (synchronous) use ---------------------------------------------------

    def get_session(self, account: str) -> Browser:
        """The account's browser, created or reused; a pyppeteer Browser on the pool's loop.

        Drive it from plain code with ``pool.run(browser.newPage())`` and so on.
        """
        return self._call(self._core.get(_check_account(account))).browser

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine (such as a page action) on the pool's loop and return its result."""
        return self._call(coro, timeout)

    def close_session(self, account: str) -> bool:
        """Close one account's browser (its whole process tree). False if it had none."""
        return self._call(self._core.close(account))

    def close_all(self) -> None:
        """Close every browser; the pool stays usable."""
        self._call(self._core.close_all())

    def get_stats(self) -> dict[str, Any]:
        """Sessions, requests, errors, and per session: times, counts, memory (USS) and health."""
        return self._call(_value(self._core.stats))

    def register_hook(self, event: str, fn: Callable[..., Any]) -> None:
        """Call ``fn`` on ``session_created`` (account, browser), ``session_closed`` (account)
        or ``session_error`` (account, error). Hooks run on the pool's loop; one may be async."""
        if event not in HOOKS:
            raise ValueError(f"unknown hook event {event!r}; use one of {', '.join(HOOKS)}")
        if not callable(fn):
            raise TypeError(f"a hook must be callable, not {type(fn).__name__}")
        self._loop.call_soon_threadsafe(self._core.hooks[event].append, fn)

    def close(self) -> None:
        """Close every browser and stop the pool. Idempotent."""
        if self._closed:
            return
        self._call(self._shut())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        if self._temp_root:
            shutil.rmtree(self._core.settings.profile_root, ignore_errors=True)

    async def _shut(self) -> None:
        upkeep = asyncio.wrap_future(self._upkeep)
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep
        await self._core.close_all()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:  # connections winding down: end them before the loop closes
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- asyncio use -----------------------------------------------------------------

    async def get_session_async(self, account: str) -> Browser:
        """The account's browser as a pyppeteer Browser on the calling loop."""
        session = await self._await(self._core.get(_check_account(account)))
        return await self._connection(account, session.process.endpoint)

    @contextlib.asynccontextmanager
    async def session(self, account: str) -> AsyncIterator[Browser]:
        """``async with pool.session(account) as browser``: held in use, so never evicted meanwhile."""
        session = await self._await(self._core.get(_check_account(account), hold=True))
        try:
            yield await self._connection(account, session.process.endpoint)
        finally:
            self._loop.call_soon_threadsafe(self._core.release, account)

    async def __aenter__(self) -> SessionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def _connection(self, account: str, endpoint: str) -> Browser:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return self._core.sessions[account].browser
        with self._connections_lock:
            mine = self._connections.setdefault(loop, {})
        browser = mine.get(account)
        if browser is None or browser.wsEndpoint != endpoint or not browser._connection._connected:
            browser = mine[account] = await connect(endpoint, self._core.settings.call_timeout)
        return browser

    # -- plumbing ----------------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._closed:
            coro.close()
            raise SessionPoolClosedError("the session pool is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking SessionPool call from its own loop (a hook?) would deadlock")
        return self._submit(coro).result(timeout)

    async def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(self._submit(coro))


async def _value(fn: Callable[[], T]) -> T:
    return fn()


def _check_account(account: object) -> str:
    if not isinstance(account, str) or not account:
        raise ValueError(f"an account must be a non-empty str, not {account!r}")
    return account


def _close_at_exit(ref: weakref.ref[SessionPool]) -> None:
    pool = ref()
    # Not in a forked child: threading's exit hooks run there too (multiprocessing calls
    # threading._shutdown as a worker ends), and the copy's loop thread does not exist there.
    if pool is not None and pool._owner == os.getpid():
        pool.close()


def _register_exit_hook(ref: weakref.ref[SessionPool]) -> None:
    # Closing stops browsers through the loop's default thread pool, and at interpreter exit
    # concurrent.futures refuses new work from its own exit hook on, which runs before atexit
    # functions. Hooks of threading's own exit run in reverse order of registration, and
    # concurrent.futures.thread (imported above) registered first: this one runs before it.
    try:
        threading._register_atexit(_close_at_exit, ref)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # another Python, or exit has begun: the plain hook
        atexit.register(_close_at_exit, ref)


def get_optimized_session_pool(**options: Any) -> SessionPool:
    """The process-wide default pool, created on first call (with ``options``); the same object after."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = SessionPool(**options)
        return _default
