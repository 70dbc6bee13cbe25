"""Hosts a cluster executor starts over SSH: ``procpool host`` there, one SSH connection each.

    add_remote_worker ── check_host (key, login, versions, psycopg; ship if asked) ──▶ open_host:
        exec ``python -m procpool host --queue -`` with the DSN on its stdin (never its command line)
    drain thread (one per host) ── its output ──▶ the "procpool.cluster" logger (debug)
    remove_remote_worker / shutdown ── close its stdin ──▶ it claims no more, writes its running
        tasks' outcomes and exits; a lost connection does the same

The host is a full cluster host: it serves the queue whoever submits, and its
tasks are fenced in the database like any other host's.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any

from .._errors import RemoteConnectError
from .._remote.hosts import build_host
from .store import Store, StoreError

__all__ = ("RemoteHosts",)

log = logging.getLogger("procpool.cluster")

_READY_WAIT = 60.0  # seconds for a started host to beat in the database
WORKER_TYPES = ("host", "remote_ssh")  # in cluster mode both start a host there


class _Started:
    def __init__(self, name: str, session: Any) -> None:
        self.name = name
        self.session = session
        self.output: list[str] = []  # its last lines, for an error
        self.drain = threading.Thread(target=self._drain, name=f"procpool-host-ssh-{name}", daemon=True)
        self.drain.start()

    def _drain(self) -> None:
        pending = b""
        while chunk := self.session.channel.recv(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                log.debug("host %s: %s", self.name, text)
                self.output = [*self.output[-19:], text]

    def end(self, timeout: float | None) -> bool:
        """Close its stdin and wait for it to drain and exit; True if it did within ``timeout``."""
        try:
            self.session.channel.shutdown_write()
        except (OSError, EOFError):
            pass
        self.drain.join(timeout)
        done = not self.drain.is_alive()
        self.session.close()
        return done


class RemoteHosts:
    """The hosts one executor started; each ends with the executor (or ``remove``)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._started: dict[str, _Started] = {}  # by host:port
        self._lock = threading.Lock()

    def add(
        self,
        host: object,
        port: object,
        worker_type: object,
        credentials: object,
        *,
        slots: object,
        lease: float,
        **options: Any,
    ) -> str:
        if worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {WORKER_TYPES}, not {worker_type!r}")
        settings = build_host(
            host, port, "remote_ssh", {} if credentials is None else credentials, slots=slots,
            heartbeat_timeout=10.0, reconnect_max=30.0, **options,
        )  # fmt: skip
        with self._lock:
            if settings.address in self._started:
                raise ValueError(f"host {settings.address} was already added")
        try:
            from .._remote import ssh
        except ImportError as exc:
            raise RuntimeError(f"remote hosts need fabric ({exc}): pip install 'procpool[remote]'") from None
        checked = ssh.check_host(settings, cluster=True)
        name = f"{settings.address}-{secrets.token_hex(3)}"
        arguments = ["--slots", str(settings.slots), "--lease", str(lease), "--name", name]
        started = _Started(name, ssh.open_host(checked, self._dsn, arguments))
        try:
            self._wait_ready(started)
        except BaseException:
            started.end(10)
            raise
        with self._lock:
            self._started[settings.address] = started
        return name

    def _wait_ready(self, started: _Started) -> None:
        store = Store(self._dsn)
        deadline = time.monotonic() + _READY_WAIT
        try:
            while time.monotonic() < deadline:
                if not started.drain.is_alive():
                    break  # it exited
                try:
                    if any(h[0] == started.name for h in store.counts()["hosts"]):
                        return
                except StoreError:
                    pass
                time.sleep(0.1)
        finally:
            store.close()
        said = "\n".join(started.output[-5:])
        raise RemoteConnectError(f"procpool host did not start on {started.name.rsplit('-', 1)[0]}: {said}")

    def remove(self, host: str, port: int, timeout: float | None) -> None:
        with self._lock:
            started = self._started.pop(f"{host}:{port}", None)
        if started is None:
            raise ValueError(f"no host {host}:{port} was added")
        if not started.end(timeout):
            raise TimeoutError(f"host {host}:{port} has not drained after {timeout} s; it goes on draining")

    def close(self) -> None:
        with self._lock:
            started, self._started = list(self._started.values()), {}
        for host in started:
            host.end(None)

    def names(self) -> list[str]:
        with self._lock:
            return [s.name for s in self._started.values()]
