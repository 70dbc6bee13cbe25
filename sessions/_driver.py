"""CDP connections to Chromium: the only module that imports pyppeteer.

    connect(endpoint) ── Connection (ours) + pyppeteer Browser ──▶ Browser on the calling loop
        every call ── a deadline (call_timeout) ──▶ fails with CallTimeoutError if unanswered
        a tab crashes ── Inspector/Target.targetCrashed ──▶ its pending calls fail, PageCrashedError
        calls pending, browser silent ── watchdog ping ──▶ every pending call fails, BrowserGoneError
        browser gone ── socket closes ──▶ every pending call fails (pyppeteer's NetworkError)
        on_send(context_id, method) ──▶ the pool: counts use, caps pages

pyppeteer itself never fails pending calls of a crashed tab, lets one late
reply to a cancelled call kill its receive loop, and raises listener errors
("Page crashed!") inside that loop: the subclasses here close those holes.
Nothing pyppeteer raises in a background task reaches stderr: it is logged
at debug level.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import websockets.exceptions
from pyee import EventEmitter
from pyppeteer.browser import Browser, BrowserContext
from pyppeteer.connection import CDPSession, Connection
from pyppeteer.errors import NetworkError, PyppeteerError
from websockets.legacy.client import connect as ws_connect

from ._errors import BrowserGoneError, CallTimeoutError, PageCrashedError, SessionError

__all__ = (
    "Browser", "BrowserContext", "OnSend", "bounded", "connect", "context_of", "pages_of", "probe_browser",
    "probe_pages",
)  # fmt: skip

OnSend = Callable[[str | None, str], None]  # (browser context id or None, CDP method); may raise
_NAVIGATING = re.compile(r"context was destroyed|Cannot find context|Target closed|Session closed")
_PING_AFTER = 2.0  # seconds a call may wait before the watchdog asks the browser if it lives
_FROZEN_AFTER = 5.0  # seconds of silence to a ping before every pending call is failed
_WATCH_TICK = 1.0
T = TypeVar("T")
log = logging.getLogger("sessions")


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any = None) -> None:
    """Complete a call's future unless it already is (cancelled, timed out): never raises."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Connection(Connection):  # type: ignore[misc]
    """pyppeteer's browser connection, with deadlines, a watchdog and a receive loop that never dies."""

    def __init__(
        self, url: str, loop: asyncio.AbstractEventLoop, call_timeout: float, on_send: OnSend | None
    ) -> None:
        # Connection.__init__ of pyppeteer 2.0.0, less the ``loop=`` argument websockets 10 deprecates.
        EventEmitter.__init__(self)
        self._url = url
        self._lastId = 0
        self._callbacks: dict[int, asyncio.Future[Any]] = {}
        self._delay = 0.0
        self._loop = loop
        self._sessions: dict[str, _Session] = {}
        self._connected = False
        self._ws = ws_connect(url, max_size=None, ping_interval=None, ping_timeout=None)
        self._recv_fut = loop.create_task(self._recv_loop())
        self._closeCallback = None
        self.call_timeout = call_timeout
        self.on_send = on_send
        self._watch = loop.create_task(self._watchdog())

    # -- sending -------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None) -> asyncio.Future[Any]:
        if self.on_send is not None and method != "Target.sendMessageToTarget":
            self.on_send((params or {}).get("browserContextId"), method)
        future: asyncio.Future[Any] = super().send(method, params)
        _arm(self._loop, future, self._callbacks, self._lastId, method, self.call_timeout)
        return future

    async def _async_send(self, msg: str, callback_id: int) -> None:
        while not self._connected:
            await asyncio.sleep(self._delay)
        try:
            await self.connection.send(msg)
        except websockets.exceptions.ConnectionClosed:
            log.debug("a CDP call found the connection closed")  # pyppeteer logs this as an error
            await self.dispose()

    # -- receiving -------------------------------------------------------------------

    async def _on_message(self, message: str) -> None:
        try:
            msg = json.loads(message)
            if "id" in msg:
                future = self._callbacks.pop(msg["id"], None)
                if future is not None:
                    error = msg.get("error")
                    _settle(future, _protocol_error(future, error) if error else None, msg.get("result"))
            else:
                self._on_event(msg.get("method", ""), msg.get("params", {}))
        except Exception:
            log.debug("a CDP message was dropped: %.200s", message, exc_info=True)

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        session = self._sessions.get(params.get("sessionId", ""))
        if method == "Target.receivedMessageFromTarget":
            if session is not None:
                session._on_message(params.get("message", "{}"))
        elif method == "Target.detachedFromTarget":
            if session is not None:
                session._on_closed()
                del self._sessions[params["sessionId"]]
        elif method == "Target.targetCrashed":
            for each in list(self._sessions.values()):
                if each.target_id == params.get("targetId"):
                    each.crash()
            self.emit(method, params)
        else:
            self.emit(method, params)

    async def _on_close(self) -> None:
        if self._closeCallback:
            callback, self._closeCallback = self._closeCallback, None
            with contextlib.suppress(Exception):
                callback()
        gone = [self._callbacks.pop(i) for i in list(self._callbacks)]
        for future in gone:
            _settle(future, NetworkError(f"Protocol error {getattr(future, 'method', '')}: Target closed."))
        for session in list(self._sessions.values()):
            session._on_closed()
        self._sessions.clear()
        self._watch.cancel()
        if hasattr(self, "connection"):
            with contextlib.suppress(Exception):
                await self.connection.close()
        if not self._recv_fut.done():
            self._recv_fut.cancel()

    async def createSession(self, targetInfo: dict[str, Any]) -> _Session:
        reply = await self.send("Target.attachToTarget", {"targetId": targetInfo["targetId"]})
        session = _Session(self, targetInfo["type"], reply.get("sessionId"), self._loop)
        session.target_id = targetInfo["targetId"]
        session.context_id = targetInfo.get("browserContextId")
        self._sessions[session._sessionId] = session
        return session

    # -- a frozen browser ------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Ping the browser while calls wait; fail them all when it stays silent."""
        while True:
            await asyncio.sleep(_WATCH_TICK)
            if not self._connected or not self._overdue():
                continue
            ping = Connection.send(self, "Browser.getVersion")
            try:
                await asyncio.wait_for(asyncio.shield(ping), _FROZEN_AFTER)
            except TimeoutError:
                ping.add_done_callback(_drop)
                self.fail_all(
                    BrowserGoneError(f"the browser answered nothing for {_FROZEN_AFTER:g} s (frozen?)")
                )
            except Exception:  # noqa: BLE001 - closed: _on_close fails the calls
                pass

    def _overdue(self) -> bool:
        now = time.monotonic()
        waiting = [*self._callbacks.values()]
        for session in self._sessions.values():
            waiting.extend(session._callbacks.values())
        return any(now - getattr(f, "sent_at", now) > _PING_AFTER for f in waiting)

    def fail_all(self, error: SessionError) -> None:
        """Fail every pending call of this connection and its pages with ``error``."""
        for callbacks in (self._callbacks, *(s._callbacks for s in self._sessions.values())):
            for call_id in list(callbacks):
                _settle(callbacks.pop(call_id), error)


