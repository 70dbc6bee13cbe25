"""The async core of the session pool; every method runs on the pool's own event loop.

    SessionPool (any thread or loop) ── run_coroutine_threadsafe ──▶ Core (pool loop)
        Core ── BrowserProcess.start / kill ──▶ one Chromium per account, on its own profile
        Core ── maintain(): idle timeout, health probes, memory samples, recycling
        Core ── hooks: session_created(account, browser), session_closed(account),
                       session_error(account, error)

The pool loop is the one writer of session state. A session marked in use
(by ``SessionPool.session()``) is never evicted or recycled by policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import inspect
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import _policy as policy
from ._driver import Browser, BrowserProcess, bounded, connect, probe
from ._errors import ProfileInUseError, SessionError, SessionPoolFullError
from ._memory import TreeMemory, measure

__all__ = ("HOOKS", "Core", "Session", "Settings")

log = logging.getLogger("sessions")

HOOKS = ("session_created", "session_closed", "session_error")
_CLOSE_GRACE = 5.0  # seconds a healthy browser gets to save its profile and exit before SIGKILL


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


@dataclass(slots=True, eq=False)
class Session:
    """One account's browser, as the pool loop sees it."""

    account: str
    process: BrowserProcess
    browser: Browser  # the pool loop's own connection
    lock_fd: int  # holds the profile's lock while the browser runs
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0
    errors: int = 0
    in_use: int = 0
    healthy: bool = True
    closing: bool = False
    memory: TreeMemory | None = None
    over_threshold: bool = False

    def usage(self) -> policy.Usage:
        mb = self.memory.uss_mb if self.memory else None
        return policy.Usage(self.last_used, self.in_use, self.healthy, mb)


