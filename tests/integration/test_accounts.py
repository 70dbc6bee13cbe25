"""sessions for multi-account work, tried as its users use it: real Chromium, local pages.

Isolation between accounts, logins that survive, a driver that never hangs,
the blocking API, sessions never closed under their users, lifecycle limits,
races right after a death, and clean ends (garbage collection, exit, fork).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import pid_alive, wait_until

import sessions._driver
from sessions import (
    BrowserGoneError,
    CallTimeoutError,
    PageCrashedError,
    SessionError,
    SessionPool,
    SessionPoolClosedError,
    SessionPoolFullError,
)
from sessions._state import state_path
from stress.pages import PageServer

pytestmark = pytest.mark.browser
MakePool = Callable[..., SessionPool]
BOTH = pytest.mark.parametrize("isolation", ["browser", "context"])
ROOT = Path(__file__).resolve().parents[2]


def log_in(pool: SessionPool, account: str, site: PageServer) -> None:
    """A login with a session cookie (no Max-Age) and a value in local storage, page closed after."""
    with pool.sync_session(account) as browser:
        page = browser.newPage()
        page.goto(f"{site.url}/login?account={account}&kind=session")
        page.evaluate(f"() => localStorage.setItem('who', '{account}')")
        page.close()


def console(pool: SessionPool, account: str, site: PageServer) -> tuple[str, str | None]:
    """What the account sees on the cookie-gated page, and its local storage."""
    with pool.sync_session(account) as browser:
        page = browser.newPage()
        try:
            page.goto(f"{site.url}/console")
            return page.evaluate("document.body.innerText"), page.evaluate("localStorage.getItem('who')")
        finally:
            page.close()


def pid_of(pool: SessionPool, account: str) -> int:
    return int(pool.get_stats()["sessions"][account]["pid"])


# -- 1, 2: isolation and logins ------------------------------------------------------------------


@BOTH
def test_an_account_never_sees_another_s_login(make_pool: MakePool, site: PageServer, isolation: str) -> None:
    pool = make_pool(isolation=isolation)
    log_in(pool, "acct-1", site)
    log_in(pool, "acct-2", site)
    assert console(pool, "acct-0", site) == ("Please log in", None)
    assert console(pool, "acct-1", site) == ("Console acct-1", "acct-1")
    assert console(pool, "acct-2", site) == ("Console acct-2", "acct-2")
    browsers = {pid_of(pool, a) for a in ("acct-0", "acct-1", "acct-2")}
    assert len(browsers) == (3 if isolation == "browser" else 1)


@BOTH
def test_a_login_survives_eviction_and_restart(
    make_pool: MakePool, site: PageServer, tmp_path: Path, isolation: str
) -> None:
    pool = make_pool(isolation=isolation, max_sessions=1, profile_root=tmp_path)
    log_in(pool, "alice", site)
    assert console(pool, "bob", site)[0] == "Please log in"  # alice was evicted (LRU) for bob
    assert "alice" not in pool.get_stats()["sessions"]
    assert console(pool, "alice", site) == ("Console alice", "alice")
    pool.close()
    again = make_pool(isolation=isolation, profile_root=tmp_path)
    assert console(again, "alice", site) == ("Console alice", "alice")
    state = next((tmp_path / "state").glob("alice-*.json"))
    assert (state.stat().st_mode & 0o777, state.parent.stat().st_mode & 0o777) == (0o600, 0o700)


@BOTH
def test_a_login_survives_a_browser_killed_a_second_after(
    make_pool: MakePool, site: PageServer, isolation: str
) -> None:
    pool = make_pool(isolation=isolation, state_save_interval=0.2)
    log_in(pool, "alice", site)
    saved = state_path(pool._core.settings.profile_root, "alice")
    assert wait_until(lambda: saved.exists() and "alice" in saved.read_text(), 5)  # the periodic save
    os.kill(pid_of(pool, "alice"), signal.SIGKILL)  # no close, so nothing more is saved
    assert wait_until(lambda: "alice" not in pool.get_stats()["sessions"], 10)
    assert console(pool, "alice", site)[0] == "Console alice"


# -- 3: a driver that never hangs -----------------------------------------------------------------


async def wait_for_failure(pending: Any, limit: float) -> tuple[BaseException | None, float]:
    """How a pending call ends, and how long it took (None if it did not fail within ``limit``)."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(pending, limit)
    except TimeoutError:
        return None, limit
    except Exception as exc:  # noqa: BLE001 - the verdict
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@BOTH
def test_a_crashed_tab_fails_its_pending_calls_at_once(
    make_pool: MakePool, site: PageServer, isolation: str
) -> None:
    pool = make_pool(isolation=isolation)
    browser = pool.get_session("a")

    async def crash_while_waiting() -> tuple[BaseException | None, float, BaseException | None]:
        page = await browser.newPage()
        await page.goto(site.url + "/")
        pending = asyncio.ensure_future(page.evaluate("() => new Promise(() => {})"))
        while not page._client._callbacks:  # the call is on its way to the page
            await asyncio.sleep(0.005)
        page._client.send("Page.crash").add_done_callback(lambda f: f.cancelled() or f.exception())
        error, took = await wait_for_failure(pending, 10)
        try:
            await page.evaluate("1 + 1")
            later = None
        except Exception as exc:  # noqa: BLE001 - the verdict
            later = exc
        return error, took, later

    error, took, later = pool.run(crash_while_waiting(), timeout=30)
    assert isinstance(error, PageCrashedError) and took < 2.0
    assert isinstance(later, PageCrashedError)  # refused at once, not sent into the void
    assert console(pool, "a", site)[0] == "Please log in"  # the session works on, in a new page


