"""A catalogue of misbehaving task functions, reused by every test that needs one.

Each is a module-level function so it pickles by reference; tests also
submit lambdas and closures to check that cloudpickle carries them by value.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def double(x: int) -> int:
    return x * 2


def noop() -> None:
    return None


def sleep_then(seconds: float, value: object = None) -> object:
    time.sleep(seconds)
    return value


def hang() -> None:
    """Sleeps for ever; honours SIGTERM."""
    while True:
        time.sleep(3600)


def write_time_then_hang(path: str) -> None:
    """Write the wall-clock time it began to ``path``, then hang (honours SIGTERM)."""
    Path(path).write_text(repr(time.time()))
    hang()


def ignore_sigterm_and_hang() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(3600)


def busy_loop_python() -> None:
    while True:
        pass


def busy_loop_c() -> None:
    """Blocks in C with the GIL held (a huge regex backtrack would do too)."""
    libc = ctypes.CDLL(None)
    libc.pause()  # waits for a signal, in C


def exit_abruptly(code: int = 3) -> None:
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def segfault() -> None:
    ctypes.string_at(0)


def raise_value_error(message: str = "boom") -> None:
    raise ValueError(message)


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


class NeedsTwoArgsError(Exception):
    """Pickles, but cannot be unpickled (the classic Exception __reduce__ trap)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}-{b}")


def raise_unpicklable() -> None:
    raise UnpicklableError()


def raise_needs_two_args() -> None:
    raise NeedsTwoArgsError("x", "y")


def return_unpicklable() -> object:
    return threading.Lock()


def return_huge(megabytes: int = 64) -> bytes:
    return b"x" * (megabytes * 1024 * 1024)


def spawn_grandchild_and_hang(pid_file: str) -> None:
    """Starts a child that sleeps for ever, records its pid, then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    _write_atomically(pid_file, str(child.pid))
    hang()


def spawn_escapee_and_hang(pid_file: str) -> None:
    """Starts a child in its own session (outside the worker's group), then hangs."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True)
    _write_atomically(pid_file, str(child.pid))
    hang()


def _write_atomically(path: str, text: str) -> None:
    """So that a reader polling for ``path`` never sees it half-written."""
    Path(path + ".tmp").write_text(text)
    os.replace(path + ".tmp", path)


def fail_until(marker_dir: str, failures: int, log_path: str | None = None) -> str:
    """Raises on the first ``failures`` attempts (counted in files), then succeeds."""
    path = Path(marker_dir)
    count = len(list(path.iterdir()))
    (path / f"attempt-{count}").touch()
    if log_path is not None:
        record_order(log_path, f"flaky-{count}")
    if count < failures:
        raise RuntimeError(f"attempt {count} fails on purpose")
    return f"ok after {count}"


def die_until(marker_dir: str, deaths: int) -> str:
    """Kills its own worker on the first ``deaths`` attempts, then succeeds."""
    path = Path(marker_dir)
    count = len(list(path.iterdir()))
    (path / f"attempt-{count}").touch()
    if count < deaths:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"ok after {count}"


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Blocks until ``path`` exists (the test's way to hold a worker busy without sleeping)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return path


def record_order(log_path: str, label: str, then_sleep: float = 0.0) -> str:
    with open(log_path, "a") as f:
        f.write(label + "\n")
    time.sleep(then_sleep)
    return label


_held: list[bytearray] = []  # memory a task keeps after it returns, as a leak would


def hold_memory(mb: int, then_sleep: float = 0.0) -> int:
    """Allocate ``mb`` MiB, touch every page, keep it; returns the worker's pid."""
    block = bytearray(mb * 1024 * 1024)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))  # calloc'd pages count once written
    _held.append(block)
    time.sleep(then_sleep)
    return os.getpid()


def interpreter() -> str:
    return sys.executable


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def send_pid(channel: Any) -> None:
    """An initializer: tell the test this worker's pid over a multiprocessing queue."""
    channel.put(os.getpid())


def remember(value: object) -> None:
    """An initializer: leave ``value`` in the worker's environment for ``initialized`` to read.

    (The environment, not a global: remote tests send this module by value, which gives
    each function its own copy of the module's globals.)
    """
    os.environ["PROCPOOL_TEST_INITIALIZED"] = str(value)


def initialized() -> str | None:
    return os.environ.get("PROCPOOL_TEST_INITIALIZED")


def fork_and_return(value: object) -> object:
    """Forks, and returns ``value`` in both processes: the copy must never act as the worker."""
    os.fork()
    return value


def _daemonize(pid_file: str, new_session: bool) -> None:
    """Double-fork a process that keeps every inherited fd open and sleeps; record its pid."""
    if os.fork() == 0:
        if new_session:
            os.setsid()
        if os.fork() == 0:
            _write_atomically(pid_file, str(os.getpid()))
            time.sleep(3600)
        os._exit(0)
    while not os.path.exists(pid_file):
        time.sleep(0.001)


def daemon_then_exit(pid_file: str, code: int = 5) -> None:
    """Leaves a double-forked daemon holding the worker's fds, then the worker exits at once."""
    _daemonize(pid_file, new_session=True)
    os._exit(code)


def daemon_then_hang(pid_file: str) -> None:
    """Leaves a double-forked daemon in a session of its own, then hangs until killed."""
    _daemonize(pid_file, new_session=True)
    hang()


def leave_group_and_hang() -> None:
    """Moves the worker itself into its parent's process group (a signal to its own group misses it)."""
    os.setpgid(0, os.getpgid(os.getppid()))
    hang()


def daemon_then_return(pid_file: str) -> str:
    """Leaves a double-forked daemon in a session of its own, and returns at once."""
    _daemonize(pid_file, new_session=True)
    return pid_file


def hold_gil(seconds: float) -> int:
    """Busy in one C call that never lets the GIL go (the heartbeat thread falls silent)."""
    return sum(range(int(seconds * 4e7)))  # builtin sum over a range: no bytecode runs meanwhile


def _rebuilt_slowly(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


class SlowToUnpickle:
    """A result whose unpickling (in the caller) takes ``seconds``."""

    def __init__(self, seconds: float, value: object) -> None:
        self.seconds, self.value = seconds, value

    def __reduce__(self) -> tuple[Any, tuple[float, object]]:
        return _rebuilt_slowly, (self.seconds, self.value)


def return_slow_to_unpickle(seconds: float, value: object) -> SlowToUnpickle:
    return SlowToUnpickle(seconds, value)


class _KillsWhenPickled:
    """A result whose pickling SIGKILLs the worker: it has asked for its next task by then."""

    def __reduce__(self) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def return_death_on_pickling() -> object:
    return _KillsWhenPickled()


def deafen() -> int:
    """Make this worker ignore SIGTERM from now on (for later tasks too), and return its pid."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return os.getpid()


def second_attempt_wins(marker: str, first_seconds: float) -> str:
    """Attempt 1 (no marker yet) records its pid in ``marker`` and sleeps; a later attempt returns at once."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        time.sleep(first_seconds)
        return "first"
    return "second"


def record_run(folder: str, key: int) -> int:
    """Leave a file per run (one for each time this task really ran), then return ``key``."""
    Path(folder, f"{key}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(0.01)
    return key


def companion_pid() -> int:
    """The pid of this worker's companion process (a pinned browser, say)."""
    from procpool import companion_info

    return int(companion_info()["pid"])


def mark_then_wait(marker: str, gate: str) -> str:
    """Create ``marker`` (the task has started), then block until ``gate`` exists; returns ``gate``."""
    Path(marker).touch()
    return wait_for_file(gate, 60)
