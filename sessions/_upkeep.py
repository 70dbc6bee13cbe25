"""The pool's upkeep, on its loop: idle timeouts, state saves, memory samples, health checks.

    maintain(core) ── every tick ──▶ expire_idle ── close sessions unused past session_idle_timeout
                                  ▶ save_states ── each used session's login to disk
                                  ▶ sample_memory ── USS/PSS of every browser; recycle quiet ones
                                  ▶ check_health ── a browser-level call, then every page's evaluate

Each round's verdicts come from _policy; the core does the closing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import _policy as policy
from ._core import Core
from ._driver import pages_of, probe_browser, probe_pages
from ._errors import SessionError

__all__ = ("check_health", "maintain", "sample_memory", "save_states")

log = logging.getLogger("sessions")
_QUIET = 10.0  # seconds without use before a session over the memory threshold is recycled


async def maintain(core: Core) -> None:
    """Idle timeouts, health checks, memory samples and state saves, for as long as the pool lives."""
    s = core.settings
    tick = min(1.0, s.health_check_interval / 4, s.session_idle_timeout / 4, s.memory_sample_interval,
               s.state_save_interval)  # fmt: skip
    next_check = time.monotonic() + s.health_check_interval
    next_sample = next_save = time.monotonic()
    while True:
        await asyncio.sleep(tick)
        now = time.monotonic()
        try:
            await expire_idle(core, now)
            if now >= next_save:
                next_save = now + s.state_save_interval
                await save_states(core)
            if now >= next_sample:
                next_sample = now + s.memory_sample_interval
                await sample_memory(core)
            if now >= next_check:
                next_check = now + s.health_check_interval
                await check_health(core)
        except Exception:  # upkeep must go on
            log.exception("session upkeep failed; trying again next round")


async def expire_idle(core: Core, now: float) -> None:
    usages = {a: s.usage() for a, s in core.sessions.items()}
    for account in policy.idle_expired(usages, now, core.settings.session_idle_timeout):
        log.info("session %r idle for over %g s; closing it", account, core.settings.session_idle_timeout)
        await core.close(account)


async def save_states(core: Core) -> None:
    """Save the login state of every session used since its last save."""
    for session in list(core.sessions.values()):
        if session.last_used > session.saved_at and session.healthy and not session.closing:
            await core.save(session)


async def check_health(core: Core) -> None:
    """Probe every browser, then the pages of every session; close what fails."""
    timeout = min(core.settings.call_timeout, 10.0)
    for host in core.hosts():
        if host.closing:
            continue
        reason = await probe_browser(host.upkeep, timeout)
        if reason is None and not host.process.alive():
            reason = f"Chromium (pid {host.process.pid}) has exited"
        if reason is not None:
            await core.lose_host(
                host, SessionError(f"health check of browser {host.process.pid} failed: {reason}")
            )
            continue
        for account in list(host.accounts):
            session = core.sessions.get(account)
            if session is None or session.closing:
                continue
            reason = await probe_pages(pages_of(host.upkeep, session.context_id), timeout)
            if reason is None:
                core.failures[account] = 0
            else:
                await core.fail(
                    session, SessionError(f"health check of session {account!r} failed: {reason}")
                )


async def sample_memory(core: Core) -> None:
    """Measure each browser tree (off the loop) and recycle quiet ones past the threshold."""
    threshold = core.settings.memory_threshold_mb
    for host in core.hosts():
        host.memory = memory = await core.loop.run_in_executor(None, host.measure)
        over = threshold is not None and memory.uss_mb > threshold
        if over and host.process.pid not in core._over:
            log.warning(
                "browser %d (sessions %s) uses %.0f MB (USS of its tree), over memory_threshold_mb=%g",
                host.process.pid, ", ".join(sorted(host.accounts)) or "none", memory.uss_mb, threshold,
            )  # fmt: skip
        (core._over.add if over else core._over.discard)(host.process.pid)
        users = [core.sessions[a] for a in host.accounts if a in core.sessions]
        now = time.monotonic()
        if users and all(policy.needs_recycle(s.usage(), threshold, now, _QUIET) for s in users):
            log.info("recycling browser %d for its memory; logins are kept", host.process.pid)
            for session in users:
                await core.close(session.account, session)
            if core._shared is host:
                await host.close()
                core._shared = None
