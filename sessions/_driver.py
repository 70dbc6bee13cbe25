"""Chromium processes and their CDP connections: the only module that imports pyppeteer.

    BrowserProcess.start ── Popen (own session, parent-death signal) ──▶ chromium --remote-debugging-port=0
         │ reads "DevTools listening on ws://..." from its log file, with a timeout
         ▼
    connect(endpoint) ── pyppeteer Connection + Browser ──▶ Browser (on the calling event loop)

- The process is started here, not by ``pyppeteer.launch``: a failed launch
  reports Chromium's own words at once, pyppeteer never touches signal
  handlers, and never downloads a browser.
- The browser gets SIGKILL when the thread that started it ends (prctl
  parent-death signal, set by ``setpriv``), so a SIGKILLed owner leaves no
  Chromium behind; its renderers follow their browser process.
- Every CDP call made here is bounded by a timeout that does not break the
  connection when it fires (``wait_for(shield(...))``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
from pyee import EventEmitter
from pyppeteer.browser import Browser
from pyppeteer.connection import Connection
from pyppeteer.errors import NetworkError
from websockets.legacy.client import connect as ws_connect

from ._errors import BrowserLaunchError, BrowserNotFoundError

__all__ = ("ENV_EXECUTABLE", "Browser", "BrowserProcess", "bounded", "connect", "find_chromium", "probe")

ENV_EXECUTABLE = "SESSIONS_CHROMIUM"  # overrides where Chromium is looked for
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome", "chrome")
_FLAGS = (
    "--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-crash-reporter", "--disable-breakpad", "--disable-dev-shm-usage", "--mute-audio",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)  # fmt: skip
_ENDPOINT = re.compile(r"DevTools listening on (ws://\S+)")
_NAVIGATING = re.compile(r"context was destroyed|Cannot find context|Target closed|Session closed")
_POLL = 0.005  # seconds between looks at the log while Chromium starts
_KILL_WAIT = 5.0  # seconds for a SIGKILLed browser to be reaped
T = TypeVar("T")
log = logging.getLogger("sessions")


def find_chromium(executable: str | os.PathLike[str] | None = None) -> str:
    """The Chromium to run: ``executable``, else $SESSIONS_CHROMIUM, else the usual names.

    Raises:
        BrowserNotFoundError: with how to install one.
    """
    for given, where in ((executable, "executable_path"), (os.environ.get(ENV_EXECUTABLE), ENV_EXECUTABLE)):
        if given:
            path = shutil.which(str(given))
            if path is None:
                raise BrowserNotFoundError(f"{where}={str(given)!r} is not an executable file")
            return path
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    raise BrowserNotFoundError(
        "no Chromium found (looked for " + ", ".join(_CANDIDATES) + "). Install it with "
        "`apt-get install chromium` on Debian or Ubuntu, or pass executable_path=... or set "
        f"{ENV_EXECUTABLE}=/path/to/chromium"
    )


@dataclass(slots=True)
class BrowserProcess:
    """A Chromium process tree this process started and owns."""

    executable: str
    profile: Path
    popen: subprocess.Popen[bytes]
    log_path: Path
    endpoint: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid  # also its process group and session

    @classmethod
    def start(cls, executable: str, profile: Path, extra_args: tuple[str, ...] = ()) -> BrowserProcess:
        """Start Chromium on ``profile``; call ``ready`` until it returns the endpoint."""
        profile.mkdir(parents=True, exist_ok=True)
        fd, log = tempfile.mkstemp(prefix="chromium-", suffix=".log")
        flags = [*_FLAGS, f"--user-data-dir={profile}", *extra_args, "about:blank"]
        if os.geteuid() == 0:
            flags.insert(0, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        argv = [executable, *flags]
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True, close_fds=True
            )
        finally:
            os.close(fd)
        return cls(executable, profile, popen, Path(log))

    def ready(self) -> str | None:
        """The endpoint once Chromium is listening; None while it starts.

        Raises:
            BrowserLaunchError: Chromium exited; the message holds its own output.
        """
        text = self.log_path.read_text(errors="replace")
        found = _ENDPOINT.search(text)
        if found:
            self.endpoint = found.group(1)
            return self.endpoint
        if self.popen.poll() is not None:
            self.kill()
            raise BrowserLaunchError(
                f"{self.executable} exited with code {self.popen.returncode} at start-up: {_tail(text)}"
            )
        return None

    async def wait_ready(self, timeout: float) -> str:
        """Wait (without blocking the loop) for the endpoint."""
        deadline = time.monotonic() + timeout
        while (endpoint := self.ready()) is None:
            if time.monotonic() > deadline:
                text = self.log_path.read_text(errors="replace")
                self.kill()
                raise BrowserLaunchError(f"Chromium did not start within {timeout:g} s: {_tail(text)}")
            await asyncio.sleep(_POLL)
        return endpoint

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The browser and every descendant (renderers, GPU, zygote), as far as they are found."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self, grace: float) -> None:
        """Wait up to ``grace`` for the browser to exit on its own (it was asked to), then kill."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole tree and reap it. Never raises; safe to call twice."""
        strays = [p for p in self.tree() if _pgid(p.pid) != self.pid]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in strays:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(_KILL_WAIT)
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _tail(text: str, lines: int = 8) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no output)"


