"""A Chromium the pool runs, with its two connections on the pool loop.

    Host.launch(profile) ── lock the profile, start Chromium, connect twice ──▶ Host
        host.browser   the users' connection: every call counts as use (on_send)
        host.upkeep    the pool's own: probes, state saves, context set-up; never counts as use
    Host.close ── Browser.close (Chromium saves its profile) ── wait, then SIGKILL the tree, unlock

One host per account (isolation "browser"), or one host shared by many
accounts, each in its own incognito context (isolation "context").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._driver import Browser, OnSend, bounded, connect
from ._errors import ProfileInUseError
from ._memory import TreeMemory, measure
from ._process import BrowserProcess

__all__ = ("Host", "lock_folder", "lock_profile")

_CLOSE_GRACE = 5.0  # seconds a healthy browser gets to save its profile and exit before SIGKILL


@dataclass(eq=False)
class Host:
    """One running Chromium; see the module docstring."""

    process: BrowserProcess
    browser: Browser
    upkeep: Browser
    lock_fd: int
    healthy: bool = True
    closing: bool = False
    memory: TreeMemory | None = None
    accounts: set[str] = field(default_factory=set)  # the sessions it serves
    _closed: asyncio.Task[None] | None = None

    @classmethod
    async def launch(
        cls, executable: str, profile: Path, launch_timeout: float, call_timeout: float, on_send: OnSend
    ) -> Host:
        """Start Chromium on ``profile`` (locked first) and connect to it.

        Raises:
            ProfileInUseError: another browser runs on that profile.
            BrowserLaunchError: Chromium did not start.
        """
        lock_fd = lock_profile(profile)
        process = BrowserProcess.start(executable, profile)
        try:
            await process.wait_ready(launch_timeout)
            browser = await connect(process.endpoint, call_timeout, on_send)
            upkeep = await connect(process.endpoint, call_timeout)
        except BaseException:
            await asyncio.get_running_loop().run_in_executor(None, process.kill)
            os.close(lock_fd)
            raise
        host = cls(process, browser, upkeep, lock_fd)
        host.memory = await asyncio.get_running_loop().run_in_executor(None, host.measure)
        return host

    def alive(self) -> bool:
        return self.healthy and self.process.alive()

    def measure(self) -> TreeMemory:
        """USS/PSS of the browser's whole tree (~20 ms: call it off the loop)."""
        return measure(self.process.tree())

    async def close(self) -> None:
        """Let a live browser save its profile and exit, then kill what is left and unlock.

        Idempotent: a second caller waits for the first one's close to end.
        """
        self.closing = True
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closed)

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        grace = 0.0
        if self.alive():
            with contextlib.suppress(Exception):
                await bounded(self.upkeep.close(), _CLOSE_GRACE)
                grace = _CLOSE_GRACE
        else:  # failed (frozen, perhaps): killed first, so the connections close at once, not after a wait
            await loop.run_in_executor(None, self.process.kill)
        for connection in (self.browser, self.upkeep):
            with contextlib.suppress(Exception):
                await bounded(connection.disconnect(), _CLOSE_GRACE)
        await loop.run_in_executor(None, self.process.stop, grace)
        os.close(self.lock_fd)


def lock_profile(profile: Path) -> int:
    """Lock a profile directory for one browser; the lock ends with the fd (or the process)."""
    busy = (
        f"profile {profile} is in use by another browser (another SessionPool or process); "
        f"two browsers on one profile would corrupt it"
    )
    return lock_folder(profile, ".sessions.lock", busy)


def lock_folder(folder: Path, name: str, busy: str) -> int:
    """Create ``folder`` (0700) and hold an exclusive lock on its file ``name``; its fd.

    Raises:
        ProfileInUseError: with ``busy``, when another holds it.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ProfileInUseError(busy) from None
    return fd
