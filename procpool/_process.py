"""Process edges: the parent-death guard, and the sweeps after a process is gone (worker groups, sockets).

Signalling a worker and everything it started is ``_containment``'s (cgroups,
or a subreaper's tree); what is here is what runs before a worker serves
(following its owner) and after the owner is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Iterable
from multiprocessing import forkserver
from multiprocessing import process as mp_process
from multiprocessing import util as mp_util
from typing import Any

import psutil

from ._metrics import active_worker_pids

__all__ = (
    "current_pid",
    "guard_owner",
    "own",
    "own_temp_dir",
    "process_ended",
    "pid_alive",
    "kill_worker_groups",
    "remove_sockets",
    "set_parent_death_signal",
    "signal_group",
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent thread ends.

    Returns False where prctl is not available (the caller then relies on the
    orderly shutdown and on the manager's cleanup).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0  # type: ignore[no-any-return]


def guard_owner(signum: int, owner_pid: int) -> bool:
    """Arm the parent-death signal so this process follows its owner; False if the owner is gone.

    Under fork and spawn the parent is the owner. Under forkserver the parent is
    the fork server, which exits when the owner does (its "alive" pipe closes),
    so the signal still follows the owner, one step later. The parent is read
    before arming: had it died before, the signal would be tied to a reaper.
    """
    release_fork_server()
    parent = os.getppid()
    set_parent_death_signal(signum)
    if os.getppid() != parent:
        return False  # the parent died before the signal was armed
    return parent == owner_pid or pid_alive(owner_pid)


def release_fork_server() -> None:
    """In a child of the fork server, close its copy of the server's "alive" pipe.

    Every process the fork server starts inherits the write end of that pipe,
    and the server exits, so that the parent-death signal of its children
    fires, only once every copy is closed: while a worker kept one, the
    owner's death reached nobody. A task in this process that needs a fork
    server of its own gets a new one.
    """
    server: Any = forkserver._forkserver
    fd = server._forkserver_alive_fd
    if fd is not None and server._forkserver_pid is None:  # a child of the server, not its owner
        server._forkserver_alive_fd = None
        try:
            os.close(fd)
        except OSError:
            pass


def _own_fork_server_after_fork() -> None:
    """In a child made by os.fork: forget the parent's fork server (a new one starts on need).

    multiprocessing would waitpid() the parent's server, which is not this process's
    child, and fail; a pool made in the child (forkserver is the default from 3.12)
    could not start. The child's copy of the server's "alive" pipe is closed too, so the
    parent's server still ends with the parent.
    """
    server: Any = forkserver._forkserver
    fd = server._forkserver_alive_fd
    if server._forkserver_pid is None:
        return  # this process did not start one: a child of the server keeps what it inherits
    server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None
    server._lock = threading.Lock()  # another thread may have held it at the fork
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


_ours: weakref.WeakSet[Any] = weakref.WeakSet()  # the pool processes this process started


def own(process: Any) -> None:
    """Note a started pool process (a worker, a link, the manager): see ``_disown_after_fork``."""
    _ours.add(process)


def _disown_after_fork() -> None:
    """In a child made by os.fork: the parent's pool processes are not its children.

    multiprocessing lists them still, and at a normal exit would join() them and
    fail ("can only join a child process"), skipping the rest of its exit handlers.
    """
    for process in list(_ours):
        mp_process._children.discard(process)  # type: ignore[attr-defined]
    _ours.clear()


_pid = os.getpid()  # kept by a fork handler: os.getpid() is a system call, and submit asks every time


def current_pid() -> int:
    """This process's pid (cheaper than ``os.getpid()``)."""
    return _pid


def _new_pid_after_fork() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_pid_after_fork)
    os.register_at_fork(after_in_child=_own_fork_server_after_fork)
    os.register_at_fork(after_in_child=_disown_after_fork)


def process_ended(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie its parent has not reaped yet counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def own_temp_dir() -> str | None:
    """This process's multiprocessing folder (``/tmp/pymp-*``) if this process made it, else None.

    A forked child shares its parent's folder, and only the process that made it removes
    it, in exit hooks that SIGKILL skips. Read from multiprocessing's own record of that
    hook; None if the record is not as expected.
    """
    folder = mp_process.current_process()._config.get("tempdir")  # type: ignore[attr-defined]
    if not folder:
        return None
    hooks = list(getattr(mp_util, "_finalizer_registry", {}).values())
    if any(
        getattr(h, "_pid", None) == os.getpid() and folder in (getattr(h, "_args", None) or ()) for h in hooks
    ):
        return str(folder)
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, signum: int, strays: Iterable[psutil.Process] = ()) -> None:
    """Send ``signum`` to process group ``pgid`` and to ``strays``. Never raises."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in strays:
        try:
            proc.send_signal(signum)  # psutil checks the PID was not reused
        except psutil.Error:
            pass


def kill_worker_groups(shm_name: str) -> None:
    """SIGKILL the group of every active worker listed in a metrics block. Never raises.

    Run by the manager process when the caller died without shutting down.
    """
    try:
        pids = active_worker_pids(shm_name)
    except Exception:  # noqa: BLE001 - the block is gone: nothing to find the workers by
        return
    for pid in pids:
        signal_group(pid, signal.SIGKILL)


def remove_sockets(addresses: Iterable[str]) -> None:
    """Remove the listening sockets of a process that was killed outright, and their folder.

    Its own ``/tmp/pymp-*`` folder goes once empty; never this process's folder, which a
    forked child shares (and multiprocessing here still uses).
    """
    own_folder = mp_process.current_process()._config.get("tempdir")  # type: ignore[attr-defined]
    for address in addresses:
        with contextlib.suppress(OSError):
            os.unlink(address)
        folder = os.path.dirname(address)
        if folder != own_folder:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty
