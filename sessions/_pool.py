"""SessionPool: the public face of the async core, for plain code and for asyncio code.

    sync caller ── get_session / sync_session / run / close_* ──▶ ┐
                                                                ├─ run_coroutine_threadsafe ─▶ Core (its loop)
    async caller ── get_session_async / session ──────────────▶ ┘   then a connection on its own loop

A pyppeteer object belongs to the loop it was made on. ``get_session``
returns the pool loop's (drive it with ``pool.run(awaitable)``);
``sync_session`` returns blocking proxies of it; ``get_session_async`` and
``session()`` return objects on the caller's loop, on a connection to the
same Chromium (a connect costs ~2 ms).

The pool belongs to the process that made it: a forked child gets an error,
not a copy of the parent's browsers. A pool dropped without ``close()``
closes at garbage collection or at exit, quietly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ._core import HOOKS, ISOLATIONS, Core, Session, Settings
from ._driver import Browser, BrowserContext, connect, context_of
from ._errors import CallTimeoutError, SessionPoolClosedError
from ._lifecycle import lock_root, register_exit_hook, shut_down
from ._process import find_chromium, temporary_root
from ._sync import Blocking, pyppeteer_timeout
from ._upkeep import maintain

__all__ = ("DevTools", "SessionPool", "get_optimized_session_pool")

T = TypeVar("T")
_default: SessionPool | None = None
_default_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class DevTools:
    """Where another CDP client (Playwright's ``connect_over_cdp``) reaches an account's session."""

    endpoint: str  # the browser's ws:// DevTools URL (127.0.0.1 only)
    context_id: str | None  # the account's browser context; None: the browser's default one


class SessionPool:
    """Headless Chromium sessions by account, isolated, kept logged in, healthy, measured.

    Args:
        max_sessions: sessions open at once; the least recently used one not in
            use is closed to make room (else ``get_session`` waits).
        session_idle_timeout: seconds a session may sit unused before it is closed.
        health_check_interval: seconds between health checks (a browser-level
            call, and a page-level evaluate per open page, each bounded).
        memory_threshold_mb: a browser whose tree passes this (USS) is warned
            about and recycled once its sessions are quiet; logins are kept.
        isolation: ``"browser"``, a Chromium per account, or ``"context"``, one
            shared Chromium with an incognito context per account (about a third
            of the memory). Either way no account sees another's cookies or storage.
        profile_root: where profiles and saved logins live; a private temporary
            folder by default, removed by ``close()``. One pool per root.
        executable_path: the Chromium to run (else $SESSIONS_CHROMIUM, else found).
        launch_timeout: seconds Chromium gets to start listening.
        call_timeout: seconds any browser call made through the pool may wait
            for its answer (above pyppeteer's own 30 s waits by default).
        memory_sample_interval: seconds between memory samples of every browser.
        state_save_interval: seconds between saves of each used session's
            cookies and local storage (also saved on close and recycle).
        acquire_timeout: seconds ``get_session`` waits for a free slot when every
            session is in use, before ``SessionPoolFullError``.
        max_pages: open pages allowed per session (None: no cap).
        retire_after_pages / retire_after_requests: a session that opened this
            many pages, or served this many requests, is replaced (logins kept)
            at its next request when free.

    Raises:
        BrowserNotFoundError: no Chromium (the message says how to install it).
        ProfileInUseError: another pool uses ``profile_root``.
        ValueError: a setting out of range.
    """

    def __init__(
        self,
        max_sessions: int = 3,
        session_idle_timeout: float = 600,
        health_check_interval: float = 60,
        memory_threshold_mb: float | None = 500.0,
        *,
        isolation: str = "browser",
        profile_root: str | Path | None = None,
        executable_path: str | Path | None = None,
        launch_timeout: float = 30.0,
        call_timeout: float = 60.0,
        memory_sample_interval: float = 30.0,
        state_save_interval: float = 5.0,
        acquire_timeout: float = 30.0,
        max_pages: int | None = None,
        retire_after_pages: int | None = None,
        retire_after_requests: int | None = None,
    ) -> None:
        _check_count("max_sessions", max_sessions)
        timing = dict(
            session_idle_timeout=session_idle_timeout, health_check_interval=health_check_interval,
            launch_timeout=launch_timeout, call_timeout=call_timeout,
            memory_sample_interval=memory_sample_interval, state_save_interval=state_save_interval,
        )  # fmt: skip
        for name, value in timing.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds above zero, not {value!r}")
        if (
            isinstance(acquire_timeout, bool)
            or not isinstance(acquire_timeout, (int, float))
            or acquire_timeout < 0
        ):
            raise ValueError(
                f"acquire_timeout must be a number of seconds, zero or more, not {acquire_timeout!r}"
            )
        if memory_threshold_mb is not None and not memory_threshold_mb > 0:
            raise ValueError(f"memory_threshold_mb must be above zero or None, not {memory_threshold_mb!r}")
        for name, count in (("max_pages", max_pages), ("retire_after_pages", retire_after_pages),
                            ("retire_after_requests", retire_after_requests)):  # fmt: skip
            if count is not None:
                _check_count(name, count)
        if isolation not in ISOLATIONS:
            raise ValueError(
                f"isolation must be one of {', '.join(map(repr, ISOLATIONS))}, not {isolation!r}"
            )
        executable = find_chromium(executable_path)
        temporary = profile_root is None
        root = temporary_root("sessions") if profile_root is None else Path(profile_root)
        root_lock = lock_root(root)
        settings = Settings(
            max_sessions, float(session_idle_timeout), float(health_check_interval), memory_threshold_mb,
            float(memory_sample_interval), executable, root, float(launch_timeout), float(call_timeout),
            isolation, float(state_save_interval), float(acquire_timeout), max_pages, retire_after_pages,
            retire_after_requests,
        )  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._core = Core(settings, self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="sessions-loop", daemon=True)
        self._thread.start()
        self._owner = os.getpid()  # a forked child (a pool worker) inherits this object, not its loop
        upkeep = asyncio.run_coroutine_threadsafe(maintain(self._core), self._loop)
        self._connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Browser]] = (
            weakref.WeakKeyDictionary()
        )
        self._connections_lock = threading.Lock()
        self._finalizer = weakref.finalize(
            self, shut_down, self._loop, self._thread, self._core, upkeep, self._owner,
            root if temporary else None, root_lock,
        )  # fmt: skip
        self._finalizer.atexit = False  # the exit hook below closes it, at the right moment
        register_exit_hook(self._finalizer)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._core.sessions)} sessions"
        return f"<SessionPool {state} max_sessions={self._core.settings.max_sessions}>"

    @property
    def _closed(self) -> bool:
        return not self._finalizer.alive

    # -- plain (synchronous) use ---------------------------------------------------

    def get_session(self, account: str) -> Browser | BrowserContext:
        """The account's browser, created or reused, as a pyppeteer object on the pool's loop.

        With isolation "context" it is the account's BrowserContext (``newPage``,
        ``pages`` and ``close`` as on a Browser). Drive it with ``pool.run(...)``,
        or use ``sync_session`` for blocking objects.
        """
        return self._call(self._core.get(_check_account(account))).handle

    @contextlib.contextmanager
    def sync_session(self, account: str) -> Iterator[Blocking]:
        """``with pool.sync_session(account) as browser``: blocking proxies, held in use meanwhile.

        Every method of the browser and of what it returns (pages, frames,
        element handles) blocks until done, bounded by ``call_timeout``.
        """
        session = self._call(self._core.get(_check_account(account), hold=True))
        try:
            yield Blocking(session.handle, self._blocking)
        finally:
            self._release(account)

    def run(self, awaitable: Awaitable[T] | Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Await a coroutine, a future, a WaitTask, on the pool's loop, and return its result.

        pyppeteer methods that start work as they are called (``waitForSelector``,
        ``waitForNavigation``) must be called on the pool's loop: pass a function,
        ``pool.run(lambda: page.waitForSelector("#x"))``. At ``timeout`` the
        operation is cancelled and ``TimeoutError`` raised.
        """
        if callable(awaitable) and not inspect.isawaitable(awaitable):
            return self._call(_called(awaitable), timeout)
        if not inspect.isawaitable(awaitable):
            raise TypeError(f"pool.run needs an awaitable or a function, not {type(awaitable).__name__}")
        if isinstance(awaitable, asyncio.Future) and awaitable.get_loop() is not self._loop:
            raise TypeError(
                "this future belongs to another event loop (asyncio.gather called outside the pool's "
                "loop makes one there): use pool.gather(*awaitables)"
            )
        return self._call(_awaited(awaitable), timeout)

    def gather(self, *awaitables: Awaitable[Any], timeout: float | None = None) -> list[Any]:
        """Await several coroutines together on the pool's loop; their results in order.

        At ``timeout`` every one still running is cancelled and ``TimeoutError`` raised.
        """
        for each in awaitables:
            if not inspect.isawaitable(each):
                raise TypeError(f"pool.gather needs awaitables, not {type(each).__name__}")
        return self._call(_gathered(awaitables), timeout)

    def _blocking(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        async def call() -> Any:
            value = fn(*args, **kwargs)
            return await value if inspect.isawaitable(value) else value

        bound = self._core.settings.call_timeout + pyppeteer_timeout(args, kwargs)
        try:
            return self._call(call(), bound)
        except TimeoutError as exc:
            if isinstance(exc, CallTimeoutError):
                raise
            raise CallTimeoutError(
                f"{getattr(fn, '__qualname__', fn)} did not finish within {bound:g} s"
            ) from None

    def devtools_endpoint(self, account: str) -> DevTools:
        """The account's session (opened if needed) as a DevTools URL and context, for another client."""
        session = self._call(self._core.get(_check_account(account)))
        return DevTools(session.host.process.endpoint, session.context_id)

    def close_session(self, account: str) -> bool:
        """Close one account's session (its login is saved first). False if it had none."""
        return self._call(self._core.close(_check_account(account)))

    def close_all(self) -> None:
        """Close every session; the pool stays usable."""
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
        self._check_process()
        self._loop.call_soon_threadsafe(self._core.hooks[event].append, fn)

    def close(self) -> None:
        """Close every browser (logins saved) and stop the pool. Idempotent."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("SessionPool.close() from its own loop (a hook?) would deadlock")
        self._finalizer()

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- asyncio use -----------------------------------------------------------------

    async def get_session_async(self, account: str) -> Browser | BrowserContext:
        """The account's browser (or context) as a pyppeteer object on the calling loop."""
        session = await self._await(self._core.get(_check_account(account)))
        return await self._connection(session)

    @contextlib.asynccontextmanager
    async def session(self, account: str) -> AsyncIterator[Browser | BrowserContext]:
        """``async with pool.session(account) as browser``: held in use, so never closed meanwhile."""
        session = await self._await(self._core.get(_check_account(account), hold=True))
        try:
            yield await self._connection(session)
        finally:
            self._release(account)

    async def __aenter__(self) -> SessionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    async def _connection(self, session: Session) -> Browser | BrowserContext:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return session.handle
        endpoint = session.host.process.endpoint
        with self._connections_lock:
            mine = self._connections.setdefault(loop, {})
        browser = mine.get(endpoint)
        if browser is None or not browser._connection._connected:
            account = None if session.context_id else session.account
            on_send = functools.partial(self._core._on_send, account)
            browser = mine[endpoint] = await connect(endpoint, self._core.settings.call_timeout, on_send)
        if session.context_id is not None and session.context_id not in browser._contexts:
            context = browser._contexts[session.context_id] = BrowserContext(browser, session.context_id)
            for target in browser._targets.values():  # seen before it was known here
                if target._targetInfo.get("browserContextId") == session.context_id:
                    target._browserContext = context
        found = context_of(browser, session.context_id)
        assert found is not None
        return found

    # -- plumbing ----------------------------------------------------------------------

    def _release(self, account: str) -> None:
        if not self._closed:
            self._loop.call_soon_threadsafe(self._core.release, account)

    def _check_process(self) -> None:
        if os.getpid() != self._owner:
            raise SessionPoolClosedError(
                f"this SessionPool belongs to process {self._owner}; its browsers are not this process's "
                f"(a fork copies the object, not its loop thread): make a SessionPool in this process"
            )
        if self._closed:
            raise SessionPoolClosedError("the session pool is closed")

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        try:
            self._check_process()
        except BaseException:
            coro.close()
            raise
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking SessionPool call from its own loop (a hook?) would deadlock")
        future = self._submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the operation stops on the loop: nothing runs on unseen
            raise

    async def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(self._submit(coro))


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _called(fn: Callable[[], Awaitable[T]]) -> T:
    value = fn()
    if not inspect.isawaitable(value):
        raise TypeError(f"the function given to pool.run returned {type(value).__name__}, not an awaitable")
    return await value


async def _gathered(awaitables: tuple[Awaitable[Any], ...]) -> list[Any]:
    return list(await asyncio.gather(*awaitables))


async def _value(fn: Callable[[], T]) -> T:
    return fn()


def _check_account(account: object) -> str:
    if not isinstance(account, str) or not account:
        raise ValueError(f"an account must be a non-empty str, not {account!r}")
    return account


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int of at least 1, not {value!r}")


def get_optimized_session_pool(**options: Any) -> SessionPool:
    """The process-wide default pool, created on first call (with ``options``); the same object after.

    A forked child gets a pool of its own (the parent's browsers are not its to drive).
    """
    global _default
    with _default_lock:
        if _default is None or _default._closed or _default._owner != os.getpid():
            _default = SessionPool(**options)
        return _default
