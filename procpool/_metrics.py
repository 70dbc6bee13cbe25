"""The shared-memory metrics block: layout and writers (the reader is in ``_snapshot``).

Layout, version 2 (little-endian, all offsets in bytes)::

    header   0..256    magic "PROCPOOL", version, slot count, creator pid,
                       created (wall clock), then a seqlock section written by
                       the caller only: task counters and queue depth per priority
    slot i   256 + i*352, 352 bytes each, three sections:
      +0    supervisor section (writer: the caller's supervisor thread)
            seq, name, kind, active, pid, created (monotonic), restarts, lost,
            healthy
      +96   worker section (writer: the worker process in that slot)
            seq, pid, state, attempt, task id, task started (monotonic),
            completed, failed, busy seconds, heartbeat (monotonic), fresh
            USS (its tree's, measured before its first task when a memory
            limit is set; 0: not measured); the task fields stay those of
            its last start once it is idle again (the supervisor learns of
            starts from them: see ``read_start``)
      +224  memory section (writer: the manager process's sampler)
            seq, pid sampled, USS, PSS, RSS (bytes, over the worker's whole
            process tree), processes, CPU percent, sampled at (monotonic),
            baseline USS (the first sample of that pid), exact (0: USS and
            PSS were not readable and hold RSS), then the same for the
            browser pinned to the worker: pid, USS, PSS, processes

Every section opens with a sequence counter (seqlock): its single writer
makes it odd, writes, then makes it even again. A reader copies the block,
then checks that each section's counter was even and has not moved; a section
that moved is copied again. No lock is shared between processes, so a writer
killed mid-write can never block anyone: the next writer of that section
(a replacement worker) resets its counter to even. Monotonic times are
comparable across processes (CLOCK_MONOTONIC is system-wide on Linux).

The block is created with mode 0600 (``SharedMemory``'s default) under a
``procpool-`` name, so other processes of the same user can find and watch it.
A reader refuses a block whose magic or version differs.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any, NamedTuple

__all__ = (
    "HeaderCounters",
    "MetricsBlock",
    "MemoryWriter",
    "SlotHealth",
    "SlotStart",
    "SlotWriter",
    "WorkerState",
    "read_health",
    "read_start",
)

MAGIC = b"PROCPOOL"
VERSION = 2
NAME_PREFIX = "procpool-"
HEADER_SIZE = 256
SLOT_SIZE = 352
_TASK_ID_MAX = 40  # bytes of a task id a slot holds
_READ_ATTEMPTS = 1000  # a torn section is re-read this often before giving up on it

_PREAMBLE = struct.Struct("<8sIIqd")  # magic, version, slots, creator pid, created
_COUNTERS = struct.Struct("<Q7qdq4q")  # seq, 7 counters, exec sum, exec count, depth x4
_COUNTERS_AT = 32
_SUPERVISOR = struct.Struct("<Q32sBBxxxxxxqdqqB7x")  # seq name kind active pid created restarts lost healthy
_SUPERVISOR_AT = 0
# seq pid state attempt task started completed failed busy heartbeat fresh
_WORKER = struct.Struct("<QqB3xI40sdqqddq")
_WORKER_AT = 96
# seq pid uss pss rss processes cpu sampled baseline exact, browser: pid uss pss processes
_MEMORY = struct.Struct("<QqqqqqddqB7xqqqq")
_MEMORY_AT = 224
# The three sections of a slot in one unpack, padded to their offsets (the attempt, 3x I in
# the worker section, is read only by ``read_start``; its fresh USS, the q in 24x, by ``targets``).
_SLOT = struct.Struct("<Q32sBBxxxxxxqdqqB7x 8x QqB7x40sdqqdd 24x QqqqqqddqB7xqqqq")
_SECTIONS = (_SUPERVISOR_AT, _WORKER_AT, _MEMORY_AT)
_SLOT_PADDED = struct.Struct(_SLOT.format + f"{SLOT_SIZE - _SLOT.size}x")  # for iter_unpack over all slots
_SEQ = struct.Struct("<Q")
_PUBLISH_GAP = 0.001  # seconds; submitters write the header at most about this often (publish_soon)
MB = 1024 * 1024  # figures are reported in MiB

KIND_NAMES = {0: "empty", 1: "local", 2: "remote_ssh"}


class WorkerState:
    """Worker section ``state`` values."""

    STARTING = 0
    IDLE = 1
    RUNNING = 2
    STOPPED = 3
    NAMES = ("starting", "idle", "running", "stopped")


# Indexes into HeaderCounters.states.
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = range(5)


@dataclass(slots=True)
class HeaderCounters:
    """Pool totals kept by the caller. Invariant: total == sum(states)."""

    total: int = 0
    states: list[int] = field(default_factory=lambda: [0] * 5)  # by PENDING (with RETRYING) ... CANCELLED
    retried: int = 0  # retries scheduled, over all tasks
    exec_time_sum: float = 0.0
    exec_count: int = 0
    depth: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # pending by priority, URGENT first


class _Section:
    """One seqlock section with a single writer in this process."""

    def __init__(self, buf: memoryview, offset: int, layout: struct.Struct) -> None:
        self._buf = buf
        self._offset = offset
        self._layout = layout
        seq = _SEQ.unpack_from(buf, offset)[0]
        self._seq = seq + (seq & 1)  # a writer killed mid-write left it odd

    def write(self, *values: Any) -> None:
        seq = self._seq
        _SEQ.pack_into(self._buf, self._offset, seq + 1)
        self._layout.pack_into(self._buf, self._offset, seq + 1, *values)
        self._seq = seq + 2
        _SEQ.pack_into(self._buf, self._offset, seq + 2)

    def read_own(self) -> tuple[Any, ...]:
        """Read back the values (for a writer resuming a slot)."""
        return self._layout.unpack_from(self._buf, self._offset)[1:]


class MetricsBlock:
    """The block as its creator (the executor) holds it."""

    def __init__(self, slots: int) -> None:
        size = HEADER_SIZE + SLOT_SIZE * slots
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self._creator = os.getpid()  # only it unlinks: a forked child's exit must not break the block
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        self.name = self.shm.name
        self.slots = slots
        buf = self.shm.buf
        assert buf is not None
        _PREAMBLE.pack_into(buf, 0, MAGIC, VERSION, slots, os.getpid(), time.time())
        self._header = _Section(buf, _COUNTERS_AT, _COUNTERS)
        self._header_lock = threading.Lock()  # submitters and the supervisor share one writer
        self.counters = HeaderCounters()
        self._closed = False
        self.stale = False  # counters changed since the header was last written
        self._published_at = 0.0
        self.publish()

    def publish(self) -> None:
        """Write ``counters`` to the header (call after changing them)."""
        c = self.counters
        with self._header_lock:
            self._header.write(
                c.total, *c.states, c.retried, c.exec_time_sum, c.exec_count, *c.depth,
            )  # fmt: skip
            self.stale = False
            self._published_at = time.monotonic()

    def publish_soon(self) -> bool:
        """``publish``, or, within a millisecond of the last one, mark the header ``stale``.

        Submitters call this: a burst of submissions writes the header about once a
        millisecond. The supervisor's next round, and ``get_stats()``, publish a stale
        one. Returns True if it has just become stale (the caller then wakes the supervisor).
        """
        if time.monotonic() - self._published_at > _PUBLISH_GAP:
            self.publish()
            return False
        was, self.stale = self.stale, True
        return not was

    @property
    def header_lock(self) -> threading.Lock:
        """Held while changing ``counters`` so a change and its publication are atomic."""
        return self._header_lock

    def supervisor_section(self, slot: int) -> _Section:
        """The supervisor's writer for ``slot``."""
        assert 0 <= slot < self.slots
        buf = self.shm.buf
        assert buf is not None
        return _Section(buf, HEADER_SIZE + slot * SLOT_SIZE + _SUPERVISOR_AT, _SUPERVISOR)

    def close(self) -> None:
        """Release and unlink the block. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.shm.close()
        if os.getpid() != self._creator:
            return
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


class SlotWriter:
    """A worker's writer for its own slot; resumes the counts of the slot's earlier process.

    Two threads write through it (the worker loop and the heartbeat thread);
    a lock keeps the section single-writer.
    """

    def __init__(self, shm_name: str, slot: int) -> None:
        self._shm = attach(shm_name)
        buf = self._shm.buf
        assert buf is not None
        self._section = _Section(buf, HEADER_SIZE + slot * SLOT_SIZE + _WORKER_AT, _WORKER)
        _, _, _, _, _, self.completed, self.failed, self.busy, _, _ = self._section.read_own()
        self.pid = os.getpid()
        self.fresh = 0  # bytes: see ``idle``
        self._lock = threading.Lock()
        self._state: tuple[int, int, bytes, float] = (WorkerState.STARTING, 0, b"", 0.0)
        self._closed = False

    def idle(self, fresh: int = 0) -> None:
        """Mark the worker idle (it has started) and beat its heart; ``fresh``: its tree's USS now."""
        self.fresh = fresh
        self._write(WorkerState.IDLE, 0, b"", 0.0)

    def running(self, task_id: str, attempt: int) -> None:
        """Mark the worker busy with this attempt: it starts now (the supervisor reads it here)."""
        self._write(WorkerState.RUNNING, attempt, task_id.encode()[:_TASK_ID_MAX], time.monotonic())

    def beat(self) -> bool:
        """Refresh the heartbeat only; False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._section.write(
                self.pid, *self._state, self.completed, self.failed, self.busy, time.monotonic(), self.fresh
            )
            return True

    def finished(self, ok: bool, elapsed: float) -> None:
        """Count a task the worker ran to the end (returned or raised)."""
        with self._lock:
            if ok:
                self.completed += 1
            else:
                self.failed += 1
            self.busy += elapsed
        self._write(WorkerState.IDLE, *self._state[1:])  # the start stays readable

    def _write(self, state: int, attempt: int, task: bytes, started: float) -> None:
        with self._lock:
            self._state = (state, attempt, task, started)
            self._section.write(
                self.pid,
                state,
                attempt,
                task,
                started,
                self.completed,
                self.failed,
                self.busy,
                time.monotonic(),
                self.fresh,
            )

    def close(self) -> None:
        """Detach (never unlinks: the block belongs to the executor)."""
        with self._lock:
            self._closed = True
            self._shm.close()


class SlotHealth(NamedTuple):
    """What the supervisor checks in a slot: signs of life and memory."""

    worker_pid: int  # 0 until the slot's process wrote its section
    heartbeat: float  # monotonic; 0.0 if never
    memory_pid: int  # the process the memory figures are for
    uss: int  # bytes over the tree
    baseline: int  # bytes, the first sample of memory_pid
    sampled: float  # monotonic; 0.0 if never


class SlotStart(NamedTuple):
    """A slot's last task start, as its worker wrote it before running the task."""

    pid: int  # the worker process that wrote it (0: none yet)
    running: bool  # still running it (else it has ended, or the worker is idle)
    attempt: int  # 0: no task started since that process began
    task_id: str
    started: float  # monotonic


