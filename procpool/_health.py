"""Pure verdicts on a worker's signs of life and memory; the supervisor acts on them.

Nothing here touches processes or clocks: the supervisor passes the slot's
figures (``SlotHealth``) and ``now`` in.
"""

from __future__ import annotations

import enum

from ._metrics import SlotHealth

__all__ = ("Verdict", "heartbeat_interval", "judge", "parse_stat", "recycle_limit", "silent_for")

_BEATS_PER_TIMEOUT = 4  # a worker may miss three beats before it is judged hung
_MAX_BEAT_INTERVAL = 1.0  # seconds; beats cost a few microseconds, so no need to be sparing


class Verdict(enum.Enum):
    OK = "ok"
    HUNG = "hung"  # no heartbeat within the timeout: kill it, retry its task
    RECYCLE = "recycle"  # over the memory limit: replace it once its task ends
    OUT_OF_MEMORY = "out of memory"  # over the limit mid-task with the hard limit on: kill it


def heartbeat_interval(timeout: float | None) -> float:
    """How often a worker beats for a given heartbeat timeout."""
    if timeout is None:
        return _MAX_BEAT_INTERVAL
    return min(timeout / _BEATS_PER_TIMEOUT, _MAX_BEAT_INTERVAL)


def parse_stat(text: str) -> tuple[str, int]:
    """A process's state letter and CPU time in clock ticks, from its ``/proc/<pid>/stat``.

    A busy task is not a hung one: a C call that holds the GIL silences the
    heartbeat thread, but its CPU time still grows. A stopped process (T, t)
    or one whose CPU time stands still is what "hung" means.
    """
    rest = text[text.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return rest[0], int(rest[11]) + int(rest[12])  # state; utime + stime


def silent_for(now: float, spawned: float, pid: int, health: SlotHealth) -> float:
    """Seconds since worker ``pid`` last showed life (its start, or ``spawned`` as
    the caller's latest other sign of life, counts as one)."""
    beat = health.heartbeat if health.worker_pid == pid else 0.0  # else it is the last process's
    return now - max(spawned, beat)


def recycle_limit(limit: int, baseline: int) -> int:
    """The USS at which a worker is recycled: the limit, or twice its fresh size if larger.

    A fresh worker already near or past the limit would otherwise be replaced
    after every task by one just as large: a recycle loop.
    """
    return max(limit, 2 * baseline)


def judge(
    now: float,
    spawned: float,
    pid: int,
    health: SlotHealth,
    *,
    heartbeat_timeout: float | None,
    memory_limit: int | None,
    hard: bool,
    busy: bool,
) -> Verdict:
    """What to do with worker ``pid`` given its slot's figures."""
    if heartbeat_timeout is not None and silent_for(now, spawned, pid, health) > heartbeat_timeout:
        return Verdict.HUNG
    if memory_limit is None or health.memory_pid != pid or not health.baseline:
        return Verdict.OK  # no limit, no sample of this process yet, or it is still starting
    if health.uss <= recycle_limit(memory_limit, health.baseline):
        return Verdict.OK
    return Verdict.OUT_OF_MEMORY if hard and busy else Verdict.RECYCLE
