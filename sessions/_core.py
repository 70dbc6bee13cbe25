"""The async core of the session pool; every method runs on the pool's own event loop.

    SessionPool (any thread or loop) ── run_coroutine_threadsafe ──▶ Core (pool loop)
        Core ── Host.launch / close ──▶ Chromium: one per account ("browser"), or one shared by
                                        every account, each in its own incognito context ("context")
        Core ── _state.save / restore ──▶ each account's cookies and local storage on disk
        Core ── maintain(): idle timeout, health probes, memory samples, recycling, state saves
        Core ── hooks: session_created(account, browser), session_closed(account),
                       session_error(account, error)
        connections ── on_send (any CDP call by a user, any thread) ──▶ last_used, page cap

The pool loop is the one writer of session state (foreign loops' calls are
posted to it). A session held in use (``session()``, ``sync_session()``) is
never evicted, idle-closed, retired or recycled; a session used within the
last ``_QUIET`` seconds is not recycled either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import _policy as policy
from . import _state as state
from ._driver import Browser, BrowserContext, bounded
from ._errors import SessionError, SessionPoolFullError
from ._hosts import Host

__all__ = ("HOOKS", "ISOLATIONS", "Core", "Session", "Settings")

log = logging.getLogger("sessions")

HOOKS = ("session_created", "session_closed", "session_error")
ISOLATIONS = ("browser", "context")
_TOUCH_EVERY = 0.1  # seconds: calls from other loops post their use to the pool loop at most this often
_SAVE_TIMEOUT = 3.0  # seconds a state save may take (a page stuck in JavaScript is skipped)


@dataclass(frozen=True, slots=True)
class Settings:
    max_sessions: int
    session_idle_timeout: float
    health_check_interval: float
    memory_threshold_mb: float | None
    memory_sample_interval: float
    executable: str
    profile_root: Path
    launch_timeout: float
    call_timeout: float
    isolation: str = "browser"
    state_save_interval: float = 5.0
    acquire_timeout: float = 30.0
    max_pages: int | None = None
    retire_after_pages: int | None = None
    retire_after_requests: int | None = None


@dataclass(eq=False)
class Session:
    """One account's browser (or incognito context), as the pool loop sees it."""

    account: str
    host: Host
    context_id: str | None  # None: the host's default context, the whole browser is the account's
    handle: Browser | BrowserContext  # what users get, on the host's user connection
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    saved_at: float = 0.0  # monotonic time of the last state save
    requests: int = 0
    errors: int = 0
    in_use: int = 0  # open session() / sync_session() blocks
    healthy: bool = True
    closing: bool = False
    pages_open: int = 0
    pages_opened: int = 0  # pages users opened in this session's life (retire_after_pages)
    origins: set[str] = field(default_factory=set)  # http origins its pages visited: storage to save

    def usage(self) -> policy.Usage:
        mb = self.host.memory.uss_mb if self.host.memory else None
        return policy.Usage(self.last_used, self.in_use, self.healthy, mb)


