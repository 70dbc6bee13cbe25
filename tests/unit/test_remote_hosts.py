"""Remote host settings, credentials that never show, frames and the reconnection backoff (no SSH)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procpool._remote.frames import MARKER, FrameReader, encode
from procpool._remote.hosts import build_host
from procpool._remote.link import EXIT_LOST, EXIT_UNREACHABLE, describe_link_exit
from procpool._remote.slots import backoff

OPTIONS: dict[str, Any] = dict(
    slots=2, python="python3", connect_timeout=10.0, heartbeat_timeout=10.0, known_hosts=None,
    accept_unknown_host=False, ship_package=False, reconnect_max=30.0,
)  # fmt: skip


@pytest.fixture
def key(tmp_path: Path) -> str:
    path = tmp_path / "secret_key_file"
    path.write_text("not really a key")
    return str(path)


def build(**changes: Any) -> Any:
    args = {"host": "worker1", "port": 22, "worker_type": "remote_ssh", "credentials": {"username": "u"}}
    args.update(changes)
    options = {k: args.pop(k) for k in list(args) if k in OPTIONS}
    return build_host(**args, **{**OPTIONS, **options})


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"worker_type": "local"}, ValueError, "worker_type must be 'remote_ssh'"),
        ({"host": ""}, ValueError, "host must be"),
        ({"host": "a b"}, ValueError, "host must be"),
        ({"port": 0}, ValueError, "port must be"),
        ({"port": True}, ValueError, "port must be"),
        ({"slots": 0}, ValueError, "slots must be"),
        ({"python": ""}, ValueError, "python must"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout"),
        ({"heartbeat_timeout": "5"}, TypeError, "heartbeat_timeout"),
        ({"known_hosts": "/nowhere/known_hosts"}, ValueError, "known_hosts names no file"),
        ({"credentials": "u:pw"}, TypeError, "credentials must be a dict"),
        ({"credentials": {"key": "/k"}}, ValueError, "need a 'username'"),
        (
            {"credentials": {"username": "u", "token": "t"}},
            ValueError,
            r"unknown credentials keys \['token",
        ),
        ({"credentials": {"username": "u", "password": 5}}, TypeError, "credentials\\['password'\\]"),
    ],
)
def test_bad_settings_are_refused_by_name(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build(**changes)


def test_an_unreadable_key_is_refused_without_its_path() -> None:
    with pytest.raises(ValueError, match="no readable file") as info:
        build(credentials={"username": "u", "key": "/secret/place/id_ed25519"})
    assert "/secret/place" not in str(info.value)


def test_secrets_never_show_in_reprs(key: str) -> None:
    host = build(credentials={"username": "alice", "key": key, "passphrase": "pass-123"})
    with_password = build(credentials={"username": "bob", "password": "pw-456"})
    shown = f"{host!r} {host.credentials!r} {with_password!r} {host!s}"
    assert "alice" in shown and "auth=key" in shown and "auth=password" in shown
    for secret in (key, "secret_key_file", "pass-123", "pw-456"):
        assert secret not in shown
    assert host.address == "worker1:22" and host.credentials.key == key


@given(st.lists(st.tuples(st.text(), st.binary(), st.integers()), max_size=20), st.integers(1, 50))
def test_frames_survive_any_split_of_the_stream(messages: list[tuple[Any, ...]], chunk: int) -> None:
    stream = b"".join(encode(m) for m in messages)
    reader = FrameReader()
    got = []
    for start in range(0, len(stream), chunk):
        got.extend(reader.feed(stream[start : start + chunk]))
    assert got == messages


def test_a_blocking_reader_reports_the_end_of_the_stream() -> None:
    parts = [encode(("a", 1)) + encode(("b", 2))[:3], encode(("b", 2))[3:], b""]
    reader = FrameReader(lambda n: parts.pop(0))
    assert reader.read() == ("a", 1)
    assert reader.read() == ("b", 2)
    with pytest.raises(EOFError):
        reader.read()


def test_what_a_login_shell_prints_before_the_agent_is_skipped() -> None:
    parts = [b"Welcome to host\n" + MARKER[:5], MARKER[5:] + encode(("ready", 1)), b""]
    reader = FrameReader(lambda n: parts.pop(0))
    reader.skip_to_marker()
    assert reader.read() == ("ready", 1)
    silent = FrameReader(lambda n: b"")
    with pytest.raises(EOFError, match="before the agent started"):
        silent.skip_to_marker()


def test_a_corrupt_length_ends_the_stream() -> None:
    with pytest.raises(EOFError, match="corrupt"):
        FrameReader().feed(b"\xff\xff\xff\xff" + b"x")


def test_reconnection_backs_off_to_its_cap() -> None:
    assert [backoff(n, 30.0) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff(1, 0.2) == 0.2


def test_link_exits_are_described(key: str) -> None:
    host = build(port=2222)
    assert describe_link_exit(EXIT_LOST, host) == "lost its connection to worker1:2222"
    assert describe_link_exit(EXIT_UNREACHABLE, host) == "could not start a worker on worker1:2222"
    assert describe_link_exit(-9, host) is None
