"""The executor's remote-worker methods (a mixin of DistributedExecutor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import add_host, remove_host

if TYPE_CHECKING:
    from .._config import Config
    from .._supervisor import Supervisor

__all__ = ("RemoteWorkers",)


class RemoteWorkers:
    """``add_remote_worker`` and ``remove_remote_worker``; the work is in this package."""

    if TYPE_CHECKING:
        _closed: BaseException | None
        _config: Config
        _supervisor: Supervisor

        @property
        def _remote_initializer(self) -> bytes | None: ...

    def add_remote_worker(
        self,
        host: str,
        port: int = 22,
        worker_type: str = "remote_ssh",
        credentials: dict[str, str] | None = None,
        *,
        slots: int = 1,
        python: str = "python3",
        connect_timeout: float = 10.0,
        heartbeat_timeout: float = 10.0,
        known_hosts: str | None = None,
        accept_unknown_host: bool = False,
        ship_package: bool = False,
        reconnect_max: float = 30.0,
    ) -> list[str]:
        """Add a host reached over SSH; tasks then spread over local and remote workers.

        Each slot is one SSH connection to an agent (``python -m
        procpool._remote.agent``) that runs tasks one at a time, each attempt
        killed at its deadline on the host itself. The host is checked first:
        its key, the login, and the remote Python, procpool and cloudpickle
        versions, which must match these. A lost connection is noticed within
        ``heartbeat_timeout``; its task is retried elsewhere, and the slot
        reconnects with a backoff. Needs ``pip install 'procpool[remote]'``.

        Args:
            host, port: where sshd listens.
            worker_type: "remote_ssh", the only kind.
            credentials: ``username``, with ``key`` (a private key file, and
                its ``passphrase``) or ``password``; with neither, the SSH agent
                and default keys are tried. Never logged or shown.
            slots: tasks the host runs at once.
            python: the remote interpreter.
            connect_timeout: seconds for each step of connecting.
            heartbeat_timeout: seconds of silence before the connection counts as lost.
            known_hosts: file of trusted host keys (default ``~/.ssh/known_hosts``).
            accept_unknown_host: trust a host whose key is unknown (logged); a
                changed key is refused regardless.
            ship_package: copy this procpool (with cloudpickle and psutil) into
                a virtual environment on the host, kept under ~/.cache/procpool.
            reconnect_max: seconds; the cap of the backoff between reconnection attempts.

        Returns:
            The names of the host's workers in ``get_stats()["workers"]``.

        Raises:
            RuntimeError: the executor was made without ``enable_remote=True``.
            ValueError, TypeError: a bad setting, or the host was already added.
            RemoteHostKeyError, RemoteAuthError, RemoteConnectError,
            RemoteVersionError: the host cannot be used (the message says why).
        """
        if self._closed is not None:
            raise self._closed
        self._remote_initializer  # noqa: B018 - raises here if the initializer cannot travel
        return add_host(
            self._supervisor, self._config.enable_remote, host, port, worker_type=worker_type,
            credentials={} if credentials is None else credentials, slots=slots, python=python,
            connect_timeout=connect_timeout, heartbeat_timeout=heartbeat_timeout,
            known_hosts=known_hosts, accept_unknown_host=accept_unknown_host,
            ship_package=ship_package, reconnect_max=reconnect_max,
        )  # fmt: skip

    def remove_remote_worker(self, host: str, port: int = 22, timeout: float | None = None) -> None:
        """Drain a host: its workers finish their current tasks, take no more, and disconnect.

        Raises:
            ValueError: no such host. TimeoutError: not drained within ``timeout``
            seconds (it goes on draining).
        """
        if self._closed is not None:
            raise self._closed
        remove_host(self._supervisor, host, port, timeout)
