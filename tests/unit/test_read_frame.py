"""A worker's blocking read of its next task frame, however the bytes arrive."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procpool._inbox import framed, read_frame

FRAMES = st.lists(st.binary(max_size=300) | st.sampled_from([b"", b"S", bytes(70_000)]), max_size=12)


@settings(max_examples=60, deadline=None)
@given(frames=FRAMES, pieces=st.lists(st.integers(1, 9000), min_size=1, max_size=20))
def test_every_frame_comes_whole_and_in_order_then_eof(frames: list[bytes], pieces: list[int]) -> None:
    ours, theirs = socket.socketpair()
    data = b"".join(framed(f) for f in frames)

    def dribble() -> None:  # in pieces of the given sizes, as a sender may write them
        at, i = 0, 0
        while at < len(data):
            size = pieces[i % len(pieces)]
            theirs.sendall(data[at : at + size])
            at, i = at + size, i + 1
        theirs.close()

    sender = threading.Thread(target=dribble)
    sender.start()
    try:
        pending = bytearray()
        assert [read_frame(ours.fileno(), pending) for _ in frames] == frames
        with pytest.raises(EOFError):
            read_frame(ours.fileno(), pending)
    finally:
        sender.join(10)
        ours.close()


def test_a_frame_of_several_megabytes_arrives_whole() -> None:
    ours, theirs = socket.socketpair()
    big = bytes(range(256)) * (12 << 12)  # 12 MB: more than one read's worth
    sender = threading.Thread(target=lambda: (theirs.sendall(framed(big) + framed(b"next")), theirs.close()))
    sender.start()
    try:
        pending = bytearray()
        assert read_frame(ours.fileno(), pending) == big
        assert read_frame(ours.fileno(), pending) == b"next"
    finally:
        sender.join(10)
        ours.close()