def test_a_frozen_browser_fails_pending_calls_within_seconds(
    make_pool: MakePool, site: PageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions._driver, "_FROZEN_AFTER", 2.0)  # seconds of silence (5 by default)
    pool = make_pool()
    browser = pool.get_session("a")
    pid = pid_of(pool, "a")

    async def freeze_while_waiting() -> tuple[BaseException | None, float]:
        page = await browser.newPage()
        await page.goto(site.url + "/")
        os.kill(pid, signal.SIGSTOP)
        try:
            return await wait_for_failure(page.evaluate("1 + 1"), 20)
        finally:
            os.kill(pid, signal.SIGCONT)

    error, took = pool.run(freeze_while_waiting(), timeout=40)
    assert isinstance(error, BrowserGoneError) and took < 6  # ping after 2 s, then 2 s of silence


def test_a_page_stuck_in_javascript_times_out_and_the_run_is_cancelled(
    make_pool: MakePool, site: PageServer
) -> None:
    pool = make_pool(call_timeout=2)
    with pool.sync_session("a") as browser:
        page = browser.newPage()
        page.goto(site.url + "/")
        started = time.monotonic()
        with pytest.raises(CallTimeoutError):
            page.evaluate("() => { while (true) {} }")
        assert time.monotonic() - started < 6
    reached = threading.Event()

    async def slow() -> None:
        await asyncio.sleep(1.0)
        reached.set()

    with pytest.raises(TimeoutError):
        pool.run(slow(), timeout=0.2)
    assert not reached.wait(1.5)  # cancelled on the loop, not left running


