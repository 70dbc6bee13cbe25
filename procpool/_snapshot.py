"""Reading the whole metrics block into plain data (``get_stats()``, ``top``, Prometheus), with no IPC.

The layout and the seqlock rules are in ``_metrics``. A slot is taken from
one copy of the block if each of its sections was even there and did not
move in a second copy; otherwise that slot alone is read again.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from ._metrics import (
    _COUNTERS,
    _COUNTERS_AT,
    _PREAMBLE,
    _SECTIONS,
    _SLOT_PADDED,
    HEADER_SIZE,
    KIND_NAMES,
    MB,
    SLOT_SIZE,
    WorkerState,
    _consistent_copy,
    _fresh_slot,
)

__all__ = ("read_snapshot",)


def read_snapshot(buf: memoryview) -> dict[str, Any]:
    """Read the whole block into plain data, consistently per section, with no IPC."""
    snap = bytes(buf)
    _, version, slots, creator, created = _PREAMBLE.unpack_from(snap, 0)
    header = _consistent_copy(buf, _COUNTERS_AT, _COUNTERS.size)
    workers, active, memory = _read_workers(buf, snap, slots)
    (_, total, pending, running, completed, failed, cancelled, retried,
     exec_sum, exec_count, *depth) = _COUNTERS.unpack(header)  # fmt: skip
    return {
        "version": version,
        "creator_pid": creator,
        "created": created,
        "total_tasks": total,
        "pending_tasks": pending,
        "running_tasks": running,
        "completed_tasks": completed,
        "failed_tasks": failed,
        "cancelled_tasks": cancelled,
        "retried_tasks": retried,
        "avg_execution_time": exec_sum / exec_count if exec_count else 0.0,
        "queue_depth": {"URGENT": depth[0], "HIGH": depth[1], "NORMAL": depth[2], "LOW": depth[3]},
        "active_workers": active,
        "total_workers": len(workers),
        "memory_mb": memory / MB,
        "workers": workers,
    }


def _read_workers(buf: memoryview, snap: bytes, slots: int) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Every used slot's view, the number of active workers and their trees' USS in bytes."""
    # A section is consistent in ``snap`` if its counter was even there and is
    # the same in a second copy made after; usually the copies are identical.
    again = bytes(buf)
    same = snap == again
    workers: dict[str, dict[str, Any]] = {}
    active = memory = 0
    now = time.monotonic()
    for slot in range(slots):
        base = HEADER_SIZE + slot * SLOT_SIZE
        raw = snap[base : base + SLOT_SIZE]
        entry = _clean.get(raw) if same else None
        if entry is None:
            entry = _entry(buf, snap, again, same, slot, raw)
        if entry is _UNUSED:
            continue
        name, view, born, busy, heartbeat, tree = entry
        view = view.copy()  # the caller's to change
        view["load"] = min(busy / (now - born), 1.0) if now > born else 0.0  # share of its life spent busy
        if heartbeat and view["active"]:
            view["heartbeat_age"] = now - heartbeat
        if view["browser"] is not None:
            view["browser"] = dict(view["browser"])
        workers[name] = view
        if tree is not None:
            active += 1
            memory += tree
    return workers, active, memory


_UNUSED: Any = ()  # a slot never used
_clean: dict[bytes, Any] = {}  # the entry of a slot's bytes read whole: a slot changes a few times a second
_CLEAN_MAX = 4096


def _entry(buf: memoryview, snap: bytes, again: bytes, same: bool, slot: int, raw: bytes) -> Any:
    """A slot's name, view without its clock-dependent fields, born, busy, heartbeat and tree USS."""
    fields = _SLOT_PADDED.unpack(raw)
    if fields[2] == 0:
        entry: Any = _UNUSED
    else:
        torn = fields[0] & 1 or fields[9] & 1 or fields[18] & 1 or not (same or _steady(snap, again, slot))
        if torn:
            fields = _fresh_slot(buf, HEADER_SIZE + slot * SLOT_SIZE)
        tree = None
        if fields[3]:  # active: its companion (browser), if any, and this worker process's own tree
            tree = fields[29] + (fields[20] if fields[19] == fields[4] else 0)
        name, view = _worker_view(fields)
        entry = (name, view, fields[5], fields[16], fields[17], tree)
        if torn:
            return entry  # read again: not the bytes of ``raw``
    if same:
        if len(_clean) >= _CLEAN_MAX:
            _clean.clear()
        _clean[raw] = entry
    return entry


# A stopped worker's view; live ones start from a copy (cheaper than a dict literal).
_STOPPED: dict[str, Any] = {
    "type": "local", "active": False, "healthy": False, "state": "stopped", "current_task": None,
    "completed": 0, "failed": 0, "load": 0.0, "pid": 0, "restarts": 0, "heartbeat_age": None,
    "memory_mb": None, "pss_mb": None, "processes": None, "cpu_percent": None, "memory_source": None,
    "browser": None,
}  # fmt: skip


def _worker_view(fields: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """A slot's name and view, but for "load" and "heartbeat_age" (they move with the clock)."""
    (_, name, kind, active, pid, _, restarts, lost, healthy,
     _, own_pid, state, task, _, completed, failed, _, _,
     _, mem_pid, uss, pss, _, procs, cpu, _, _, exact, b_pid, b_uss, b_pss, b_procs) = fields  # fmt: skip
    view = _STOPPED.copy()
    view["completed"] = completed
    view["failed"] = failed + lost
    view["pid"] = pid
    view["restarts"] = restarts
    if kind != 1:
        view["type"] = KIND_NAMES.get(kind, "unknown")
    if active:
        view["active"] = True
        view["healthy"] = healthy == 1
        if own_pid != pid:  # the slot's new process has not written yet: the state is its forerunner's
            state = WorkerState.STARTING
        view["state"] = WorkerState.NAMES[state]
        if state == WorkerState.RUNNING:
            view["current_task"] = _name(task)
        if b_pid:  # the slot's companion outlives its workers: its figures stay good
            view["browser"] = {
                "pid": b_pid,
                "memory_mb": b_uss / MB,
                "pss_mb": b_pss / MB,
                "processes": b_procs,
            }
        if mem_pid == pid:  # else the figures are those of the slot's earlier process
            view["memory_mb"] = uss / MB
            view["pss_mb"] = pss / MB
            view["processes"] = procs
            view["cpu_percent"] = cpu
            view["memory_source"] = "uss" if exact else "rss"
    return _name(name), view


def _steady(snap: bytes, again: bytes, slot: int) -> bool:
    base = HEADER_SIZE + slot * SLOT_SIZE
    return all(snap[base + at : base + at + 8] == again[base + at : base + at + 8] for at in _SECTIONS)


@functools.lru_cache(maxsize=1024)
def _name(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")  # a damaged block must not crash a reader
