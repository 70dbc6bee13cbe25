"""A browser pinned to each procpool worker slot: sessions' one piece of procpool integration.

    DistributedExecutor(companion=pinned_browsers())
        manager process: PinnedBrowsers(slot) ── starts Chromium on profile worker-<slot> ──▶ owns its PID
    async task in a worker:
        await current_browser()         ── companion_info() ──▶ endpoint ── connect (kept by the worker)
        await current_context(account)  ── a fresh incognito context, the account's login restored
    after each task (procpool calls after_task): each account's state saved, its context closed, and
        every page the task opened closed; a worker's warm-up does the same for a killed predecessor

The manager owns the browser, so a worker killed at a deadline leaves it
running: its replacement reconnects in milliseconds. Accounts on one worker
never share a cookie jar: each task gets its account's own context, and its
login (cookies, session cookies too, and local storage) travels between tasks
and workers through the state files (0600) under the profile root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _state as state
from ._driver import Browser, BrowserContext, bounded, connect
from ._process import BrowserProcess, find_chromium, temporary_root

__all__ = ("PinnedBrowsers", "current_browser", "current_context", "pinned_browsers")

log = logging.getLogger("sessions")
_PING_TIMEOUT = 2.0  # seconds a cached connection gets to answer before the browser is replaced
_TIDY_TIMEOUT = 5.0  # seconds each tidying call may take after a task
_SAVE_EVERY = 5.0  # seconds between saves of a context's login while its task runs
_connected: tuple[str, Browser] | None = None  # in a worker: the endpoint and its connection
_contexts: dict[str, BrowserContext] = {}  # this task's accounts and their contexts
_savers: list[asyncio.Task[None]] = []
_used = False  # the current task asked for the browser: tidy after it


@dataclass(frozen=True, slots=True)
class PinnedBrowsers:
    """Starts one Chromium per worker slot, in the manager process (see ``pinned_browsers``)."""

    profile_root: str | None = None
    executable_path: str | None = None
    launch_timeout: float = 30.0

    def __call__(self, slot: int) -> _Pinned:
        executable = find_chromium(self.executable_path)
        temporary = self.profile_root is None
        root = _manager_root() if temporary else Path(self.profile_root or "")
        process = BrowserProcess.start(executable, root / f"worker-{slot}")
        process.wait_ready_blocking(self.launch_timeout)
        return _Pinned(process, root, slot, temporary)

    async def warm_up(self) -> None:
        """Run by procpool in each worker as it starts: connect now, and tidy after a killed predecessor."""
        global _used
        await current_browser()
        _used = True
        await self.after_task()

    async def after_task(self) -> None:
        """Run by procpool after each task: save and close its accounts' contexts, close its pages."""
        global _used
        if not _used or _connected is None:
            return
        _used = False
        for saver in _savers:
            saver.cancel()
        _savers.clear()
        browser = _connected[1]
        info = _info()
        owners = _owners(info)
        send = browser._connection.send  # asked of Chromium, not of pyppeteer's bookkeeping (it lags)
        contexts = await bounded(send("Target.getBrowserContexts"), _TIDY_TIMEOUT)
        for context_id in contexts.get("browserContextIds", []):
            account = owners.pop(context_id, None)
            if account is not None:
                with contextlib.suppress(Exception):
                    path = state.state_path(Path(info["root"]), account)
                    await state.save(browser, context_id, path, _TIDY_TIMEOUT)
            with contextlib.suppress(Exception):
                closing = send("Target.disposeBrowserContext", {"browserContextId": context_id})
                await bounded(closing, _TIDY_TIMEOUT)
            browser._contexts.pop(context_id, None)
        _contexts.clear()
        _write_owners(info, owners)
        closing = await _pages(browser)
        for target_id in closing:
            with contextlib.suppress(Exception):
                await bounded(send("Target.closeTarget", {"targetId": target_id}), _TIDY_TIMEOUT)
        deadline = time.monotonic() + _TIDY_TIMEOUT  # a tab stuck in JavaScript takes a moment to go
        while closing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            closing &= await _pages(browser)


async def _pages(browser: Browser) -> set[str]:
    reply = await bounded(browser._connection.send("Target.getTargets"), _TIDY_TIMEOUT)
    return {t["targetId"] for t in reply.get("targetInfos", []) if t.get("type") == "page"}


def _manager_root() -> Path:
    """One temporary root per manager process, shared by its slots (the stale ones swept first)."""
    found = [p for p in Path(tempfile.gettempdir()).glob(f"procpool-browsers-{os.getpid()}-*") if p.is_dir()]
    return found[0] if found else temporary_root("procpool-browsers")


