"""A browser per procpool worker, owned by the manager process: fan-out, kills, crashes, owner death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until

import sessions
from procpool import DistributedExecutor, TaskPriority, TaskStatus, TaskTimeoutError, companion_info
from stress.pages import PageServer

pytestmark = pytest.mark.browser


async def visit(url: str, script: str = "() => document.body.innerText") -> tuple[Any, int]:
    """Open ``url`` in this worker's browser; returns what ``script`` gives and the browser's pid."""
    browser = await sessions.current_browser()
    page = await browser.newPage()
    try:
        await page.goto(url)
        return await page.evaluate(script), companion_info()["pid"]
    finally:
        await page.close()


async def hang_in_browser() -> None:
    await sessions.current_browser()
    await asyncio.sleep(3600)


def pinned(make_executor: Callable[..., DistributedExecutor], **options: Any) -> DistributedExecutor:
    options.setdefault("memory_sample_interval", 0.2)
    return make_executor(companion=sessions.pinned_browsers(), task_timeout=60, **options)


def test_multi_account_fan_out(make_executor: Callable[..., DistributedExecutor], site: PageServer) -> None:
    executor = pinned(make_executor)
    accounts = [f"acct-{i}" for i in range(6)]
    ids = executor.submit_batch(
        [(visit, (f"{site.url}/login?account={a}",)) for a in accounts], priority=TaskPriority.HIGH
    )
    results = executor.wait_for_tasks(ids, timeout=120)
    assert [text for text, _ in results] == ["logged in"] * 6
    browsers = {pid for _, pid in results}
    assert len(browsers) <= 2  # one per worker slot, however many tasks

    def measured() -> bool:
        views = executor.get_stats()["workers"].values()
        return sum(1 for w in views if w["browser"] and w["browser"]["memory_mb"] > 10) == len(browsers)

    assert wait_until(measured, 15)
    assert {w["browser"]["pid"] for w in executor.get_stats()["workers"].values() if w["browser"]} == browsers


def test_a_killed_worker_leaves_its_browser_to_the_next(
    make_executor: Callable[..., DistributedExecutor], site: PageServer
) -> None:
    executor = pinned(make_executor, max_local_workers=1)
    _, first = executor.get_task_result(executor.submit_task(visit, args=(f"{site.url}/login?account=kept",)))
    hung = executor.submit_task(hang_in_browser, timeout=1.0)
    with pytest.raises(TaskTimeoutError):
        executor.get_task_result(hung, timeout=30)
    cookie, second = executor.get_task_result(executor.submit_task(visit, args=(f"{site.url}/whoami",)))
    assert second == first and "session=kept" in cookie
    assert executor.get_stats()["workers"]["local-worker-0"]["restarts"] == 1


def test_a_crashed_browser_is_replaced(
    make_executor: Callable[..., DistributedExecutor], site: PageServer
) -> None:
    executor = pinned(make_executor, max_local_workers=1)
    _, first = executor.get_task_result(executor.submit_task(visit, args=(f"{site.url}/",)))
    os.kill(first, signal.SIGKILL)
    text, second = executor.get_task_result(executor.submit_task(visit, args=(f"{site.url}/",)))
    assert text == "home" and second != first
    assert (
        executor.get_task(executor.submit_task(visit, args=(f"{site.url}/",))).status is not TaskStatus.FAILED
    )


def test_no_browser_outlives_a_sigkilled_owner(site: PageServer) -> None:
    script = textwrap.dedent(f"""
        import sessions
        from procpool import DistributedExecutor, companion_info

        async def visit(url):
            page = await (await sessions.current_browser()).newPage()
            await page.goto(url)
            return companion_info()["pid"]

        ex = DistributedExecutor(2, companion=sessions.pinned_browsers())
        print(ex.get_task_result(ex.submit_task(visit, args=({site.url!r},)), timeout=60), flush=True)
        input()
    """)
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        browser = int(owner.stdout.readline())
        tree = psutil.Process(owner.pid).children(recursive=True)  # manager, workers, browsers
        assert browser in {p.pid for p in tree}
        owner.kill()
        owner.wait(10)
    finally:
        owner.kill()
        if owner.stdin is not None:
            owner.stdin.close()
        if owner.stdout is not None:
            owner.stdout.close()
    assert wait_until(lambda: not any(_running(p) for p in tree), 10), [p.pid for p in tree if _running(p)]
    blocks = lambda: list(Path("/dev/shm").glob(f"procpool-{owner.pid}-*"))  # noqa: E731
    assert wait_until(lambda: not blocks(), 10), "the metrics block outlived its owner"


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def as_account(account: str, url: str, hang: bool = False) -> str:
    """Open ``url`` in the account's own context on this worker; the page's text."""
    context = await sessions.current_context(account)
    page = await context.newPage()
    await page.goto(url)
    text: str = await page.evaluate("() => document.body.innerText")
    if hang:  # killed at its deadline: the next worker saves the login its context holds
        await asyncio.sleep(3600)
    return text


async def open_pages(count: int, spin_url: str | None = None) -> int:
    """Open ``count`` pages (one spinning, if given) and leave them; the pages this browser had before."""
    browser = await sessions.current_browser()
    targets = await browser._connection.send("Target.getTargets")  # Chromium's own count
    before = len([t for t in targets["targetInfos"] if t["type"] == "page"])
    for _ in range(count):
        await browser.newPage()
    if spin_url:
        page = await browser.newPage()
        await page.goto(spin_url, waitUntil="domcontentloaded")
        await asyncio.sleep(3600)
    return before


def test_accounts_on_one_worker_never_share_a_login(
    make_executor: Callable[..., DistributedExecutor], site: PageServer
) -> None:
    executor = pinned(make_executor, max_local_workers=1)
    run = lambda *args: executor.get_task_result(executor.submit_task(as_account, args=args), timeout=60)  # noqa: E731
    assert run("acct-0", f"{site.url}/login?account=acct-0&kind=session") == "logged in"
    assert run("acct-1", f"{site.url}/console") == "Please log in"  # same worker, same browser
    assert run("acct-0", f"{site.url}/console") == "Console acct-0"  # its session cookie came back
    hung = executor.submit_task(
        as_account, args=("acct-2", f"{site.url}/login?account=acct-2"), kwargs={"hang": True}, timeout=3
    )
    with pytest.raises(TaskTimeoutError):
        executor.get_task_result(hung, timeout=30)
    assert run("acct-2", f"{site.url}/console") == "Console acct-2"  # a killed task's login is kept too
    assert run("acct-1", f"{site.url}/console") == "Please log in"


def test_pages_a_task_opened_close_when_it_ends_or_is_killed(
    make_executor: Callable[..., DistributedExecutor], site: PageServer
) -> None:
    executor = pinned(make_executor, max_local_workers=1)
    executor.get_task_result(executor.submit_task(open_pages, args=(3,)), timeout=60)
    assert executor.get_task_result(executor.submit_task(open_pages, args=(0,)), timeout=60) == 0
    spinning = executor.submit_task(open_pages, args=(1, f"{site.url}/spin"), timeout=3)
    with pytest.raises(TaskTimeoutError):
        executor.get_task_result(spinning, timeout=30)
    assert executor.get_task_result(executor.submit_task(open_pages, args=(0,)), timeout=60) == 0
    browser = psutil.Process(executor.get_stats()["workers"]["local-worker-0"]["browser"]["pid"])
    tree = [browser, *browser.children(recursive=True)]
    for proc in tree:
        proc.cpu_percent()
    time.sleep(1.0)
    busy = sum(p.cpu_percent() for p in tree if p.is_running())
    assert busy < 50, f"the killed task's spinning tab still runs: {busy:.0f}% CPU"