def read_start(buf: memoryview, slot: int) -> SlotStart | None:
    """The last task start written in ``slot``; None if its writer died mid-write (torn)."""
    at = HEADER_SIZE + slot * SLOT_SIZE + _WORKER_AT
    data = _consistent_copy(buf, at, _WORKER.size)
    seq, pid, state, attempt, task, started = _WORKER.unpack(data)[:6]
    if seq & 1:
        return None
    task_id = task.rstrip(b"\0").decode(errors="replace")
    return SlotStart(pid, state == WorkerState.RUNNING, attempt, task_id, started)


def read_health(buf: memoryview, slot: int) -> SlotHealth:
    """One slot's heartbeat and memory figures, consistently."""
    f = _fresh_slot(buf, HEADER_SIZE + slot * SLOT_SIZE)
    return SlotHealth(f[10], f[17], f[19], f[20], f[26], f[25])


class MemoryWriter:
    """The writer of slots' memory sections: the manager's sampler for local slots, a link for its own."""

    def __init__(self, shm_name: str) -> None:
        self._shm = attach(shm_name)
        buf = self._shm.buf
        assert buf is not None
        self._buf = buf
        self.slots = _PREAMBLE.unpack_from(buf, 0)[2]
        self._sections = [
            _Section(buf, HEADER_SIZE + i * SLOT_SIZE + _MEMORY_AT, _MEMORY) for i in range(self.slots)
        ]

    def targets(self) -> list[tuple[int, int, bool, int]]:
        """(slot, pid, started, fresh USS) for each active local slot; started once the worker
        wrote its section (fresh: 0 if it did not measure itself).

        A remote slot's figures come from its host, written by its link process.
        """
        out = []
        for slot in range(self.slots):
            base = HEADER_SIZE + slot * SLOT_SIZE
            f = _fresh_slot(self._buf, base)
            if f[2] == 1 and f[3] and f[4] > 0:
                started = f[10] == f[4] and f[11] != WorkerState.STARTING
                worker = _WORKER.unpack(_consistent_copy(self._buf, base + _WORKER_AT, _WORKER.size))
                fresh = worker[-1] if started and worker[1] == f[4] else 0
                out.append((slot, f[4], started, fresh))
        return out

    def write(self, slot: int, *values: Any) -> None:
        """Write pid, uss, pss, rss, processes, cpu, sampled, baseline, exact and the browser's four."""
        self._sections[slot].write(*values)

    def close(self) -> None:
        self._shm.close()


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach to an existing block by name; refuses a block of another layout version.

    For processes forked from the block's creator (they share its resource
    tracker); another process watches with ``procpool._watch`` instead.
    """
    shm = shared_memory.SharedMemory(name=name)
    buf = shm.buf
    assert buf is not None
    try:
        check_layout(buf, name)
    except ValueError:
        shm.close()
        raise
    return shm


def check_layout(buf: memoryview, name: str) -> int:
    """Raise ValueError unless ``buf`` holds a block of this layout version; returns its slot count."""
    if len(buf) < HEADER_SIZE:
        raise ValueError(f"shared-memory block {name!r} is unreadable: {len(buf)} bytes is too small")
    magic, version, slots = _PREAMBLE.unpack_from(buf, 0)[:3]
    if magic != MAGIC or version != VERSION:
        raise ValueError(
            f"shared-memory block {name!r} is not a procpool metrics block of layout "
            f"version {VERSION} (magic {magic!r}, version {version}); is the procpool "
            f"that created it a different release?"
        )
    if len(buf) < HEADER_SIZE + slots * SLOT_SIZE:
        raise ValueError(f"shared-memory block {name!r} is unreadable: truncated for its {slots} slots")
    return slots  # type: ignore[no-any-return]


def active_worker_pids(name: str) -> list[int]:
    """PIDs of the workers a block lists as active (for cleanup by another process)."""
    shm = attach(name)
    try:
        buf = shm.buf
        assert buf is not None
        slots = _PREAMBLE.unpack_from(buf, 0)[2]
        pids = []
        for slot in range(slots):
            at = HEADER_SIZE + slot * SLOT_SIZE + _SUPERVISOR_AT
            sup = _SUPERVISOR.unpack(_consistent_copy(buf, at, _SUPERVISOR.size))
            if sup[3] and sup[4] > 0:
                pids.append(sup[4])
        return pids
    finally:
        shm.close()


def _consistent_copy(buf: memoryview, start: int, size: int) -> bytes:
    """Copy one section, retrying while its writer is mid-write."""
    data = bytes(buf[start : start + size])
    for _ in range(_READ_ATTEMPTS):
        seq = _SEQ.unpack_from(data)[0]
        if not seq & 1 and _SEQ.unpack_from(buf, start)[0] == seq:
            return data
        data = bytes(buf[start : start + size])
    return data  # its writer died mid-write; the figures may be torn


def _fresh_slot(buf: memoryview, base: int) -> tuple[Any, ...]:
    """Copy one slot again until none of its sections is mid-write (private to this and _snapshot)."""
    for _ in range(_READ_ATTEMPTS):
        data = bytes(buf[base : base + SLOT_SIZE])
        if all(not data[at] & 1 and data[at : at + 8] == buf[base + at : base + at + 8] for at in _SECTIONS):
            break
    return _SLOT.unpack_from(data)  # after the last attempt: its writer died mid-write, may be torn