def run_script(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_faults_print_no_traceback(site: PageServer) -> None:
    done = run_script(f"""
        import os, signal, time
        import sessions
        with sessions.SessionPool(call_timeout=3, health_check_interval=0.5) as pool:
            with pool.sync_session("a") as browser:
                page = browser.newPage()
                page.goto("{site.url}/")
                page._obj._client.send("Page.crash")
                time.sleep(1)
            pool.get_session("a")
            os.kill(pool.get_stats()["sessions"]["a"]["pid"], signal.SIGKILL)
            time.sleep(1)
            browser = pool.get_session("a")
            pool.run(browser.newPage())
            os.kill(pool.get_stats()["sessions"]["a"]["pid"], signal.SIGKILL)
            time.sleep(1)
        print("done")
    """)
    assert done.stdout.strip() == "done", done.stderr
    assert done.stderr == ""


# -- 4: the blocking API --------------------------------------------------------------------------


@BOTH
def test_blocking_proxies_take_whatever_pyppeteer_returns(
    make_pool: MakePool, site: PageServer, isolation: str
) -> None:
    pool = make_pool(isolation=isolation)
    with pool.sync_session("a") as browser:
        page = browser.newPage()
        page.goto(site.url + "/table")
        cell = page.waitForSelector("td", timeout=5000)  # a WaitTask, awaited on the pool loop
        assert cell.getProperty("textContent").jsonValue() == "0"
        assert page.evaluate("(node) => node.tagName", cell) == "TD"  # a proxy passed back in
        rows = page.querySelectorAll("tr")
        assert len(rows) == 20 and all(type(r).__name__ == "Blocking" for r in rows)
        assert page.mainFrame.title() == "table" and page.url.endswith("/table")
        page.keyboard.press("Tab")
        raw = pool.get_session("a")
        pages = pool.run(raw.pages())
        assert (
            pool.run(lambda: pages[-1].waitForSelector("table")) is not None
        )  # a WaitTask, made on the loop
        assert "table" in pool.gather(*(p.title() for p in pages))
        other = asyncio.new_event_loop()  # as asyncio.gather outside any loop makes one
        try:
            with pytest.raises(TypeError, match=r"pool\.gather"):
                pool.run(other.create_future())
        finally:
            other.close()
    with pytest.raises(TypeError, match="awaitable"):
        pool.run(42)  # type: ignore[arg-type]


# -- 4, 5: use, holds and limits -------------------------------------------------------------------


def test_a_busy_sync_user_is_neither_idle_closed_nor_evicted(make_pool: MakePool) -> None:
    pool = make_pool(max_sessions=2, session_idle_timeout=1.5)
    pool.get_session("quiet")
    busy = pool.get_session("busy")  # the raw Browser: no hold, only use
    page = pool.run(busy.newPage())
    pid, since = pid_of(pool, "busy"), time.monotonic()
    uses: list[float] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def use() -> None:  # a user thread, busy all along, however slow the launches beside it
        while not stop.wait(0.25):
            began = time.monotonic()  # the use counts from its call: a launch may hold its end up
            try:
                pool.run(page.evaluate("1 + 1"))
            except Exception as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)
                return
            uses.append(began)

    user = threading.Thread(target=use)
    user.start()
    try:
        assert wait_until(lambda: "quiet" not in pool.get_stats()["sessions"], 10)  # unused: idle
        time.sleep(max(0.0, since + 4 - time.monotonic()))  # used beyond the idle timeout
        assert pid_of(pool, "busy") == pid
        pool.get_session("other")
        launched = time.monotonic()
        assert wait_until(lambda: bool(uses) and uses[-1] > launched, 10)
        pool.get_session("third")  # full: the least recently *used* one goes, not the busy one
        assert set(pool.get_stats()["sessions"]) == {"busy", "third"}
    finally:
        stop.set()
        user.join(10)
    assert not errors and not user.is_alive()
    assert pid_of(pool, "busy") == pid


def test_a_held_session_is_never_idle_closed(make_pool: MakePool) -> None:
    pool = make_pool(session_idle_timeout=1)
    with pool.sync_session("a"):
        pid = pid_of(pool, "a")
        time.sleep(2.5)
        assert pid_of(pool, "a") == pid
    assert wait_until(lambda: "a" not in pool.get_stats()["sessions"], 5)


def test_get_session_waits_for_a_free_slot(make_pool: MakePool) -> None:
    pool = make_pool(max_sessions=1, acquire_timeout=10)
    held = threading.Event()

    def hold() -> None:
        with pool.sync_session("a"):
            held.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    started = time.monotonic()
    pool.get_session("b")
    assert 0.5 < time.monotonic() - started < 9
    holder.join()
    quick = make_pool(max_sessions=1, acquire_timeout=0.3)
    with quick.sync_session("a"), pytest.raises(SessionPoolFullError, match="acquire_timeout"):
        quick.get_session("b")


def test_page_cap_and_retirement(make_pool: MakePool, site: PageServer) -> None:
    pool = make_pool(isolation="context", max_pages=2, retire_after_requests=3)
    with pool.sync_session("a") as browser:
        browser.newPage()
        browser.newPage()
        with pytest.raises(SessionError, match="max_pages=2"):
            browser.newPage()
    log_in(pool, "b", site)
    assert pool.get_stats()["sessions"]["b"]["requests"] == 1
    pool.get_session("b")
    pool.get_session("b")  # the 3rd request: served, then due
    pool.get_session("b")  # a new session now, with its login
    assert pool.get_stats()["sessions"]["b"]["requests"] == 1
    assert console(pool, "b", site)[0] == "Console b"


