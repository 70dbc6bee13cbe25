"""SSH with fabric: the one module that imports fabric (and so paramiko).

    add_remote_worker ── check_host ──▶ connect: host key checked against known_hosts,
                                        then authentication ──▶ versions (ship the package if asked)
    link process      ── open_agent ──▶ connect ──▶ exec the agent ──▶ a channel carrying frames
    cluster executor  ── open_host ──▶ connect ──▶ exec ``procpool host``; the DSN on its stdin,
                                       whose end (EOF) makes it drain and exit

- Host keys: fabric trusts any host by default; here an unknown key is
  refused unless ``accept_unknown_host`` (logged), and a changed key always is.
- Errors name the user and host, never a key path, password or passphrase;
  paramiko's own exception is dropped (``from None``) for that reason.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import shlex
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import cloudpickle
import fabric
import invoke.exceptions
import paramiko
import psutil

from .._errors import (
    RemoteAuthError,
    RemoteConnectError,
    RemoteHostKeyError,
    RemoteVersionError,
    RemoteWorkerError,
)
from .hosts import RemoteHost

__all__ = ("Session", "check_host", "open_agent", "open_host")

log = logging.getLogger(__name__)

AGENT_MODULE = "procpool._remote.agent"
_SHIP_ROOT = ".cache/procpool"  # under the remote user's home
_SHIP_TIMEOUT = 120.0  # seconds for one step of shipping (a venv, an upload, an unpack)
_PROBE_TIMEOUT = 60.0  # seconds for the version check: a Python importing procpool on a busy host
# Prints what must match, as one JSON line; the import error, if any, as text.
_PROBE = (
    "import json, platform, sys\n"
    "out = {'python': '%d.%d' % sys.version_info[:2], 'machine': platform.machine()}\n"
    "try:\n"
    "    import cloudpickle, procpool\n"
    "    out.update(procpool=procpool.__version__, cloudpickle=cloudpickle.__version__)\n"
    "except Exception as exc:\n"
    "    out['error'] = '%s: %s' % (type(exc).__name__, exc)\n"
    "print(json.dumps(out))\n"
)


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """Refuse a host whose key is not known, unless told to accept it (then say so)."""

    def __init__(self, host: RemoteHost, loud: bool) -> None:
        self.host = host
        self.loud = loud  # log the acceptance at WARNING (once per add, not per connection)

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        h = self.host
        seen = f"{key.get_name()} {key.fingerprint}"
        if h.accept_unknown_host:
            log.log(
                logging.WARNING if self.loud else logging.DEBUG,
                "accepting the unknown host key of %s (%s) unchecked, as accept_unknown_host=True asks",
                h.address, seen,
            )  # fmt: skip
            return
        where = h.known_hosts or "~/.ssh/known_hosts"
        target = h.host if h.port == 22 else f"-p {h.port} {h.host}"
        raise RemoteHostKeyError(
            f"the host key of {h.address} ({seen}) is not in {where}; check it and add it "
            f"(ssh-keyscan {target} >> {where}), or pass accept_unknown_host=True to trust it unchecked"
        )


class Session:
    """An open SSH connection, and the agent's channel once started."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.channel: Any = None  # paramiko.Channel: sendall, recv, recv_stderr, settimeout, close

    def close(self) -> None:
        """Close the channel and the connection. Never raises."""
        try:
            self.connection.close()
            # fabric closes only a connection that got through; one refused mid-handshake
            # (a host key, a login) still holds its socket.
            self.connection.client.close()
        except Exception:  # noqa: BLE001 - it may be broken already
            pass


def check_host(host: RemoteHost, cluster: bool = False) -> RemoteHost:
    """Connect once and check the remote side; ship the package if asked.

    Returns the host settings to start agents with (the shipped interpreter, if any).

    Raises:
        RemoteHostKeyError, RemoteAuthError, RemoteConnectError, RemoteVersionError.
    """
    session = _connect(host, loud=True)
    try:
        if host.ship_package:
            host = replace(host, python=_ship(session, host, cluster), ship_package=False)
        _check_versions(session, host)
        if cluster:
            _check_psycopg(session, host)
        return host
    finally:
        session.close()


def open_agent(host: RemoteHost) -> Session:
    """Connect and start the agent; its stdin and stdout carry frames.

    Raises:
        RemoteWorkerError (a subclass) when the host cannot be used.
    """
    session = _connect(host, loud=False)
    try:
        with _errors(host):
            transport = session.connection.client.get_transport()
            channel = transport.open_session(timeout=host.connect_timeout)
            channel.exec_command(f"exec {shlex.quote(host.python)} -m {AGENT_MODULE}")
    except BaseException:
        session.close()
        raise
    session.channel = channel
    return session


