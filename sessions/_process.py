"""Chromium processes this process starts and owns; no CDP here.

    BrowserProcess.start ── Popen (own session, parent-death signal) ──▶ chromium --remote-debugging-port=0
         │ reads "DevTools listening on ws://..." from its log, with a timeout
         ▼
    endpoint ── _driver.connect ──▶ a pyppeteer Browser

- A failed launch reports Chromium's own words at once; no browser download.
- The browser gets SIGKILL when the thread that started it ends (prctl
  parent-death signal, set by ``setpriv``), so a SIGKILLed owner leaves no
  Chromium behind; its renderers follow their browser process.
- Chromium's log and its temporary files (``TMPDIR``: the ``org.chromium.*``
  folders) stay inside the profile, so nothing of a browser is left in /tmp
  (a profile too deep for Chromium's socket path gets a short private
  ``sessions-tmp-<pid>-*`` folder instead, removed with the browser).
- Temporary roots carry their owner's pid; the next pool removes those whose
  owner is gone (a SIGKILLed owner cannot clean up after itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ._errors import BrowserLaunchError, BrowserNotFoundError

__all__ = ("ENV_EXECUTABLE", "BrowserProcess", "find_chromium", "temporary_root")

ENV_EXECUTABLE = "SESSIONS_CHROMIUM"  # overrides where Chromium is looked for
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome", "chrome")
_FLAGS = (
    "--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-crash-reporter", "--disable-breakpad", "--disable-dev-shm-usage", "--mute-audio",
    "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)  # fmt: skip
_ENDPOINT = re.compile(r"DevTools listening on (ws://\S+)")
_POLL = 0.005  # seconds between looks at the log while Chromium starts
_KILL_WAIT = 5.0  # seconds for a SIGKILLed browser to be reaped
_LOG = "chromium.log"
_TMP = "tmp"
_SHORT_TMP = 50  # longest TMPDIR kept in the profile: Chromium's socket path in it must fit 108 bytes


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


def temporary_root(prefix: str) -> Path:
    """A new private temporary folder ``<prefix>-<pid>-*``, after removing those of dead owners."""
    base = Path(tempfile.gettempdir())
    stale = []
    for path in base.glob(f"{prefix}-*-*"):
        owner = path.name[len(prefix) + 1 :].partition("-")[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)) and path.stat().st_uid == os.geteuid():
            stale.append(path)
    if stale:  # not while a browser of a dead owner still winds down in it (it would write on)
        running = " ".join(" ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"]))
        for path in stale:
            if str(path) not in running:
                shutil.rmtree(path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-"))


@dataclass(slots=True)
class BrowserProcess:
    """A Chromium process tree this process started and owns."""

    executable: str
    profile: Path
    popen: subprocess.Popen[bytes]
    tmp: Path
    endpoint: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid  # also its process group and session

    @property
    def log_path(self) -> Path:
        return self.profile / _LOG

    @classmethod
    def start(cls, executable: str, profile: Path) -> BrowserProcess:
        """Start Chromium on ``profile``; call ``ready`` until it returns the endpoint."""
        profile.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(profile, 0o700)
        tmp = profile / _TMP
        if len(str(tmp)) > _SHORT_TMP:  # a deep profile: a short private folder, swept like the roots
            tmp = temporary_root("sessions-tmp")
        tmp.mkdir(exist_ok=True, mode=0o700)
        flags = [*_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        if os.geteuid() == 0:
            flags.insert(0, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        argv = [executable, *flags]
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        env = {**os.environ, "TMPDIR": str(tmp)}
        fd = os.open(profile / _LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                close_fds=True, env=env,
            )  # fmt: skip
        finally:
            os.close(fd)
        return cls(executable, profile, popen, tmp)

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

    def wait_ready_blocking(self, timeout: float) -> str:
        """``wait_ready`` for a thread with no event loop."""
        deadline = time.monotonic() + timeout
        while (endpoint := self.ready()) is None:
            if time.monotonic() > deadline:
                self._give_up(timeout)
            time.sleep(_POLL)
        return endpoint

    async def wait_ready(self, timeout: float) -> str:
        """Wait (without blocking the loop) for the endpoint."""
        deadline = time.monotonic() + timeout
        while (endpoint := self.ready()) is None:
            if time.monotonic() > deadline:
                self._give_up(timeout)
            await asyncio.sleep(_POLL)
        return endpoint

    def _give_up(self, timeout: float) -> None:
        text = self.log_path.read_text(errors="replace")
        self.kill()
        raise BrowserLaunchError(f"Chromium did not start within {timeout:g} s: {_tail(text)}")

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
        """SIGKILL the whole tree and reap it; its temporary files go too. Never raises; safe twice."""
        strays = [p for p in self.tree() if _pgid(p.pid) != self.pid]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in strays:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(_KILL_WAIT)
        shutil.rmtree(self.tmp, ignore_errors=True)
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
