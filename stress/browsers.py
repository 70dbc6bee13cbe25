"""Browser figures, as ratios from one run: warm session vs launch, reconnect vs launch, memory per browser.

- ``get_session`` of a warm session against a first launch (close, then get).
- A pinned browser after its worker was SIGKILLed: the replacement worker's
  ``current_browser()`` in its first task (it connected while starting) against
  asking for a new browser (a launch and a connect), both timed inside the task;
  and what a bare connect to a running browser costs.
- Memory of an idle browser: USS, PSS and summed RSS of its process tree.
- Memory per account with a page open: a browser per account against an
  incognito context per account in one shared browser (USS and PSS of every
  browser tree, divided by the accounts).
- Faults (a crashed tab, a SIGKILLed browser, a frozen one) and the
  tracebacks they print to stderr: there should be none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import statistics
import time
from typing import Any

import psutil

import sessions
from procpool import DistributedExecutor, companion_info

from .common import StderrWatch, conclude, figure_table, say
from .pages import PageServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=5, help="launches and reconnects to time")


def run(args: argparse.Namespace) -> int:
    watch = StderrWatch()
    figures: dict[str, Any] = {}
    say("timing sessions: first launch and warm get_session ...")
    figures.update(session_costs(args.repeat))
    say("timing pinned browsers: reconnect after a worker kill, and a fresh launch ...")
    figures.update(pinned_costs(args.repeat))
    site = PageServer()
    try:
        say(f"measuring {ACCOUNTS} accounts as browsers and as contexts ...")
        for isolation in ("browser", "context"):
            figures.update(account_memory(isolation, site.url))
        say("faults: a crashed tab, a killed browser, a frozen one ...")
        figures.update(faults(site.url))
    finally:
        site.close()
    figures["memory per account: context / browser (USS)"] = (
        figures["memory per account, context: USS (MB)"] / figures["memory per account, browser: USS (MB)"]
    )
    figures["tracebacks on stderr"] = watch.close()
    code = conclude("browsers", figures, figure_table(figures))
    return code or (1 if figures["tracebacks on stderr"] else 0)


ACCOUNTS = 4  # accounts with a page open, for the memory per account


def account_memory(isolation: str, base: str) -> dict[str, float]:
    """Every account's page open on /table; USS and PSS of all browser trees per account (MB)."""
    with sessions.SessionPool(max_sessions=ACCOUNTS, isolation=isolation) as pool:
        for i in range(ACCOUNTS):
            with pool.sync_session(f"account-{i}") as browser:
                browser.newPage().goto(f"{base}/table")
        time.sleep(1.0)  # let the browsers settle before they are measured
        pids = {view["pid"] for view in pool.get_stats()["sessions"].values()}
        procs = [
            p for pid in pids for p in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True))
        ]
        memory = [p.memory_full_info() for p in procs if p.status() != psutil.STATUS_ZOMBIE]
    return {
        f"memory per account, {isolation}: USS (MB)": sum(m.uss for m in memory) / 2**20 / ACCOUNTS,
        f"memory per account, {isolation}: PSS (MB)": sum(m.pss for m in memory) / 2**20 / ACCOUNTS,
        f"browsers for {ACCOUNTS} accounts, {isolation}": float(len(pids)),
    }


def faults(base: str) -> dict[str, float]:
    """A crashed tab, a SIGKILLed browser and a SIGSTOPped one; each time the session works on after."""
    recovered = 0
    with sessions.SessionPool(call_timeout=5, health_check_interval=1) as pool:
        for fault in ("crash", signal.SIGKILL, signal.SIGSTOP):
            with pool.sync_session("account") as browser:
                page = browser.newPage()
                page.goto(f"{base}/")
                if fault == "crash":  # the tab's renderer dies: its call fails, the session lives on
                    with contextlib.suppress(sessions.SessionError):
                        pool.run(functools.partial(page._obj._client.send, "Page.crash"), timeout=10)
                else:
                    os.kill(pool.get_stats()["sessions"]["account"]["pid"], fault)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with pool.sync_session("account") as browser:
                        page = browser.newPage()
                        page.goto(f"{base}/table")
                        recovered += page.evaluate("document.querySelectorAll('tr').length") == 20
                    break
                except Exception:  # noqa: BLE001 - a death not seen yet, a frozen browser not yet replaced
                    time.sleep(0.2)
    return {"faults recovered from (of 3)": float(recovered)}


def session_costs(repeat: int) -> dict[str, float]:
    """Launch vs warm ``get_session``, and an idle browser's memory three ways (MB)."""
    with sessions.SessionPool(max_sessions=1) as pool:
        launches = []
        for _ in range(repeat):
            pool.close_session("bench")
            start = time.perf_counter()
            pool.get_session("bench")
            launches.append(time.perf_counter() - start)
        warm = []
        for _ in range(200):
            start = time.perf_counter()
            pool.get_session("bench")
            warm.append(time.perf_counter() - start)
        connects = []
        for _ in range(repeat):
            start = time.perf_counter()
            asyncio.run(_connect_and_leave(pool))  # a connection of a fresh loop to the running browser
            connects.append(time.perf_counter() - start)
        time.sleep(1.0)  # let the browser settle before it is measured
        pid = pool.get_stats()["sessions"]["bench"]["pid"]
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        memory = [p.memory_full_info() for p in tree if p.status() != psutil.STATUS_ZOMBIE]
    launch, hot = statistics.median(launches) * 1e3, statistics.median(warm) * 1e3
    return {
        "session: first launch, median (ms)": launch,
        "session: warm get_session, median (ms)": hot,
        "session: warm is faster by (x)": launch / hot,
        "session: connect to the running browser, median (ms)": statistics.median(connects) * 1e3,
        "idle browser: processes": float(len(memory)),
        "idle browser: USS (MB)": sum(m.uss for m in memory) / 2**20,
        "idle browser: PSS (MB)": sum(m.pss for m in memory) / 2**20,
        "idle browser: summed RSS (MB)": sum(m.rss for m in memory) / 2**20,
    }


async def _connect_and_leave(pool: sessions.SessionPool) -> None:
    browser = await pool.get_session_async("bench")
    await browser.disconnect()


async def _reconnect() -> float:
    start = time.perf_counter()
    await sessions.current_browser()
    return time.perf_counter() - start


async def _relaunch() -> float:
    start = time.perf_counter()
    companion_info(replace=True)  # the manager starts a new browser for this slot
    await sessions.current_browser()
    return time.perf_counter() - start


def pinned_costs(repeat: int) -> dict[str, float]:
    """A replacement worker reconnecting to its slot's browser vs a new browser."""
    reconnects, launches = [], []
    with DistributedExecutor(1, companion=sessions.pinned_browsers()) as ex:
        ex.get_task_result(ex.submit_task(_reconnect), timeout=60)
        for _ in range(repeat):
            pid = ex.get_stats()["workers"]["local-worker-0"]["pid"]
            os.kill(pid, signal.SIGKILL)
            while ex.get_stats()["workers"]["local-worker-0"]["pid"] in (pid, 0):
                time.sleep(0.01)
            reconnects.append(ex.get_task_result(ex.submit_task(_reconnect), timeout=60))
            launches.append(ex.get_task_result(ex.submit_task(_relaunch), timeout=60))
    reconnect, launch = statistics.median(reconnects) * 1e3, statistics.median(launches) * 1e3
    return {
        "pinned: reconnect after a worker kill, median (ms)": reconnect,
        "pinned: new browser (launch + connect), median (ms)": launch,
        "pinned: reconnect is faster by (x)": launch / reconnect,
    }