def open_host(host: RemoteHost, dsn: str, arguments: list[str]) -> Session:
    """Start ``procpool host`` there with ``arguments``; the DSN goes on its stdin, never its command line.

    Closing the channel's stdin (``shutdown_write``) makes it claim no more and exit once its
    running tasks are written; a lost connection does the same.
    """
    session = _connect(host, loud=False)
    command = " ".join(
        shlex.quote(a) for a in (host.python, "-m", "procpool", "host", "--queue", "-", *arguments)
    )
    try:
        with _errors(host):
            transport = session.connection.client.get_transport()
            channel = transport.open_session(timeout=host.connect_timeout)
            channel.set_combine_stderr(True)  # its log, read by one drain thread
            channel.exec_command(f"exec {command}")
            channel.sendall((dsn + "\n").encode())
    except BaseException:
        session.close()
        raise
    session.channel = channel
    return session


def _check_psycopg(session: Session, host: RemoteHost) -> None:
    code, _, err = _run(session, host, f"{shlex.quote(host.python)} -c 'import psycopg'", _PROBE_TIMEOUT)
    if code != 0:
        raise RemoteVersionError(
            f"{host.python} on {host.address} cannot import psycopg ({err.strip()[-200:]}): install "
            f"'procpool[postgres]' there, or pass ship_package=True to copy this one into a venv there"
        )


def _connect(host: RemoteHost, loud: bool) -> Session:
    creds = host.credentials
    given = creds.key is not None or creds.password is not None
    kwargs: dict[str, Any] = {
        "timeout": host.connect_timeout,
        "banner_timeout": host.connect_timeout,
        "auth_timeout": host.connect_timeout,
        "channel_timeout": host.connect_timeout,
        "look_for_keys": not given,  # only what was given, so a wrong key fails at once
        "allow_agent": not given,
    }
    if creds.key is not None:
        kwargs["pkey"] = _load_key(host)
    if creds.password is not None:
        kwargs["password"] = creds.password
    connection = fabric.Connection(host.host, user=creds.username, port=host.port, connect_kwargs=kwargs)
    client = connection.client
    client.load_system_host_keys(host.known_hosts)  # None: ~/.ssh/known_hosts, if there is one
    client.set_missing_host_key_policy(_HostKeyPolicy(host, loud))
    session = Session(connection)
    try:
        with _errors(host):
            connection.open()
    except BaseException:
        session.close()
        raise
    return session


def _load_key(host: RemoteHost) -> Any:
    """The private key, loaded here rather than by path: paramiko's debug log names the files it tries."""
    creds = host.credentials
    assert creds.key is not None
    who = f"{creds.username}@{host.address}"
    passphrase = None if creds.passphrase is None else creds.passphrase.encode()
    try:
        try:
            return paramiko.PKey.from_path(creds.key, passphrase)
        except TypeError:  # a passphrase for a key that has none: ssh ignores it too
            return paramiko.PKey.from_path(creds.key, None)
    except paramiko.PasswordRequiredException:
        raise RemoteAuthError(f"the key for {who} is encrypted: give its passphrase in credentials") from None
    except (paramiko.SSHException, ValueError, TypeError, OSError) as exc:
        raise RemoteAuthError(
            f"the key for {who} cannot be loaded ({type(exc).__name__}): is it a private key, "
            f"and its passphrase right?"
        ) from None


@contextmanager
def _errors(host: RemoteHost) -> Iterator[None]:
    """Turn paramiko's and the socket's errors into ours, without their text where it could hold a secret."""
    who = f"{host.credentials.username}@{host.address}"
    try:
        yield
    except RemoteWorkerError:
        raise  # ours already (a RemoteConnectError is an OSError too)
    except paramiko.BadHostKeyException as exc:
        where = host.known_hosts or "~/.ssh/known_hosts"
        raise RemoteHostKeyError(
            f"the host key of {host.address} has CHANGED ({exc.key.get_name()} {exc.key.fingerprint}, "
            f"expected {exc.expected_key.fingerprint}): someone may be intercepting the connection. "
            f"If the change is expected, remove the old key from {where} (ssh-keygen -R) and add the new one"
        ) from None
    except paramiko.PasswordRequiredException:
        raise RemoteAuthError(f"the key for {who} is encrypted: give its passphrase in credentials") from None
    except paramiko.AuthenticationException:
        raise RemoteAuthError(f"authentication as {who} failed: the server refused the credentials") from None
    except TimeoutError:
        raise RemoteConnectError(f"{host.address} did not answer within {host.connect_timeout:g} s") from None
    except paramiko.SSHException as exc:
        raise RemoteConnectError(f"the SSH connection to {who} failed: {_safe(exc)}") from None
    except OSError as exc:
        raise RemoteConnectError(f"cannot reach {host.address}: {exc.strerror or _safe(exc)}") from None


def _safe(exc: BaseException) -> str:
    # paramiko's messages about keys can name the key file; keep only the first line, minus paths.
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return " ".join("<path>" if "/" in word else word for word in text.split())


