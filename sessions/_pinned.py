"""A browser pinned to each procpool worker slot: sessions' one piece of procpool integration.

    DistributedExecutor(companion=pinned_browsers())
        manager process: PinnedBrowsers(slot) ── starts Chromium on profile worker-<slot> ──▶ owns its PID
    async task in a worker: await current_browser()
        ── procpool.companion_info() ──▶ endpoint ── connect (cached for the worker's life) ──▶ Browser

The manager owns the browser, so a worker killed at a deadline leaves it
running: its replacement reconnects in milliseconds and finds the same
cookies. A browser that died or stopped answering is replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._driver import Browser, BrowserProcess, bounded, connect, find_chromium
from ._errors import BrowserLaunchError

__all__ = ("PinnedBrowsers", "current_browser", "pinned_browsers")

_PING_TIMEOUT = 2.0  # seconds a cached connection gets to answer before the browser is replaced
_connected: tuple[str, Browser] | None = None  # in a worker: the endpoint and its connection


@dataclass(frozen=True, slots=True)
class PinnedBrowsers:
    """Starts one Chromium per worker slot, in the manager process (see ``pinned_browsers``)."""

    profile_root: str | None = None
    executable_path: str | None = None
    launch_timeout: float = 30.0

    def __call__(self, slot: int) -> _Pinned:
        executable = find_chromium(self.executable_path)
        temporary = self.profile_root is None
        root = Path(self.profile_root or Path(tempfile.gettempdir()) / f"procpool-browsers-{os.getpid()}")
        process = BrowserProcess.start(executable, root / f"worker-{slot}")
        deadline = time.monotonic() + self.launch_timeout
        while process.ready() is None:
            if time.monotonic() > deadline:
                process.kill()
                raise BrowserLaunchError(f"Chromium did not start within {self.launch_timeout:g} s")
            time.sleep(0.005)
        return _Pinned(process, root if temporary else None)

    async def warm_up(self) -> None:
        """Run by procpool in each worker as it starts: connect now, not in the first task."""
        await current_browser()


class _Pinned:
    """A pinned browser as procpool's manager holds it (procpool's Companion protocol)."""

    def __init__(self, process: BrowserProcess, temporary_root: Path | None) -> None:
        self.process = process
        self.pid = process.pid
        self.info: dict[str, Any] = {"endpoint": process.endpoint, "pid": process.pid}
        self._temporary_root = temporary_root

    def alive(self) -> bool:
        return self.process.alive()

    def kill(self) -> None:
        self.process.kill()  # the profile stays for the replacement: logins survive

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
        profile_root: where the per-slot profiles live (kept after the pool ends);
            a temporary folder by default, removed with the pool.
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


async def current_browser(timeout: float = 10.0) -> Browser:
    """In an async task on a worker of a pool made with ``companion=pinned_browsers()``:
    this worker's browser, as a pyppeteer Browser on the worker's event loop.

    Reuses the worker's connection while the browser answers; reconnects to a
    browser its predecessor used; asks for a new browser if this one is dead
    or frozen.
    """
    global _connected
    from procpool import companion_info  # the integration point; sessions imports fine without it

    info = companion_info()
    if _connected is not None and _connected[0] == info["endpoint"]:
        try:
            if await bounded(_connected[1]._connection.send("Browser.getVersion"), _PING_TIMEOUT):
                return _connected[1]
        except Exception:  # noqa: BLE001 - a broken connection or browser: connect again below
            pass
    try:
        browser = await connect(info["endpoint"], min(timeout, _PING_TIMEOUT * 2))
    except Exception:  # noqa: BLE001 - dead or frozen: the manager starts a new one
        info = companion_info(replace=True)
        browser = await connect(info["endpoint"], timeout)
    _connected = (info["endpoint"], browser)
    return browser