# -- 6: races and ends ---------------------------------------------------------------------------


def test_get_session_right_after_a_death_returns_a_working_browser(
    make_pool: MakePool, site: PageServer
) -> None:
    pool = make_pool(health_check_interval=0.5, call_timeout=2)
    noticed = threading.Event()
    pool.register_hook("session_error", lambda account, error: noticed.set())
    for stop in (signal.SIGKILL, signal.SIGSTOP):
        noticed.clear()
        pool.get_session("a")
        os.kill(pid_of(pool, "a"), stop)
        assert noticed.wait(15)  # the death is seen; its close may still run
        assert console(pool, "a", site)[0] == "Please log in"


def test_a_dropped_pool_closes_its_browsers() -> None:
    pool = SessionPool()
    pool.get_session("a")
    pid, root = pid_of(pool, "a"), pool._core.settings.profile_root
    del pool
    gc.collect()
    assert wait_until(lambda: not pid_alive(pid), 15)
    assert wait_until(lambda: not root.exists(), 5)


def test_exit_without_close_is_clean_and_silent(site: PageServer) -> None:
    done = run_script(f"""
        import sessions
        pool = sessions.SessionPool(isolation="context")
        with pool.sync_session("a") as b:
            b.newPage().goto("{site.url}/")
        print(pool.get_stats()["sessions"]["a"]["pid"], pool._core.settings.profile_root)
    """)
    assert done.stderr == "" and done.returncode == 0
    pid, root = done.stdout.split()
    assert not pid_alive(int(pid)) and not Path(root).exists()


def test_a_sigkilled_owner_s_leftovers_go_at_the_next_start() -> None:
    script = "import sessions, time; p = sessions.SessionPool(); p.get_session('a')\n"
    script += "print(p._core.settings.profile_root, p.get_stats()['sessions']['a']['pid'], flush=True)\n"
    script += "time.sleep(60)"
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert owner.stdout is not None
        root, pid = owner.stdout.readline().split()
        browser = psutil.Process(int(pid))
        tree = [browser, *browser.children(recursive=True)]
        assert Path(root).exists()
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()
    assert wait_until(lambda: not any(pid_alive(p.pid) for p in tree), 10)  # the browser dies with its owner
    SessionPool().close()  # the next pool
    assert not Path(root).exists()


def test_a_forked_child_is_refused_with_a_clear_error(make_pool: MakePool) -> None:
    pool = make_pool()
    pool.get_session("a")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            pool.get_session("a")
            os.write(write, b"served")
        except SessionPoolClosedError as exc:
            os.write(write, b"refused" if "belongs to process" in str(exc) else b"other")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as answer:
        assert answer.read() == "refused"
    assert pool.get_stats()["sessions"]["a"]["healthy"]  # the parent's pool is untouched


# -- 7, 8 -----------------------------------------------------------------------------------------------


def test_another_cdp_client_reaches_the_account_s_session(make_pool: MakePool, site: PageServer) -> None:
    shared = make_pool(isolation="context")
    log_in(shared, "a", site)
    devtools = shared.devtools_endpoint("a")
    assert devtools.endpoint.startswith("ws://127.0.0.1:") and devtools.context_id
    pool = make_pool()  # a browser per account: the whole browser is the account's
    log_in(pool, "a", site)
    devtools = pool.devtools_endpoint("a")
    assert devtools.context_id is None
    playwright = pytest.importorskip("playwright.sync_api")  # procpool[playwright]
    with playwright.sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(devtools.endpoint)
        (context,) = browser.contexts
        assert {"name": "session", "value": "a"}.items() <= context.cookies()[0].items()
        page = context.new_page()
        page.goto(f"{site.url}/console")
        assert page.inner_text("#who") == "Console a"
        browser.close()  # Playwright's connection; the session lives on
    assert console(pool, "a", site) == ("Console a", "a")


def test_memory_is_measured_when_a_session_is_made(make_pool: MakePool) -> None:
    pool = make_pool(memory_sample_interval=3600)
    pool.get_session("a")
    view = pool.get_stats()["sessions"]["a"]
    assert view["memory_mb"] > 10 and view["processes"] >= 2
