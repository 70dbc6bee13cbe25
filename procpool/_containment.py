"""Containment: every process a task starts can be found and killed, however it detached.

    supervisor ── Jails.path_for(worker) ──▶ a cgroup of its own (cgroup v2, where one is writable)
    worker     ── enter(path) at start ────▶ moves itself into it, or else becomes a child subreaper
    supervisor ── Jail.signal / Jail.kill ─▶ every process in the cgroup, or in the worker's tree
    manager    ── kill_tree(root) ─────────▶ every pool cgroup at once, when the owner died

- cgroup v2: a process stays in its cgroup through double forks, new sessions
  and new groups; it can leave only by writing to another cgroup's
  ``cgroup.procs``, which takes write access there (root has it: out of reach,
  as is a process that a setuid helper starts elsewhere). ``cgroup.kill``
  ends all of them at once.
- Subreaper (no writable cgroup): ``PR_SET_CHILD_SUBREAPER`` makes the worker
  the parent of every orphan among its descendants, so its tree stays whole
  while it lives. A kill first stops the tree (a stopped process cannot fork)
  and then kills it. Once the worker itself has died its orphans belong to
  init: those seen at the last signal are still killed (psutil checks the pid
  was not reused); any started after that are out of reach.

Signals always go to pids as well as to the worker's group: a task can move
its worker into another group.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import psutil

__all__ = ("Jail", "Jails", "enter", "kill_orphans", "kill_tree", "reap")

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
_PREFIX = "procpool-"
_STOP_ROUNDS = 5  # tree walks while stopping a tree: each catches what forked during the last


def _cgroup2_base() -> Path | None:
    """This process's own cgroup v2 directory, if it can make cgroups under it.

    ``PROCPOOL_NO_CGROUP=1`` in the environment forces the subreaper fallback.
    """
    if not sys.platform.startswith("linux") or os.environ.get("PROCPOOL_NO_CGROUP") == "1":
        return None
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        own = next(line[3:] for line in lines if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    for fields in mounts:
        if len(fields) > 2 and fields[2] == "cgroup2":
            base = Path(fields[1]) / own.lstrip("/")
            if (base / "cgroup.procs").exists() and os.access(base, os.W_OK):
                return base
    return None


class Jails:
    """The pool's cgroups: one directory for the pool, one inside it per worker process.

    ``root`` is None where no cgroup can be made; workers are then subreapers.
    """

    def __init__(self) -> None:
        self.root: Path | None = None
        base = _cgroup2_base()
        if base is None:
            return
        _sweep_stale(base)
        root = base / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            root.mkdir(mode=0o755)
        except OSError as exc:
            log.debug("no cgroup for this pool (%s); workers are subreapers instead", exc)
            return
        self.root = root

    def path_for(self, key: str) -> str | None:
        """A fresh cgroup for the worker process ``key``, or None (then it is a subreaper)."""
        if self.root is None:
            return None
        path = self.root / key
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            pass
        except OSError:
            return None
        return str(path)

    def close(self) -> None:
        """Kill whatever is left in the pool's cgroups and remove them. Never raises."""
        if self.root is not None:
            kill_tree(str(self.root), remove=True)
            self.root = None


