"""Messages between a link and its agent: a 4-byte length, then a pickle of a plain tuple.

Both ends trust each other as much as a local worker is trusted: results
are unpickled either way. Frames travel only inside the SSH channel.
"""

from __future__ import annotations

import pickle
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ("MARKER", "MAX_FRAME", "FrameReader", "encode")

# The agent writes this before its first frame: whatever a login shell printed before it is skipped.
MARKER = b"\nprocpool-agent-frames\n"

_LENGTH = struct.Struct("!I")
MAX_FRAME = 1 << 31  # bytes; a longer length is a corrupt stream, not a big result


def encode(message: tuple[Any, ...]) -> bytes:
    """One frame holding ``message``."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Cuts frames out of a byte stream read with ``recv(n)`` (b"" at end of stream)."""

    def __init__(self, recv: Callable[[int], bytes] | None = None) -> None:
        self._recv = recv
        self._buf = bytearray()
        self._ready: deque[tuple[Any, ...]] = deque()

    def skip_to_marker(self, limit: int = 1 << 20) -> None:
        """Drop what comes before ``MARKER`` (a login banner); EOFError if it never comes."""
        assert self._recv is not None
        while (at := self._buf.find(MARKER)) < 0:
            if len(self._buf) > limit:
                raise EOFError("the remote side printed no agent marker: is it a procpool agent?")
            data = self._recv(1 << 16)
            if not data:
                raise EOFError(f"the stream ended before the agent started: {bytes(self._buf[-300:])!r}")
            self._buf += data
        del self._buf[: at + len(MARKER)]

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        """Add bytes read elsewhere; return every frame now complete."""
        self._buf += data
        out = []
        while len(self._buf) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buf)
            if size >= MAX_FRAME:
                raise EOFError(f"corrupt frame stream (length {size})")
            end = _LENGTH.size + size
            if len(self._buf) < end:
                break
            out.append(pickle.loads(self._buf[_LENGTH.size : end]))
            del self._buf[:end]
        return out

    def drain(self) -> list[tuple[Any, ...]]:
        """Frames that ``read`` cut out but has not returned yet."""
        out = list(self._ready)
        self._ready.clear()
        return out

    def read(self) -> tuple[Any, ...]:
        """Block for the next frame (with ``recv``). Raises EOFError at end of stream."""
        assert self._recv is not None
        self._ready.extend(self.feed(b""))  # bytes already buffered (after the marker)
        while not self._ready:
            data = self._recv(1 << 16)
            if not data:
                raise EOFError("the stream ended")
            self._ready.extend(self.feed(data))
        return self._ready.popleft()
