"""A browser per procpool worker, owned by the manager process: fan-out, kills, crashes, owner death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
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