class _Connection(Connection):  # type: ignore[misc]
    """pyppeteer's connection without the ``loop=`` argument websockets 10 deprecates."""

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        # Connection.__init__ of pyppeteer 2.0.0, less the deprecated argument.
        EventEmitter.__init__(self)
        self._url = url
        self._lastId = 0
        self._callbacks: dict[int, asyncio.Future[Any]] = {}
        self._delay = 0.0
        self._loop = loop
        self._sessions: dict[str, Any] = {}
        self._connected = False
        self._ws = ws_connect(url, max_size=None, ping_interval=None, ping_timeout=None)
        self._recv_fut = loop.create_task(self._recv_loop())
        self._closeCallback = None


async def connect(endpoint: str, timeout: float) -> Browser:
    """A pyppeteer Browser on the running loop for a Chromium already listening at ``endpoint``."""
    loop = asyncio.get_running_loop()
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_quiet_orphans)
    connection = _Connection(endpoint, loop)
    try:
        reply = await bounded(connection.send("Target.getBrowserContexts"), timeout)
        contexts = (reply or {}).get("browserContextIds", [])
        create = Browser.create(
            connection, contexts, False, None, None, lambda: connection.send("Browser.close")
        )
        return await asyncio.wait_for(create, timeout)
    except BaseException:
        await connection.dispose()
        raise


async def bounded(call: Awaitable[T], timeout: float) -> T:
    """Await a CDP call for at most ``timeout``; a late reply is dropped, the connection lives on."""
    inner = asyncio.ensure_future(call)
    try:
        return await asyncio.wait_for(asyncio.shield(inner), timeout)
    finally:
        if not inner.done():
            inner.add_done_callback(_drop)


def _quiet_orphans(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # pyppeteer sends some CDP commands without awaiting them; when a page or browser
    # goes away their futures fail with nobody to hear it. That is not news.
    if isinstance(context.get("exception"), NetworkError) and "never retrieved" in context.get("message", ""):
        log.debug("dropped: %s", context["exception"])
        return
    loop.default_exception_handler(context)


def _drop(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it: nobody waits for it any more


async def probe(browser: Browser, timeout: float) -> str | None:
    """Check a browser with two probes; None if healthy, else what failed.

    A browser-level call answers even while a page spins in JavaScript, so
    every open page is also asked to evaluate ``1 + 1``.
    """
    try:
        version: Any = await bounded(browser._connection.send("Browser.getVersion"), timeout)
        if not version:
            return "no reply to Browser.getVersion (the connection is closed)"
        pages = await bounded(browser.pages(), timeout)
        for page in pages:
            try:
                if await bounded(page.evaluate("1 + 1"), timeout) != 2:
                    return f"page {page.url} gave a wrong answer to 1 + 1"
            except NetworkError as exc:
                if not _NAVIGATING.search(str(exc)):
                    raise  # else the page is between two documents: alive

    except TimeoutError:
        return f"no answer within {timeout:g} s (frozen browser, or a page stuck in JavaScript)"
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the verdict
        return f"probe failed: {type(exc).__name__}: {exc}"
    return None