class _Pinned:
    """A pinned browser as procpool's manager holds it (procpool's Companion protocol)."""

    def __init__(self, process: BrowserProcess, root: Path, slot: int, temporary: bool) -> None:
        self.process = process
        self.pid = process.pid
        self.info: dict[str, Any] = {"endpoint": process.endpoint, "pid": process.pid, "root": str(root),
                                     "slot": slot}  # fmt: skip
        self._temporary_root = root if temporary else None

    def alive(self) -> bool:
        return self.process.alive()

    def kill(self) -> None:
        self.process.kill()  # the profile and the saved logins stay for the replacement

    def close(self) -> None:
        self.process.kill()
        if self._temporary_root is not None:
            shutil.rmtree(self._temporary_root, ignore_errors=True)


def pinned_browsers(
    profile_root: str | os.PathLike[str] | None = None,
    executable_path: str | os.PathLike[str] | None = None,
    launch_timeout: float = 30.0,
) -> PinnedBrowsers:
    """The ``companion`` for ``DistributedExecutor``: a browser per worker, owned by the manager.

    Args:
        profile_root: where the per-slot profiles and the accounts' saved logins
            live (kept after the pool ends); a temporary folder by default,
            removed with the pool.
        executable_path: the Chromium to run (else $SESSIONS_CHROMIUM, else found).
        launch_timeout: seconds Chromium gets to start.

    Raises:
        BrowserNotFoundError: no Chromium here (checked now, not in the manager later).
    """
    find_chromium(executable_path)
    return PinnedBrowsers(
        None if profile_root is None else os.fspath(profile_root),
        None if executable_path is None else os.fspath(executable_path),
        launch_timeout,
    )


def _info(replace: bool = False) -> dict[str, Any]:
    from procpool import companion_info  # the integration point; sessions imports fine without it

    return companion_info(replace=replace)


async def current_browser(timeout: float = 10.0) -> Browser:
    """In an async task on a worker of a pool made with ``companion=pinned_browsers()``:
    this worker's browser, as a pyppeteer Browser on the worker's event loop.

    Its default context is shared by every task on this worker: for an
    account's work use ``current_context(account)``. Pages the task opens are
    closed when it ends. Reuses the worker's connection while the browser
    answers; reconnects to a browser its predecessor used; asks for a new
    browser if this one is dead or frozen.
    """
    global _connected, _used
    _used = True
    info = _info()
    if _connected is not None and _connected[0] == info["endpoint"]:
        try:
            if await bounded(_connected[1]._connection.send("Browser.getVersion"), _PING_TIMEOUT):
                return _connected[1]
        except Exception:  # noqa: BLE001 - a broken connection or browser: connect again below
            pass
    try:
        browser = await connect(info["endpoint"], min(timeout, _PING_TIMEOUT * 2))
    except Exception:  # noqa: BLE001 - dead or frozen: the manager starts a new one
        info = _info(replace=True)
        browser = await connect(info["endpoint"], timeout)
    _connected = (info["endpoint"], browser)
    _contexts.clear()
    return browser


async def current_context(account: str, timeout: float = 10.0) -> BrowserContext:
    """In an async task on a pinned-browser worker: ``account``'s own incognito context.

    No other account's cookies or storage are visible in it. The account's
    saved login is restored into it, saved every few seconds while the task
    runs and when it ends; the context and its pages close with the task.
    """
    if not isinstance(account, str) or not account:
        raise ValueError(f"an account must be a non-empty str, not {account!r}")
    browser = await current_browser(timeout)
    context = _contexts.get(account)
    if context is not None and context._id in browser._contexts:
        return context
    context = await bounded(browser.createIncognitoBrowserContext(), timeout)
    assert context is not None
    info = _info()
    _write_owners(info, {**_owners(info), context._id: account})
    path = state.state_path(Path(info["root"]), account)
    await state.restore(browser, context, path, timeout)
    _contexts[account] = context
    _savers.append(asyncio.get_running_loop().create_task(_keep_saving(browser, context._id, path)))
    return context


async def _keep_saving(browser: Browser, context_id: str, path: Path) -> None:
    while True:
        await asyncio.sleep(_SAVE_EVERY)
        with contextlib.suppress(Exception):
            await state.save(browser, context_id, path, _TIDY_TIMEOUT)


def _owners_path(info: dict[str, Any]) -> Path:
    return Path(info["root"]) / f"worker-{info['slot']}" / "contexts.json"


def _owners(info: dict[str, Any]) -> dict[str, str]:
    """Context id -> account for the slot's browser: a killed task's contexts are saved by the next worker."""
    with contextlib.suppress(OSError, ValueError):
        found = json.loads(_owners_path(info).read_text())
        if isinstance(found, dict) and found.get("endpoint") == info["endpoint"]:
            return dict(found["contexts"])
    return {}


def _write_owners(info: dict[str, Any], owners: dict[str, str]) -> None:
    state.write_private(_owners_path(info), {"endpoint": info["endpoint"], "contexts": owners})
