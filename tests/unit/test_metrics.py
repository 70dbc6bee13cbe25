"""The shared-memory layout: writers, the seqlock reader, version checks."""

from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procpool._metrics import (
    COMPLETED,
    HEADER_SIZE,
    PENDING,
    VERSION,
    MetricsBlock,
    SlotWriter,
    active_worker_pids,
    attach,
    read_start,
)
from procpool._snapshot import read_snapshot


@pytest.fixture
def block() -> Iterator[MetricsBlock]:
    b = MetricsBlock(slots=3)
    yield b
    b.close()


def snapshot(block: MetricsBlock) -> dict[str, object]:
    assert block.shm.buf is not None
    return read_snapshot(block.shm.buf)


def test_block_is_private_to_the_user(block: MetricsBlock) -> None:
    mode = os.stat(Path("/dev/shm") / block.name).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert block.name.startswith("procpool-")


def test_counters_round_trip(block: MetricsBlock) -> None:
    c = block.counters
    c.total, c.exec_time_sum, c.exec_count = 5, 6.0, 3
    c.states[PENDING], c.states[COMPLETED] = 2, 3
    c.depth[1] = 2
    block.publish()
    block.supervisor_section(0).write(b"local-worker-0", 1, 1, 7, 1.0, 0, 0, 1)
    writer = SlotWriter(block.name, 0)
    writer.finished(ok=False, elapsed=0.1)  # worker figures must not leak into the totals
    writer.close()
    snap = snapshot(block)
    assert snap["failed_tasks"] == 0 and snap["workers"]["local-worker-0"]["failed"] == 1  # type: ignore[index]
    assert snap["total_tasks"] == 5 and snap["completed_tasks"] == 3
    assert snap["avg_execution_time"] == 2.0
    assert snap["queue_depth"] == {"URGENT": 0, "HIGH": 2, "NORMAL": 0, "LOW": 0}


def test_slots_show_only_once_named_and_resume_counts(block: MetricsBlock) -> None:
    block.supervisor_section(1).write(b"local-worker-1", 1, 1, os.getpid(), 1.0, 0, 0, 1)
    writer = SlotWriter(block.name, 1)  # writes as this process, the slot's worker
    writer.running("task-9", 1)
    assert snapshot(block)["workers"]["local-worker-1"]["current_task"] == "task-9"  # type: ignore[index]
    writer.finished(ok=True, elapsed=0.5)
    writer.close()
    again = SlotWriter(block.name, 1)  # a replacement worker in the same slot
    again.finished(ok=False, elapsed=0.5)
    again.close()
    workers = snapshot(block)["workers"]
    assert list(workers) == ["local-worker-1"]  # type: ignore[call-overload]
    view = workers["local-worker-1"]  # type: ignore[index]
    assert (view["completed"], view["failed"], view["current_task"]) == (1, 1, None)
    assert active_worker_pids(block.name) == [os.getpid()]


def test_a_new_process_in_a_slot_shows_starting_until_it_writes(block: MetricsBlock) -> None:
    block.supervisor_section(0).write(b"remote-worker-0", 2, 1, os.getpid(), 1.0, 0, 0, 1)
    writer = SlotWriter(block.name, 0)
    writer.running("task-1", 1)
    writer.close()
    block.supervisor_section(0).write(
        b"remote-worker-0", 2, 1, os.getpid() + 1, 1.0, 1, 0, 1
    )  # its successor
    view = snapshot(block)["workers"]["remote-worker-0"]  # type: ignore[index]
    assert (view["type"], view["state"], view["current_task"]) == ("remote_ssh", "starting", None)


def test_a_section_left_odd_by_a_killed_writer_is_reset_by_the_next(block: MetricsBlock) -> None:
    block.supervisor_section(0).write(b"local-worker-0", 1, 1, os.getpid(), 1.0, 0, 0, 1)
    buf = block.shm.buf
    assert buf is not None
    at = HEADER_SIZE + 96
    struct.pack_into("<Q", buf, at, 7)  # a writer died mid-write
    writer = SlotWriter(block.name, 0)
    writer.idle()
    writer.close()
    assert struct.unpack_from("<Q", buf, at)[0] % 2 == 0
    assert snapshot(block)["workers"]["local-worker-0"]["state"] == "idle"  # type: ignore[index]