class _Session(CDPSession):  # type: ignore[misc]
    """pyppeteer's per-target session, with deadlines and crash handling."""

    target_id = ""
    context_id: str | None = None
    crashed = False

    def send(self, method: str, params: dict[str, Any] | None = None) -> asyncio.Future[Any]:
        connection = self._connection
        if self.crashed:
            raise PageCrashedError(f"{method}: this page crashed (its renderer died); open a new page")
        if isinstance(connection, _Connection) and connection.on_send is not None:
            connection.on_send(self.context_id, method)
        future: asyncio.Future[Any] = super().send(method, params)
        timeout = connection.call_timeout if isinstance(connection, _Connection) else None
        _arm(self._loop, future, self._callbacks, self._lastId, method, timeout)
        return future

    def _on_message(self, msg: str) -> None:
        try:
            obj = json.loads(msg)
            if obj.get("id"):
                future = self._callbacks.pop(obj["id"], None)
                if future is not None:
                    error = obj.get("error")
                    _settle(future, _protocol_error(future, error) if error else None, obj.get("result"))
                return
            if obj.get("method") == "Inspector.targetCrashed":
                self.crash()
            self.emit(obj.get("method"), obj.get("params", {}))
        except Exception:
            log.debug("a page event was dropped: %.200s", msg, exc_info=True)

    def crash(self) -> None:
        """The tab's renderer died: fail what waits on it, and refuse what comes."""
        self.crashed = True
        for call_id in list(self._callbacks):
            future = self._callbacks.pop(call_id)
            _settle(future, PageCrashedError(f"{getattr(future, 'method', 'a call')}: the page crashed"))

    def _on_closed(self) -> None:
        for call_id in list(self._callbacks):
            future = self._callbacks.pop(call_id)
            _settle(future, NetworkError(f"Protocol error {getattr(future, 'method', '')}: Target closed."))
        self._connection = None


