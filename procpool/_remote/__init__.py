"""Remote workers over SSH: what ``add_remote_worker`` and ``remove_remote_worker`` do.

    caller ── check_host (ssh) ──▶ remote host: host key, login, versions, shipping
           ── supervisor.call(add_host) ──▶ slots and link processes (``slots``, ``link``)
    link ══ SSH ══▶ agent (``agent``) ── worker child on the remote host

fabric is imported only in ``ssh``, and only once a host is added.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from .._errors import ExecutorShutdownError
from .hosts import RemoteHost, build_host

__all__ = ("add_host", "remove_host")

_CALL_TIMEOUT = 30.0  # seconds for the supervisor to take a host in (it runs no I/O for it)


def add_host(supervisor: Any, enabled: bool, host: object, port: object, **options: Any) -> list[str]:
    """Check a host and give it slots; returns its worker names (see ``add_remote_worker``)."""
    if not enabled:
        raise RuntimeError("remote workers are off: create the executor with enable_remote=True to add hosts")
    settings = build_host(host, port, **options)
    try:
        from . import ssh
    except ImportError as exc:
        raise RuntimeError(f"remote workers need fabric ({exc}): pip install 'procpool[remote]'") from None
    checked: RemoteHost = ssh.check_host(settings)
    result: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
    names: list[str] = _on_supervisor(
        supervisor, lambda: supervisor.add_host(checked, result), result, _CALL_TIMEOUT
    )
    return names


def remove_host(supervisor: Any, host: str, port: int, timeout: float | None) -> None:
    """Drain and remove a host (see ``remove_remote_worker``)."""
    result: concurrent.futures.Future[None] = concurrent.futures.Future()
    address = f"{host}:{port}"
    _on_supervisor(supervisor, lambda: supervisor.remove_host(address, result), result, timeout)


def _on_supervisor(
    supervisor: Any, call: Any, result: concurrent.futures.Future[Any], timeout: float | None
) -> Any:
    if not supervisor.call(call):
        raise ExecutorShutdownError("the executor has shut down")
    try:
        return result.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError("the remote host was not drained in time; it goes on draining") from None
