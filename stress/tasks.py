"""Task functions the scenarios submit (module-level, so they pickle by reference)."""

from __future__ import annotations

import os
import signal
import time


def cpu(n: int) -> int:
    """A little CPU work with a checkable answer: the sum of squares below n."""
    return sum(i * i for i in range(n))


def expected_cpu(n: int) -> int:
    return (n - 1) * n * (2 * n - 1) // 6


def noop() -> None:
    return None


def hang() -> None:
    while True:
        time.sleep(3600)


def ignore_sigterm_and_hang() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hang()


def crash(code: int = 7) -> None:
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_self_at(marker: str) -> None:
    """Record the monotonic time, then SIGKILL this worker (for death-latency runs)."""
    with open(marker, "w") as f:
        f.write(repr(time.monotonic()))
    os.kill(os.getpid(), signal.SIGKILL)


def fail(message: str = "injected failure") -> None:
    raise ValueError(message)


def noop_arg(_: object) -> None:
    return None


TABLE_ROWS = 20  # rows of the /table page in stress.pages


async def browse(base: str, account: str) -> int:
    """As ``account``, in its own context of this worker's browser: log in if its saved login did not
    come back, check the console shows this account and no other, count the rows of the table page."""
    import sessions  # here, so that scenarios without browsers never import pyppeteer

    context = await sessions.current_context(account)
    page = await context.newPage()
    await page.goto(f"{base}/console")
    seen = await page.evaluate("() => document.body.innerText")
    if seen == "Please log in":
        await page.goto(f"{base}/login?account={account}&kind=session")
        await page.goto(f"{base}/console")
        seen = await page.evaluate("() => document.body.innerText")
    if seen != f"Console {account}":
        raise AssertionError(f"{account} sees {seen!r}: accounts are not isolated")
    await page.goto(f"{base}/table")
    return await page.evaluate("() => document.querySelectorAll('tr').length")  # type: ignore[no-any-return]


def daemon_then_hang(pid_dir: str) -> None:
    """Leave a double-forked daemon in a session of its own (its pid in ``pid_dir``), then hang."""
    _leave_daemon(pid_dir)
    hang()


def _leave_daemon(pid_dir: str) -> None:
    """Double-fork a daemon in a session of its own, holding every inherited fd; its pid in ``pid_dir``."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(os.path.join(pid_dir, str(os.getpid())), "w"):
                pass
            time.sleep(3600)
        os._exit(0)


def fork_and_return(value: object) -> object:
    """Fork, and return ``value`` in both processes: only the worker itself may report it."""
    os.fork()
    return value


def huge(megabytes: int) -> bytes:
    return b"x" * (megabytes << 20)


def hang_marked(marker: str) -> None:
    """Write the wall-clock time this attempt began to ``marker``, then hang (a deadline probe)."""
    with open(marker + ".tmp", "w") as f:
        f.write(repr(time.time()))
    os.replace(marker + ".tmp", marker)
    hang()


def daemon_then_die_at(pid_dir: str, marker: str) -> None:
    """Leave a daemon holding this worker's fds, record the monotonic time, then SIGKILL the worker."""
    _leave_daemon(pid_dir)
    while not os.listdir(pid_dir):
        time.sleep(0.001)
    kill_self_at(marker)


def slow_to_unpickle(seconds: float) -> object:
    """A result whose unpickling, in the caller, takes ``seconds``."""
    return _SlowToUnpickle(seconds)


def _rebuild(seconds: float) -> str:
    time.sleep(seconds)
    return "slow"


class _SlowToUnpickle:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[object, tuple[float]]:
        return _rebuild, (self.seconds,)


def hold_gil(seconds: float) -> int:
    """One C call that never lets the GIL go for about ``seconds`` (its heartbeat thread falls silent)."""
    return sum(range(int(seconds * 4e7)))


def spin(ms: float) -> None:
    """Burn ``ms`` of this process's CPU time (a real short task: preemption does not count)."""
    end = time.process_time() + ms / 1000
    while time.process_time() < end:
        pass


def spin_arg(ms: float) -> None:
    spin(ms)


def started_at() -> float:
    """The moment the task began, on the clock every process of this machine shares."""
    return time.monotonic()


def cluster_job(key: int, ms: float) -> int:
    """Busy for ``ms`` milliseconds, then return ``key`` (stress cluster checks every key came back)."""
    spin(ms)
    return key
