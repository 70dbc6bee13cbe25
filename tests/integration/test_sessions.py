"""SessionPool against real headless Chromium and pages served on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until

import sessions._upkeep
from sessions import (
    BrowserLaunchError,
    BrowserNotFoundError,
    ProfileInUseError,
    SessionPool,
    SessionPoolClosedError,
    SessionPoolFullError,
    get_optimized_session_pool,
)
from sessions._state import profile_name
from stress.pages import PageServer

pytestmark = pytest.mark.browser


class Events:
    """Records hook calls."""

    def __init__(self, pool: SessionPool) -> None:
        self.seen: list[tuple[str, str]] = []
        pool.register_hook("session_created", lambda account, browser: self.seen.append(("created", account)))
        pool.register_hook("session_closed", lambda account: self.seen.append(("closed", account)))
        pool.register_hook("session_error", lambda account, error: self.seen.append(("error", account)))


def visit(pool: SessionPool, account: str, url: str, script: str = "document.title") -> Any:
    browser = pool.get_session(account)

    async def go() -> Any:
        page = await browser.newPage()
        try:
            await page.goto(url)
            return await page.evaluate(script)
        finally:
            await page.close()

    return pool.run(go(), timeout=30)


def test_a_session_is_reused_while_healthy(make_pool: Callable[..., SessionPool], site: PageServer) -> None:
    pool = make_pool()
    events = Events(pool)
    first = pool.get_session("ctr-prod")
    assert pool.get_session("ctr-prod") is first
    assert visit(pool, "ctr-prod", site.url + "/table", "document.querySelectorAll('tr').length") == 20
    stats = pool.get_stats()
    assert stats["active_sessions"] == 1 and stats["total_requests"] == 3 and stats["total_errors"] == 0
    view = stats["sessions"]["ctr-prod"]
    assert view["requests"] == 3 and view["healthy"] is True and view["errors"] == 0
    assert events.seen == [("created", "ctr-prod")]


def test_lru_eviction_closes_the_least_recently_used(make_pool: Callable[..., SessionPool]) -> None:
    pool = make_pool(max_sessions=2)
    events = Events(pool)
    pool.get_session("a")
    pool.get_session("b")
    pool.get_session("a")
    pool.get_session("c")
    assert sorted(pool.get_stats()["sessions"]) == ["a", "c"]
    assert ("closed", "b") in events.seen


def test_a_login_survives_a_recycle_and_a_restart(
    make_pool: Callable[..., SessionPool], site: PageServer, tmp_path: Path
) -> None:
    pool = make_pool(profile_root=tmp_path)
    visit(pool, "alice", site.url + "/login?account=alice")
    pool.close_session("alice")
    assert "session=alice" in visit(pool, "alice", site.url + "/whoami", "document.body.innerText")
    pool.close()
    again = make_pool(profile_root=tmp_path)
    assert "session=alice" in visit(again, "alice", site.url + "/whoami", "document.body.innerText")
    assert "session=" not in visit(again, "bob", site.url + "/whoami", "document.body.innerText")
    profiles = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in profiles)


def test_two_pools_never_share_a_root_and_two_browsers_never_a_profile(
    make_pool: Callable[..., SessionPool], tmp_path: Path
) -> None:
    make_pool(profile_root=tmp_path).get_session("alice")
    with pytest.raises(ProfileInUseError, match="another SessionPool"):  # at creation, not per task
        make_pool(profile_root=tmp_path)
    other = make_pool(profile_root=tmp_path / "other")
    (tmp_path / "other" / profile_name("alice")).symlink_to(tmp_path / profile_name("alice"))
    with pytest.raises(ProfileInUseError, match="in use by another browser"):
        other.get_session("alice")


def test_asyncio_use_on_the_caller_s_own_loop(
    make_pool: Callable[..., SessionPool], site: PageServer
) -> None:
    pool = make_pool(max_sessions=1, acquire_timeout=0.5)

    async def main() -> tuple[str, int]:
        async with pool.session("ctr-prod") as browser:
            page = await browser.newPage()
            await page.goto(site.url + "/")
            title = await page.evaluate("document.title")
            await page.close()
            with pytest.raises(SessionPoolFullError):
                await pool.get_session_async("other")  # the only one is in use all along
        again = await pool.get_session_async("ctr-prod")
        assert again is browser  # the same connection on this loop
        await browser.disconnect()  # this loop's connection; the browser itself lives on
        return title, pool.get_stats()["sessions"]["ctr-prod"]["in_use"]

    assert asyncio.run(main()) == ("home", 0)


def test_a_killed_browser_is_noticed_at_once_and_replaced(make_pool: Callable[..., SessionPool]) -> None:
    pool = make_pool()
    events = Events(pool)
    pool.get_session("a")
    pid = pool.get_stats()["sessions"]["a"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: ("closed", "a") in events.seen, 10)
    assert ("error", "a") in events.seen
    assert pool.get_stats()["total_errors"] == 1
    pool.get_session("a")
    assert pool.get_stats()["sessions"]["a"]["pid"] != pid


def test_a_frozen_browser_fails_its_health_check(make_pool: Callable[..., SessionPool]) -> None:
    pool = make_pool(health_check_interval=0.5, call_timeout=1.0)
    events = Events(pool)
    pool.get_session("a")
    pid = pool.get_stats()["sessions"]["a"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    assert wait_until(lambda: ("closed", "a") in events.seen, 15)
    assert (("error", "a") in events.seen and not psutil.pid_exists(pid)) or _zombie(pid)
    assert pool.get_stats()["active_sessions"] == 0
    pool.get_session("a")
    assert pool.get_stats()["sessions"]["a"]["consecutive_failures"] == 1


def test_a_page_stuck_in_javascript_fails_the_page_probe(
    make_pool: Callable[..., SessionPool], site: PageServer
) -> None:
    pool = make_pool(health_check_interval=0.5, call_timeout=1.0)
    events = Events(pool)

    browser = pool.get_session("a")

    async def spin() -> None:
        page = await browser.newPage()
        await page.goto(site.url + "/")
        await page.evaluate("() => { setTimeout(() => { while (true) {} }, 0); }")  # returns, then spins

    pool.run(spin(), timeout=30)
    assert wait_until(lambda: ("error", "a") in events.seen, 15)


def test_idle_sessions_are_closed(make_pool: Callable[..., SessionPool]) -> None:
    pool = make_pool(session_idle_timeout=0.5)
    events = Events(pool)
    pool.get_session("a")
    assert wait_until(lambda: ("closed", "a") in events.seen, 10)
    assert pool.get_stats()["active_sessions"] == 0


def test_memory_is_measured_and_a_large_browser_is_recycled_when_idle(
    make_pool: Callable[..., SessionPool], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions._upkeep, "_QUIET", 1.0)  # seconds unused before a recycle (10 by default)
    pool = make_pool(memory_sample_interval=0.2, memory_threshold_mb=None)
    pool.get_session("a")
    assert wait_until(lambda: pool.get_stats()["sessions"]["a"]["memory_mb"] is not None, 10)
    view = pool.get_stats()["sessions"]["a"]
    root = psutil.Process(view["pid"])
    tree = [p for p in [root, *root.children(recursive=True)] if p.status() != psutil.STATUS_ZOMBIE]
    uss = sum(p.memory_full_info().uss for p in tree) / 2**20
    assert view["memory_mb"] == pytest.approx(uss, rel=0.25) and view["processes"] >= 2
    assert view["memory_mb"] < view["pss_mb"] < sum(p.memory_info().rss for p in tree) / 2**20
    pool.close()
    small = make_pool(memory_sample_interval=0.2, memory_threshold_mb=1)
    events = Events(small)
    with caplog.at_level(logging.INFO, logger="sessions"):
        small.get_session("a")
        assert wait_until(lambda: ("closed", "a") in events.seen, 10)
    assert "over memory_threshold_mb=1" in caplog.text and "for its memory" in caplog.text


def test_a_missing_or_broken_chromium_is_explained(
    make_pool: Callable[..., SessionPool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BrowserNotFoundError, match="executable_path='/nonexistent/chromium'"):
        SessionPool(executable_path="/nonexistent/chromium")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrowserNotFoundError, match="apt-get install chromium"):
        SessionPool()
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\necho 'cannot open display: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SESSIONS_CHROMIUM", str(fake))
    pool = make_pool()
    start = time.monotonic()
    with pytest.raises(BrowserLaunchError, match="boom"):
        pool.get_session("a")
    assert time.monotonic() - start < 5
    assert pool.get_stats()["total_errors"] == 1


def test_the_default_pool_and_a_closed_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = get_optimized_session_pool()
    try:
        assert get_optimized_session_pool() is pool
    finally:
        pool.close()
    with pytest.raises(SessionPoolClosedError):
        pool.get_session("a")
    with pytest.raises(ValueError, match="max_sessions"):
        SessionPool(max_sessions=0)
    with pytest.raises(ValueError, match="unknown hook"):
        SessionPool.register_hook(pool, "session_started", print)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_workers_forked_from_a_process_with_a_session_pool_end_at_once(
    make_pool: Callable[..., SessionPool], make_executor: Callable[..., Any]
) -> None:
    # A forked worker inherits the pool object; its exit hooks must not try to close that copy.
    pool = make_pool()
    assert pool.get_stats()["active_sessions"] == 0
    executor = make_executor(max_local_workers=2, start_method="fork")
    assert executor.submit(abs, -1).result(timeout=30) == 1
    start = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - start < 2.5  # not the 5 s teardown waits for workers to end