def _run(session: Session, host: RemoteHost, command: str, timeout: float) -> tuple[int, str, str]:
    with _errors(host):
        try:
            result = session.connection.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        except invoke.exceptions.CommandTimedOut:
            raise RemoteConnectError(
                f"a check on {host.address} did not finish within {timeout:g} s (is the host overloaded?)"
            ) from None
    return result.exited, result.stdout, result.stderr


def _check_versions(session: Session, host: RemoteHost) -> None:
    python = shlex.quote(host.python)
    code, out, err = _run(session, host, f"{python} -c {shlex.quote(_PROBE)}", _PROBE_TIMEOUT)
    where = f"{host.python} on {host.address}"
    lines = out.strip().splitlines()
    if code != 0 or not lines:
        raise RemoteVersionError(
            f"{where} did not run (exit {code}: {err.strip()[-300:]}); pass python= the path of a "
            f"Python {_local_python()} there"
        )
    seen = json.loads(lines[-1])
    fix = "install the same there, or pass ship_package=True to copy this one into a venv there"
    if seen["python"] != _local_python():
        raise RemoteVersionError(
            f"{where} is Python {seen['python']}, this one is {_local_python()} (tasks travel as pickled "
            f"code, which needs the same version): pass python= the path of a Python {_local_python()}"
        )
    if "error" in seen:
        raise RemoteVersionError(f"{where} cannot import procpool ({seen['error']}): {fix}")
    local = {"procpool": _procpool_version(), "cloudpickle": cloudpickle.__version__}
    for name, version in local.items():
        if seen[name] != version:
            raise RemoteVersionError(f"{where} has {name} {seen[name]}, this one is {version}: {fix}")


def _ship(session: Session, host: RemoteHost, cluster: bool = False) -> str:
    """Copy procpool and what the agent (or a cluster host) imports into a venv there; returns its python."""
    bundle, digest = _bundle(cluster)
    home = f"{_SHIP_ROOT}/{digest}"
    venv = f"{home}/venv"
    python = f"{venv}/bin/python"
    code, _, _ = _run(session, host, f"test -f {home}/ready", host.connect_timeout)
    if code == 0:
        return python
    log.info("shipping procpool %s to %s (%d kB)", _procpool_version(), host.address, len(bundle) // 1024)
    steps = [
        f"rm -rf {home} && mkdir -p {home} && {shlex.quote(host.python)} -m venv --without-pip {venv}",
        f"{python} -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))'",
    ]
    code, out, err = _run(session, host, " && ".join(steps), _SHIP_TIMEOUT)
    if code != 0:
        raise RemoteVersionError(f"could not make a venv on {host.address}: {err.strip()[-300:]}")
    site = out.strip().splitlines()[-1]
    with _errors(host):
        session.connection.put(io.BytesIO(bundle), remote=f"{home}/bundle.tar.gz")  # sftp
    bundle_path = f"{home}/bundle.tar.gz"
    unpack = f"tar -xzf {bundle_path} -C {shlex.quote(site)} && rm {bundle_path} && touch {home}/ready"
    code, _, err = _run(session, host, unpack, _SHIP_TIMEOUT)
    if code != 0:
        raise RemoteVersionError(f"could not unpack procpool on {host.address}: {err.strip()[-300:]}")
    return python


_CLUSTER_PACKAGES = ("psycopg", "psycopg_binary", "typing_extensions")  # psycopg and what it imports


@functools.cache
def _bundle(cluster: bool = False) -> tuple[bytes, str]:
    """A tar.gz of procpool and the packages its agent (or a cluster host) imports, and a digest of it."""
    buf = io.BytesIO()
    # mtime=0 in the gzip header too: the same files give the same digest, so a host is shipped to once.
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as packed,
        tarfile.open(fileobj=packed, mode="w") as tar,
    ):
        modules = [sys.modules["procpool"], cloudpickle, psutil]
        if cluster:
            modules += [importlib.import_module(name) for name in _CLUSTER_PACKAGES if _importable(name)]
        for module in modules:
            where = Path(module.__file__ or "")
            if where.name != "__init__.py":  # a single-file module (typing_extensions)
                tar.add(where, arcname=where.name, filter=_plain)
                continue
            roots = [where.parent]
            libs = where.parent.with_name(f"{where.parent.name}.libs")  # a manylinux wheel's own .so files
            roots += [libs] if libs.is_dir() else []
            for root in roots:
                for path in sorted(root.rglob("*")):
                    if path.is_file() and "__pycache__" not in path.parts:
                        tar.add(path, arcname=f"{root.name}/{path.relative_to(root)}", filter=_plain)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()[:16]


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _local_python() -> str:
    return "{}.{}".format(*sys.version_info[:2])


def _procpool_version() -> str:
    return str(sys.modules["procpool"].__version__)