class Core:
    """Sessions by account; see the module docstring."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.sessions: dict[str, Session] = {}
        self.hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in HOOKS}
        self.failures: dict[str, int] = {}  # consecutive failed checks or launches, per account
        self.total_requests = 0
        self.total_errors = 0
        self._shared: Host | None = None  # isolation "context": the one browser
        self._shared_lock: asyncio.Lock | None = None
        self._by_context: dict[str, str] = {}  # context id -> account
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._freed: asyncio.Event | None = None
        self._over: set[int] = set()  # hosts (pids) past the memory threshold, warned once

    # -- using sessions --------------------------------------------------------

    async def get(self, account: str, hold: bool = False) -> Session:
        """The account's live session, opened if needed (making room, or waiting for it)."""
        self.total_requests += 1
        async with self._locks.setdefault(account, asyncio.Lock()):
            await self._closed_fully(account)  # its profile and state are free again
            session = self.sessions.get(account)
            if session is not None and not (session.healthy and session.host.alive()):
                await self.close(account)
                session = None
            if session is not None and not session.in_use and self._retire_due(session):
                log.info("retiring session %r after %d requests, %d pages", account, session.requests,
                         session.pages_opened)  # fmt: skip
                await self.close(account)
                session = None
            if session is None:
                session = await self._open(account)
            session.requests += 1
            session.last_used = time.monotonic()
            session.in_use += hold
            return session

    def release(self, account: str) -> None:
        session = self.sessions.get(account)
        if session is not None and session.in_use:
            session.in_use -= 1
            session.last_used = time.monotonic()
            self._room().set()

    def _retire_due(self, session: Session) -> bool:
        s = self.settings
        by_requests = s.retire_after_requests is not None and session.requests >= s.retire_after_requests
        return by_requests or (
            s.retire_after_pages is not None and session.pages_opened >= s.retire_after_pages
        )

    async def _open(self, account: str) -> Session:
        await self._make_room(account)
        s = self.settings
        try:
            if s.isolation == "browser":
                host = await Host.launch(
                    s.executable, s.profile_root / state.profile_name(account), s.launch_timeout,
                    s.call_timeout, functools.partial(self._on_send, account),
                )  # fmt: skip
                self._watch(host)
                context_id, handle, upkeep_handle = None, host.browser, host.upkeep
            else:
                host = await self._shared_host()
                reply = await bounded(
                    host.upkeep._connection.send("Target.createBrowserContext"), s.call_timeout
                )
                context_id = reply["browserContextId"]
                handle = host.browser._contexts[context_id] = BrowserContext(host.browser, context_id)
                upkeep_handle = host.upkeep._contexts[context_id] = BrowserContext(host.upkeep, context_id)
                self._by_context[context_id] = account
        except Exception as exc:
            self._count_failure(account)
            await self._fire("session_error", account, exc)
            raise
        session = Session(account, host, context_id, handle)
        session.saved_at = math.inf  # no periodic save while the login comes back: it would save an empty jar
        self.sessions[account] = session
        host.accounts.add(account)
        try:
            await state.restore(
                host.upkeep, upkeep_handle, state.state_path(s.profile_root, account), s.call_timeout
            )
        except Exception as exc:  # noqa: BLE001 - a session without its old login still works
            log.warning("session %r: its saved login could not be restored: %s", account, exc)
        session.saved_at = time.monotonic()  # what is on disk is what it holds
        log.info("session %r: Chromium pid %d, %s", account, host.process.pid, context_id or "own browser")
        await self._fire("session_created", account, handle)
        return session

    async def _make_room(self, account: str) -> None:
        deadline = time.monotonic() + self.settings.acquire_timeout
        while len(self.sessions) >= self.settings.max_sessions:
            victim = policy.lru_victim({a: s.usage() for a, s in self.sessions.items()})
            if victim is not None:
                log.info("closing the least recently used session %r to open %r", victim, account)
                await self.close(victim)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionPoolFullError(
                    f"all {self.settings.max_sessions} sessions stayed in use for "
                    f"{self.settings.acquire_timeout:g} s (acquire_timeout); cannot open one for {account!r}"
                )
            self._room().clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room().wait(), left)

    def _room(self) -> asyncio.Event:
        if self._freed is None:
            self._freed = asyncio.Event()
        return self._freed

    async def _shared_host(self) -> Host:
        if self._shared_lock is None:
            self._shared_lock = asyncio.Lock()
        async with self._shared_lock:
            if self._shared is None or not self._shared.alive():
                if self._shared is not None:
                    await self.lose_host(self._shared, SessionError("the shared browser went away"))
                s = self.settings
                host = await Host.launch(s.executable, s.profile_root / "shared", s.launch_timeout,
                                         s.call_timeout, functools.partial(self._on_send, None))  # fmt: skip
                self._watch(host)
                self._shared = host
            return self._shared

    # -- what users do, seen from their connections -----------------------------------

    def _on_send(self, account: str | None, context_id: str | None, method: str) -> None:
        """Every CDP call a user makes (on any thread): use, and the page cap. Raises to refuse."""
        if account is None:
            account = self._by_context.get(context_id or "")
        session = self.sessions.get(account) if account else None
        if session is None:
            return
        if method == "Target.createTarget":
            cap = self.settings.max_pages
            if cap is not None and session.pages_open >= cap:
                raise SessionError(
                    f"session {account!r} has {session.pages_open} pages open (max_pages={cap})"
                )
        if threading.get_ident() == self.loop._thread_id:  # type: ignore[attr-defined]
            self._used(session, method)
        elif method == "Target.createTarget" or time.monotonic() - session.last_used > _TOUCH_EVERY:
            self.loop.call_soon_threadsafe(self._used, session, method)  # not once per call: a wake-up each

    def _used(self, session: Session, method: str) -> None:
        session.last_used = time.monotonic()
        session.pages_opened += method == "Target.createTarget"

    def _watch(self, host: Host) -> None:
        host.browser.on("disconnected", lambda: self._host_lost(host))
        host.browser.on("targetcreated", lambda target: self._count_page(host, target, 1))
        host.browser.on("targetdestroyed", lambda target: self._count_page(host, target, -1))
        host.browser.on("targetchanged", lambda target: self._count_page(host, target, 0))

    def _count_page(self, host: Host, target: Any, delta: int) -> None:
        if target.type != "page":
            return
        session = self._session_of(host, target._targetInfo.get("browserContextId"))
        if session is not None:
            session.pages_open = max(0, session.pages_open + delta)
            origin = state.origin_of(target.url)
            if origin is not None:
                session.origins.add(origin)

    def _session_of(self, host: Host, context_id: str | None) -> Session | None:
        if self.settings.isolation == "context":
            account = self._by_context.get(context_id or "")
        else:
            account = next(iter(host.accounts), None)
        session = self.sessions.get(account) if account else None
        return session if session is not None and session.host is host else None

    # -- failures ------------------------------------------------------------------

    def _host_lost(self, host: Host) -> None:
        if host.closing:
            return  # we closed it ourselves
        host.healthy = False
        error = SessionError(f"the browser (pid {host.process.pid}) went away")
        self._spawn(self.lose_host(host, error))

    async def lose_host(self, host: Host, error: BaseException) -> None:
        """A browser that failed: every session on it fails (recreated on next use), then it is closed."""
        host.healthy = False
        for account in list(host.accounts):
            session = self.sessions.get(account)
            if session is not None and session.host is host:
                await self.fail(session, error)
        await host.close()  # a launch meanwhile waits for this in _shared_host: the profile is locked
        if self._shared is host:
            self._shared = None

    async def fail(self, session: Session, error: BaseException) -> None:
        """A session that failed: count it, tell the hooks, close it (recreated on next use)."""
        if session.closing:
            return
        log.info(
            "session %r: %s; closing it (recreated on next use; hook session_error)", session.account, error
        )
        session.healthy = False
        session.errors += 1
        self._count_failure(session.account)
        await self._fire("session_error", session.account, error)
        await self.close(session.account, session)

    def _count_failure(self, account: str) -> None:
        self.total_errors += 1
        self.failures[account] = self.failures.get(account, 0) + 1

    # -- closing -------------------------------------------------------------------

    async def close(self, account: str, session: Session | None = None) -> bool:
        """Close one session (only ``session``, if given): its state is saved, then its browser
        (its whole process tree) or its context goes.

        The closing runs to the end even if the caller is cancelled (the pool
        shutting down), so no browser is left running unseen.
        """
        current = self.sessions.get(account)
        if current is None or (session is not None and current is not session):
            return False
        del self.sessions[account]
        current.closing = True
        task = self.loop.create_task(self._finish_close(current))
        self._closing[account] = task
        task.add_done_callback(
            lambda t: self._closing.pop(account, None) if self._closing.get(account) is t else None
        )
        self._room().set()
        await asyncio.shield(task)
        return True

    async def _closed_fully(self, account: str) -> None:
        task = self._closing.get(account)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def _finish_close(self, session: Session) -> None:
        host = session.host
        if session.healthy and host.alive():
            await self.save(session, final=True)
        host.accounts.discard(session.account)
        if session.context_id is None:
            host.healthy = host.healthy and session.healthy  # its own browser failed with it: no grace
            await host.close()
        else:
            self._by_context.pop(session.context_id, None)
            if host.alive():
                with contextlib.suppress(Exception):
                    call = host.upkeep._connection.send("Target.disposeBrowserContext",
                                                        {"browserContextId": session.context_id})  # fmt: skip
                    await bounded(call, self.settings.call_timeout)
            host.browser._contexts.pop(session.context_id, None)
            host.upkeep._contexts.pop(session.context_id, None)
        await self._fire("session_closed", session.account)

    async def close_all(self) -> None:
        """Close every session and browser, and wait for closings already under way."""
        for account in list(self.sessions):
            await self.close(account)
        if self._closing:
            await asyncio.gather(*self._closing.values(), return_exceptions=True)
        if self._shared is not None:
            host, self._shared = self._shared, None
            await host.close()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- state and browsers ----------------------------------------------------------

    async def save(self, session: Session, final: bool = False) -> None:
        path = state.state_path(self.settings.profile_root, session.account)
        started = time.monotonic()
        visited = session.origins if final and session.context_id is not None else ()
        try:
            await state.save(session.host.upkeep, session.context_id, path, _SAVE_TIMEOUT, visited)
            session.saved_at = started
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.debug("session %r: state not saved: %r", session.account, exc)

    def hosts(self) -> list[Host]:
        found = {id(s.host): s.host for s in self.sessions.values()}
        if self._shared is not None:
            found[id(self._shared)] = self._shared
        return list(found.values())

    # -- hooks and stats -----------------------------------------------------------

    async def _fire(self, event: str, *args: Any) -> None:
        for hook in self.hooks[event]:
            try:
                result = hook(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a hook's failure changes nothing else
                log.exception("sessions hook %s %r raised", event, hook)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "active_sessions": len(self.sessions),
            "max_sessions": self.settings.max_sessions,
            "total_requests": self.total_requests,
            "total_errors": self.total_errors,
            "isolation": self.settings.isolation,
            "browsers": len(self.hosts()),
            "sessions": {a: self._session_stats(s, now) for a, s in self.sessions.items()},
        }

    def _session_stats(self, s: Session, now: float) -> dict[str, Any]:
        idle = now - s.last_used
        memory = s.host.memory
        return {
            "created_at": datetime.fromtimestamp(s.created_at).isoformat(timespec="seconds"),
            "last_used": datetime.fromtimestamp(time.time() - idle).isoformat(timespec="seconds"),
            "idle_seconds": idle,
            "requests": s.requests,
            "errors": s.errors,
            "memory_mb": memory.uss_mb if memory else None,  # the whole browser tree it runs in
            "pss_mb": memory.pss_mb if memory else None,
            "processes": memory.processes if memory else None,
            "shared_by": len(s.host.accounts),  # sessions in that browser (isolation "context")
            "healthy": s.healthy and s.host.alive(),
            "consecutive_failures": self.failures.get(s.account, 0),
            "in_use": s.in_use,
            "pages_open": s.pages_open,
            "pages_opened": s.pages_opened,
            "pid": s.host.process.pid,
        }
