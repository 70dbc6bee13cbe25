"""A remote host's settings, checked at ``add_remote_worker``; credentials never show in a repr."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .._config import check_positive

__all__ = ("WORKER_TYPE", "Credentials", "RemoteHost", "build_host")

WORKER_TYPE = "remote_ssh"
_CREDENTIAL_KEYS = frozenset({"username", "key", "password", "passphrase"})


@dataclass(frozen=True, slots=True)
class Credentials:
    """How to log in. Only ``username`` shows in a repr; the rest is secret."""

    username: str
    key: str | None = field(default=None, repr=False)  # path of a private key file
    password: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)  # of an encrypted key

    def __repr__(self) -> str:
        way = "key" if self.key else "password" if self.password else "agent or default keys"
        return f"Credentials(username={self.username!r}, auth={way})"


@dataclass(frozen=True, slots=True)
class RemoteHost:
    """One host's settings, as the supervisor and its link processes use them."""

    host: str
    port: int
    credentials: Credentials
    slots: int  # worker slots on that host: one agent and one SSH connection each
    python: str  # the remote interpreter (before shipping, if asked)
    connect_timeout: float  # seconds for TCP, SSH handshake and authentication, each
    heartbeat_timeout: float  # seconds of silence after which the connection counts as lost
    known_hosts: str | None  # None: the user's ~/.ssh/known_hosts
    accept_unknown_host: bool  # trust a host whose key is not known (logged); never a changed key
    ship_package: bool  # copy the local procpool into a virtual environment on the host
    reconnect_max: float  # seconds; cap of the backoff between reconnection attempts

    @property
    def address(self) -> str:
        """``host:port``, as stats and messages name it."""
        return f"{self.host}:{self.port}"


def build_host(
    host: object,
    port: object,
    worker_type: object,
    credentials: object,
    *,
    slots: object,
    python: object,
    connect_timeout: object,
    heartbeat_timeout: object,
    known_hosts: object,
    accept_unknown_host: object,
    ship_package: object,
    reconnect_max: object,
) -> RemoteHost:
    """Check every setting; raise ValueError or TypeError naming the bad one (never a secret)."""
    if worker_type != WORKER_TYPE:
        raise ValueError(f"worker_type must be {WORKER_TYPE!r}, not {worker_type!r}")
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ValueError(f"host must be a host name or address, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be an int from 1 to 65535, not {port!r}")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be an int of at least 1, not {slots!r}")
    if not isinstance(python, str) or not python:
        raise ValueError(f"python must name the remote interpreter, not {python!r}")
    if known_hosts is not None and not os.path.isfile(str(known_hosts)):
        raise ValueError(f"known_hosts names no file: {known_hosts!r}")
    return RemoteHost(
        host=host,
        port=port,
        credentials=_credentials(credentials),
        slots=slots,
        python=python,
        connect_timeout=check_positive("connect_timeout", connect_timeout),
        heartbeat_timeout=check_positive("heartbeat_timeout", heartbeat_timeout),
        known_hosts=None if known_hosts is None else str(known_hosts),
        accept_unknown_host=bool(accept_unknown_host),
        ship_package=bool(ship_package),
        reconnect_max=check_positive("reconnect_max", reconnect_max),
    )


def _credentials(value: object) -> Credentials:
    # Messages name the keys that are wrong, never their values.
    if not isinstance(value, dict):
        raise TypeError(f"credentials must be a dict, not {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in _CREDENTIAL_KEYS)
    if unknown:
        raise ValueError(
            f"unknown credentials keys {unknown}; use username with key (and passphrase) or password"
        )
    fields: dict[str, Any] = {}
    for name in _CREDENTIAL_KEYS:
        item = value.get(name)
        if item is not None and (not isinstance(item, str) or not item):
            raise TypeError(f"credentials[{name!r}] must be a non-empty str")
        fields[name] = item
    if fields["username"] is None:
        raise ValueError("credentials need a 'username'")
    key = fields["key"]
    if key is not None and not os.access(os.path.expanduser(key), os.R_OK):
        raise ValueError("credentials['key'] names no readable file")
    if key is not None:
        fields["key"] = os.path.expanduser(key)
    return Credentials(**fields)