class Jail:
    """One worker process and everything it started, wherever that went."""

    def __init__(self, pid: int, cgroup: str | None) -> None:
        self.pid = pid
        self.cgroup = Path(cgroup) if cgroup else None
        self._seen: dict[int, psutil.Process] = {}  # members seen at the last signal
        # Taken now, while the pid is surely the worker's: signals through it check that the
        # pid was not reused (a reaped worker's pid may belong to another process by then).
        self._me = _process(pid) if pid > 0 else None

    def members(self) -> list[psutil.Process]:
        """The processes in the jail now, the worker included while it lives."""
        if self.cgroup is not None:
            try:
                pids = [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]
            except OSError:
                pids = []
            found = [p for p in map(_process, pids) if p is not None]
        else:
            worker = _process(self.pid)
            found = [] if worker is None else [worker, *_children(worker)]
        return found

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every member and to the worker's group. Never raises.

        The members are listed before anything is signalled, and the worker is
        signalled last: a subreaper that died first would hand its adopted
        orphans to init before they were found.
        """
        if self.pid <= 0:
            return  # no process yet (0 and -1 would mean this group, or everyone)
        for proc in self._remember(self.members()):
            if proc.pid != self.pid:
                _send(proc, signum)
        _send(self._worker(), signum)
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL every member (and what was seen before). Never raises, never waits."""
        if self.pid <= 0:
            return
        if self.cgroup is not None and _write(self.cgroup / "cgroup.kill", "1"):
            # The worker itself too: started by a fork server (not our child), it may be
            # stopped or killed before it moved into its cgroup and its own group.
            _send(self._worker(), signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
            return
        _send(self._worker(), signal.SIGSTOP)  # stopped, it still adopts orphans, and cannot die yet
        members = self.members()
        for _ in range(_STOP_ROUNDS):  # stop them all first: a stopped process cannot fork
            for proc in members:
                _send(proc, signal.SIGSTOP)
            again = self.members()
            if {p.pid for p in again} <= {p.pid for p in members}:
                break
            members = again
        for proc in self._remember(members):
            if proc.pid != self.pid:
                _send(proc, signal.SIGKILL)
        _send(self._worker(), signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)

    def _worker(self) -> psutil.Process | None:
        return self._me

    def remove(self) -> bool:
        """Remove the worker's cgroup once empty; False while something is still in it."""
        if self.cgroup is None:
            return True
        try:
            self.cgroup.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def _remember(self, members: list[psutil.Process]) -> list[psutil.Process]:
        for proc in members:
            self._seen.setdefault(proc.pid, proc)
        return list(self._seen.values())


def enter(cgroup: str | None) -> bool:
    """In a new worker: move into its cgroup, or else become a child subreaper.

    Returns True for a subreaper: it must then reap the orphans it adopts (``reap``).
    """
    if cgroup is not None and _write(Path(cgroup) / "cgroup.procs", "0"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0  # type: ignore[no-any-return]


def reap() -> None:
    """Reap every child that has exited: orphans a subreaper adopted would stay zombies.

    Called between tasks: a task's own subprocess that ended meanwhile is reaped
    too (its Popen then reads a return code of 0), the price of the fallback.
    """
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def kill_tree(root: str, remove: bool = False) -> None:
    """SIGKILL every process in a cgroup and in all cgroups under it (``cgroup.kill``). Never raises.

    With ``remove``, also remove them once empty (waiting up to a second).
    """
    _write(Path(root) / "cgroup.kill", "1")
    if remove:
        _remove_tree(Path(root), wait=1.0)


def _sweep_stale(base: Path) -> None:
    """Kill and remove the cgroups of pools whose owner died without cleaning up."""
    for path in base.glob(f"{_PREFIX}*"):
        try:
            owner = int(path.name[len(_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if not psutil.pid_exists(owner):
            kill_tree(str(path), remove=True)


def _remove_tree(root: Path, wait: float) -> None:
    """rmdir a cgroup and those under it, waiting up to ``wait`` s for killed members to exit."""
    deadline = time.monotonic() + wait
    inner = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for path in [*inner, root]:
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("cgroup %s is still busy; left in place", path)
                    return
                time.sleep(0.01)


def _write(path: Path, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        return False
    return True


def _send(proc: psutil.Process | None, signum: int) -> None:
    if proc is not None:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)  # psutil checks the pid was not reused


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def kill_orphans() -> None:
    """In a subreaper: kill and reap every descendant (orphans adopted from tasks). Never raises."""
    me = _process(os.getpid())
    for _ in range(_STOP_ROUNDS):  # each round reaps what the last one's deaths handed up to us
        found = [] if me is None else _children(me)
        if not found:
            return
        for proc in found:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(found, timeout=1.0)  # reaps the direct children among them