class Core:
    """Sessions by account; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self.hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in HOOKS}
        self.failures: dict[str, int] = {}  # consecutive failed checks or launches, per account
        self.total_requests = 0
        self.total_errors = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # -- using sessions --------------------------------------------------------

    async def get(self, account: str, hold: bool = False) -> Session:
        """The account's live session, launched if needed (evicting the LRU one when full)."""
        self.total_requests += 1
        async with self._locks.setdefault(account, asyncio.Lock()):
            session = self.sessions.get(account)
            if session is not None and not (session.healthy and session.process.alive()):
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

    async def _open(self, account: str) -> Session:
        if len(self.sessions) >= self.settings.max_sessions:
            victim = policy.lru_victim({a: s.usage() for a, s in self.sessions.items()})
            if victim is None:
                raise SessionPoolFullError(
                    f"all {self.settings.max_sessions} sessions are in use; cannot open one for {account!r}"
                )
            log.info("closing the least recently used session %r to open %r", victim, account)
            await self.close(victim)
        profile = self.settings.profile_root / profile_name(account)
        lock_fd = lock_profile(profile)
        process = BrowserProcess.start(self.settings.executable, profile)
        try:
            await process.wait_ready(self.settings.launch_timeout)
            browser = await connect(process.endpoint, self.settings.call_timeout)
        except BaseException as exc:
            process.kill()
            os.close(lock_fd)
            self._count_failure(account)
            await self._fire("session_error", account, exc)
            raise
        session = Session(account, process, browser, lock_fd)
        browser.on("disconnected", lambda: self._on_disconnected(session))
        self.sessions[account] = session
        # Measured at once, so get_stats() has a real figure before the first sampling round.
        session.memory = await asyncio.get_running_loop().run_in_executor(None, _measure, process)
        log.info("session %r: Chromium pid %d on %s", account, process.pid, profile)
        await self._fire("session_created", account, browser)
        return session

    def _on_disconnected(self, session: Session) -> None:
        if session.closing or self.sessions.get(session.account) is not session:
            return  # we closed it ourselves
        session.healthy = False
        error = SessionError(
            f"the browser of session {session.account!r} (pid {session.process.pid}) went away"
        )
        asyncio.get_running_loop().create_task(self._fail(session, error))

    async def _fail(self, session: Session, error: BaseException) -> None:
        """A session that failed: count it, tell the hooks, close it (recreated on next use)."""
        if session.closing:
            return
        log.warning("session %r: %s; closing it (it is recreated on next use)", session.account, error)
        session.healthy = False
        session.errors += 1
        self._count_failure(session.account)
        await self._fire("session_error", session.account, error)
        await self.close(session.account)

    def _count_failure(self, account: str) -> None:
        self.total_errors += 1
        self.failures[account] = self.failures.get(account, 0) + 1

    async def close(self, account: str) -> bool:
        """Close one session: its whole process tree is killed and reaped.

        The closing runs to the end even if the caller is cancelled (the pool
        shutting down), so no browser is left running unseen.
        """
        session = self.sessions.pop(account, None)
        if session is None:
            return False
        session.closing = True
        task = asyncio.get_running_loop().create_task(self._finish_close(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        await asyncio.shield(task)
        return True

    async def _finish_close(self, session: Session) -> None:
        grace = 0.0
        if session.healthy and session.process.alive():
            # Browser.close lets Chromium write its cookies and state to the profile first.
            with contextlib.suppress(Exception):
                await bounded(session.browser.close(), _CLOSE_GRACE)
                grace = _CLOSE_GRACE
        with contextlib.suppress(Exception):
            await bounded(session.browser.disconnect(), _CLOSE_GRACE)
        await asyncio.get_running_loop().run_in_executor(None, session.process.stop, grace)
        os.close(session.lock_fd)
        await self._fire("session_closed", session.account)

    async def close_all(self) -> None:
        """Close every session, and wait for closings already under way."""
        for account in list(self.sessions):
            await self.close(account)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- upkeep ------------------------------------------------------------------

    async def maintain(self) -> None:
        """Idle timeouts, health checks and memory samples, for as long as the pool lives."""
        s = self.settings
        tick = min(1.0, s.health_check_interval / 4, s.session_idle_timeout / 4, s.memory_sample_interval)
        next_check = time.monotonic() + s.health_check_interval
        next_sample = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            try:
                await self._expire_idle(now)
                if now >= next_sample:
                    next_sample = now + s.memory_sample_interval
                    await self.sample_memory()
                if now >= next_check:
                    next_check = now + s.health_check_interval
                    await self.check_health()
            except Exception:  # upkeep must go on
                log.exception("session upkeep failed; trying again next round")

    async def _expire_idle(self, now: float) -> None:
        usages = {a: s.usage() for a, s in self.sessions.items()}
        for account in policy.idle_expired(usages, now, self.settings.session_idle_timeout):
            log.info("session %r idle for over %g s; closing it", account, self.settings.session_idle_timeout)
            await self.close(account)

    async def check_health(self) -> None:
        """Probe every session; close the ones that fail."""
        for session in list(self.sessions.values()):
            if session.closing:
                continue
            reason = await probe(session.browser, self.settings.call_timeout)
            if reason is None and not session.process.alive():
                reason = f"Chromium (pid {session.process.pid}) has exited"
            if reason is None:
                self.failures[session.account] = 0
                continue
            await self._fail(
                session, SessionError(f"health check of session {session.account!r} failed: {reason}")
            )

    async def sample_memory(self) -> None:
        """Measure each browser tree (off the loop) and recycle idle ones past the threshold."""
        loop = asyncio.get_running_loop()
        threshold = self.settings.memory_threshold_mb
        for session in list(self.sessions.values()):
            memory = await loop.run_in_executor(None, _measure, session.process)
            session.memory = memory
            over = threshold is not None and memory.uss_mb > threshold
            if over and not session.over_threshold:
                log.warning(
                    "session %r uses %.0f MB (USS of its browser tree), over memory_threshold_mb=%g",
                    session.account, memory.uss_mb, threshold,
                )  # fmt: skip
            session.over_threshold = over
            if policy.needs_recycle(session.usage(), threshold) and not session.closing:
                log.info("recycling session %r for its memory; its profile is kept", session.account)
                await self.close(session.account)

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
            "sessions": {a: self._session_stats(s, now) for a, s in self.sessions.items()},
        }

    def _session_stats(self, s: Session, now: float) -> dict[str, Any]:
        idle = now - s.last_used
        return {
            "created_at": datetime.fromtimestamp(s.created_at).isoformat(timespec="seconds"),
            "last_used": datetime.fromtimestamp(time.time() - idle).isoformat(timespec="seconds"),
            "idle_seconds": idle,
            "requests": s.requests,
            "errors": s.errors,
            "memory_mb": s.memory.uss_mb if s.memory else None,
            "pss_mb": s.memory.pss_mb if s.memory else None,
            "processes": s.memory.processes if s.memory else None,
            "healthy": s.healthy and s.process.alive(),
            "consecutive_failures": self.failures.get(s.account, 0),
            "in_use": s.in_use,
            "pid": s.process.pid,
        }


def _measure(process: BrowserProcess) -> TreeMemory:
    return measure(process.tree())


def profile_name(account: str) -> str:
    """A directory name for an account: readable, safe, and distinct for distinct accounts."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", account)[:40].lstrip(".") or "account"
    return f"{safe}-{hashlib.sha256(account.encode()).hexdigest()[:8]}"


def lock_profile(profile: Path) -> int:
    """Lock a profile directory for one browser; the lock ends with the fd (or the process)."""
    profile.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(profile / ".sessions.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ProfileInUseError(
            f"profile {profile} is in use by another browser (another SessionPool or process); "
            f"two browsers on one profile would corrupt it"
        ) from None
    return fd