def test_a_start_stays_readable_after_its_task_until_the_next(block: MetricsBlock) -> None:
    # The supervisor learns of starts from the slot: a dead worker's last start must
    # still be there once it no longer says "running".
    block.supervisor_section(0).write(b"local-worker-0", 1, 1, os.getpid(), 1.0, 0, 0, 1)
    buf = block.shm.buf
    assert buf is not None
    writer = SlotWriter(block.name, 0)
    writer.idle()
    assert read_start(buf, 0) == (os.getpid(), False, 0, "", 0.0)
    before = time.monotonic()
    writer.running("task-12", 3)
    start = read_start(buf, 0)
    assert start is not None and start[:4] == (os.getpid(), True, 3, "task-12")
    assert before <= start.started <= time.monotonic()
    writer.finished(ok=True, elapsed=0.1)
    writer.beat()
    assert read_start(buf, 0) == start._replace(running=False)
    assert snapshot(block)["workers"]["local-worker-0"]["current_task"] is None  # type: ignore[index]
    writer.running("task-13", 1)
    assert read_start(buf, 0)[:4] == (os.getpid(), True, 1, "task-13")  # type: ignore[index]
    struct.pack_into("<Q", buf, HEADER_SIZE + 96, 9)  # its writer died mid-write
    assert read_start(buf, 0) is None  # torn: not taken for a start
    writer.close()


def test_a_block_of_another_version_is_refused(block: MetricsBlock) -> None:
    buf = block.shm.buf
    assert buf is not None
    struct.pack_into("<I", buf, 8, 99)
    with pytest.raises(ValueError, match=f"layout version {VERSION}"):
        attach(block.name)


def test_close_unlinks_and_is_idempotent() -> None:
    b = MetricsBlock(slots=1)
    b.close()
    b.close()
    assert not (Path("/dev/shm") / b.name).exists()


def test_a_reader_never_waits_on_a_writer_that_died_mid_write(block: MetricsBlock) -> None:
    block.supervisor_section(2).write(b"local-worker-2", 1, 1, 99, 1.0, 0, 0, 1)
    buf = block.shm.buf
    assert buf is not None
    struct.pack_into("<Q", buf, HEADER_SIZE + 2 * 256 + 96, 5)  # odd for ever: its writer is dead
    assert snapshot(block)["workers"]["local-worker-2"]["pid"] == 99  # type: ignore[index]


def test_a_damaged_or_short_block_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    from procpool._metrics import check_layout

    with pytest.raises(ValueError, match="unreadable"):
        check_layout(memoryview(b"x" * 16), "procpool-1-short")
    block = MetricsBlock(slots=1)
    try:
        buf = block.shm.buf
        assert buf is not None
        check_layout(buf, block.name)
        block.supervisor_section(0).write(b"\xff\xfeworker", 1, 1, 123, 0.0, 0, 0, 1)  # not UTF-8
        assert list(read_snapshot(buf)["workers"]) == ["\ufffd\ufffdworker"]
    finally:
        block.close()


def test_a_view_read_again_is_fresh_however_it_was_changed(block: MetricsBlock) -> None:
    # Unchanged slots are read from a cache of their bytes: what a caller does to a view,
    # and the clock, must still show in the next read.
    block.supervisor_section(2).write(b"local-worker-2", 1, 1, os.getpid(), time.monotonic() - 10, 0, 0, 1)
    writer = SlotWriter(block.name, 2)
    writer.idle()
    first = snapshot(block)["workers"]["local-worker-2"]  # type: ignore[index]
    first["completed"] = 99
    first["state"] = "changed by the caller"
    time.sleep(0.05)
    second = snapshot(block)["workers"]["local-worker-2"]  # type: ignore[index]
    assert (second["completed"], second["state"]) == (0, "idle")
    assert second["heartbeat_age"] > first["heartbeat_age"]  # the same bytes, a later clock
    writer.running("task-4", 1)
    assert snapshot(block)["workers"]["local-worker-2"]["current_task"] == "task-4"  # type: ignore[index]
    writer.close()