def _arm(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    callbacks: dict[int, asyncio.Future[Any]],
    call_id: int,
    method: str,
    timeout: float | None,
) -> None:
    """Give a pending call its deadline."""
    future.sent_at = time.monotonic()  # type: ignore[attr-defined]
    if timeout is None or future.done():
        return

    def expire() -> None:
        if callbacks.get(call_id) is future:
            del callbacks[call_id]
            _settle(future, CallTimeoutError(f"{method} got no answer within {timeout:g} s (call_timeout)"))

    handle = loop.call_later(timeout, expire)
    future.add_done_callback(lambda _: handle.cancel())


def _protocol_error(future: asyncio.Future[Any], error: dict[str, Any]) -> NetworkError:
    message = f"Protocol error ({getattr(future, 'method', '')}): {error.get('message', '')}"
    if "data" in error:
        message += f" {error['data']}"
    return NetworkError(message)


async def connect(endpoint: str, timeout: float, on_send: OnSend | None = None) -> Browser:
    """A pyppeteer Browser on the running loop for a Chromium already listening at ``endpoint``.

    Every CDP call made through it fails after ``timeout`` seconds without an answer.
    """
    loop = asyncio.get_running_loop()
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_quiet_background)
    connection = _Connection(endpoint, loop, timeout, on_send)
    try:
        reply = await bounded(connection.send("Target.getBrowserContexts"), timeout)
        contexts = (reply or {}).get("browserContextIds", [])
        create = Browser.create(
            connection, contexts, False, None, None, lambda: connection.send("Browser.close")
        )
        return await asyncio.wait_for(create, timeout)
    except BaseException:
        await connection.dispose()
        raise


def context_of(browser: Browser, context_id: str | None) -> Browser | BrowserContext | None:
    """The object for a browser context on this connection (the Browser itself for the default)."""
    if context_id is None:
        return browser
    return browser._contexts.get(context_id)


async def bounded(call: Awaitable[T], timeout: float) -> T:
    """Await a call for at most ``timeout``; a late reply is dropped, the connection lives on."""
    inner = asyncio.ensure_future(call)
    try:
        return await asyncio.wait_for(asyncio.shield(inner), timeout)
    finally:
        if not inner.done():
            inner.add_done_callback(_drop)


def _quiet_background(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # pyppeteer runs event handlers and some CDP calls as tasks nobody awaits; when a page or
    # a browser goes away they fail with nobody to hear it. That is not news.
    exception = context.get("exception")
    future = context.get("future") or context.get("task")
    code = getattr(getattr(future, "get_coro", lambda: None)(), "cr_code", None)
    ours = isinstance(
        exception, (PyppeteerError, SessionError, ConnectionError, websockets.exceptions.ConnectionClosed)
    )
    if ours or (code is not None and "pyppeteer" in code.co_filename):
        log.debug("dropped: %s: %r", context.get("message"), exception)
        return
    loop.default_exception_handler(context)


def _drop(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it: nobody waits for it any more


def pages_of(browser: Browser, context_id: str | None) -> list[Any]:
    """The page targets of one browser context (``None``: the default one) on this connection."""
    found = []
    for target in browser.targets():
        owner = target._targetInfo.get("browserContextId")
        mine = owner == context_id if context_id else owner not in browser._contexts
        if target.type == "page" and mine:
            found.append(target)
    return found


async def probe_browser(browser: Browser, timeout: float) -> str | None:
    """None if the browser answers a browser-level call in time, else what failed."""
    try:
        if not await bounded(browser._connection.send("Browser.getVersion"), timeout):
            return "no reply to Browser.getVersion (the connection is closed)"
    except TimeoutError:
        return f"no answer within {timeout:g} s (a frozen browser)"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the verdict
        return f"probe failed: {type(exc).__name__}: {exc}"
    return None


async def probe_pages(targets: list[Any], timeout: float) -> str | None:
    """None if every page evaluates ``1 + 1`` in time, else what failed.

    A browser-level call answers even while a page spins in JavaScript: only
    a page-level call sees a hung renderer.
    """
    for target in targets:
        try:
            page = await bounded(target.page(), timeout)
            if page is None:
                continue
            if page._client.crashed:  # its calls fail already; closing it frees the tab
                closing = target.browserContext.browser._connection.send(
                    "Target.closeTarget", {"targetId": target._targetId}
                )
                await bounded(closing, timeout)
                continue
            if await bounded(page.evaluate("1 + 1"), timeout) != 2:
                return f"page {page.url} gave a wrong answer to 1 + 1"
        except NetworkError as exc:
            if not _NAVIGATING.search(str(exc)):
                return f"probe failed: {exc}"  # else the page is between two documents: alive
        except TimeoutError:
            return f"a page gave no answer within {timeout:g} s (stuck in JavaScript?)"
        except Exception as exc:  # noqa: BLE001 - any failure of the probe is the verdict
            return f"probe failed: {type(exc).__name__}: {exc}"
    return None
