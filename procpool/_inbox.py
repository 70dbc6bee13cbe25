"""A worker's messages, read without ever blocking the supervisor.

    worker ── conn.send (multiprocessing's frames: a 4-byte length, or -1 and 8 bytes) ──▶ socket
    supervisor ── Inbox.read() when epoll says readable ──▶ the frames that are complete, in order

A worker frozen (SIGSTOP) halfway through a message leaves half a frame here,
and the supervisor goes on with everything else. A large frame (a result of
many megabytes) is read straight into a buffer of its own size, a bounded
amount per call, so timers fire between the reads and nothing is copied twice.
That buffer is an anonymous mmap: its pages are zeroed by the kernel as the
reads fill them, with the GIL released (``bytearray(size)`` would zero all
300 MB of a big result at once, holding the supervisor thread up for 0.5 s).
"""

from __future__ import annotations

import mmap
import os
import struct

__all__ = ("Frame", "Inbox", "framed", "read_frame")

Frame = bytearray | mmap.mmap  # a message as it came: small ones in a bytearray, big ones in an mmap

_CHUNK = 1 << 20  # bytes asked of the socket per read
_FIRST_READ = 1 << 16  # bytes asked by read_frame at first: a task frame is usually far smaller
_PER_CALL = 8 << 20  # bytes read per call at most, so one huge result cannot hold the loop up
_BIG = 1 << 20  # frames at least this long get a buffer of their own
_DONTFORK = getattr(mmap, "MADV_DONTFORK", None)
_HEADER = struct.Struct("!i")  # multiprocessing.connection's frame header (frames under 2 GiB)
_HUGE = struct.Struct("!Q")  # after a header of -1, for bigger frames


def framed(data: bytes) -> bytes:
    """``data`` with ``multiprocessing.connection``'s frame header, as ``send_bytes`` writes it."""
    if len(data) < 0x7FFFFFFF:
        return _HEADER.pack(len(data)) + data
    return _HEADER.pack(-1) + _HUGE.pack(len(data)) + data


def _header(buf: bytes | bytearray, start: int) -> tuple[int, int] | None:
    """(header length, body length) of the frame at ``start``; None while its header is incomplete."""
    if len(buf) - start < 4:
        return None
    (size,) = _HEADER.unpack_from(buf, start)
    if size != -1:
        return 4, size
    if len(buf) - start < 12:
        return None
    return 12, _HUGE.unpack_from(buf, start + 4)[0]


def read_frame(fd: int, pending: bytearray) -> bytes:
    """The next frame from a blocking ``fd``: usually one read, where ``Connection.recv_bytes``
    makes two. ``pending`` keeps what was read past the frame. Raises EOFError at the end."""
    while True:
        want = _FIRST_READ
        header = _header(pending, 0)
        if header is not None:
            head, size = header
            if len(pending) - head >= size:
                frame = bytes(memoryview(pending)[head : head + size])
                del pending[: head + size]
                return frame
            want = min(max(head + size - len(pending), _FIRST_READ), _PER_CALL)
        data = os.read(fd, want)
        if not data:
            raise EOFError("the line was closed")
        if not pending and len(data) >= 4 and _HEADER.unpack_from(data)[0] == len(data) - 4:
            return data[4:]  # the usual case: one read, one whole frame
        pending += data


class Inbox:
    """Frames from one worker's socket (set non-blocking here)."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._buf = bytearray()  # the start of the next frame(s)
        self._big: mmap.mmap | None = None  # a large frame being filled
        self._filled = 0
        self.closed = False  # the worker's end is closed (it exited)

    def read(self) -> list[Frame]:
        """The frames completed by what can be read now (never blocks)."""
        frames: list[Frame] = []
        budget = _PER_CALL
        while budget > 0 and not self.closed:
            if self._big is not None:
                got = self._fill_big(budget)
                if got <= 0:
                    break
                budget -= got
                if self._filled == len(self._big):
                    frames.append(self._big)
                    self._big = None
                continue
            try:
                data = os.read(self._fd, _CHUNK)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            budget -= len(data)
            self._buf += data
            self._split(frames)
        return frames

    def _fill_big(self, budget: int) -> int:
        assert self._big is not None
        view = memoryview(self._big)[self._filled : self._filled + min(budget, _CHUNK * 8)]
        try:
            got = os.readv(self._fd, [view])
        except BlockingIOError:
            return 0
        except OSError:
            self.closed = True
            return 0
        if got == 0:
            self.closed = True
            return 0
        self._filled += got
        return got

    def _split(self, frames: list[Frame]) -> None:
        """Move each complete frame out of the buffer; start a big one if its length says so."""
        buf = self._buf
        start = 0
        while (header := _header(buf, start)) is not None:
            head, size = header
            body = start + head
            if len(buf) - body >= size:
                frames.append(buf[body : body + size])
                start = body + size
                continue
            if size >= _BIG:  # the rest of it goes straight into a buffer of its own
                self._big = mmap.mmap(-1, size)
                if _DONTFORK is not None:  # a worker forked meanwhile need not copy its page tables
                    self._big.madvise(_DONTFORK)
                have = len(buf) - body
                self._big[:have] = buf[body:]
                self._filled = have
                start = len(buf)
            break
        del buf[:start]
