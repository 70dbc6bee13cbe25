"""A real OpenSSH server on 127.0.0.1 for the remote-worker tests (Debian's openssh-server).

Everything lives in a temporary folder: host key, user key, authorized_keys,
known_hosts and the config. Nothing is installed at run time; ``.ci/run``
installs the package. ``kill()`` ends the server with every session it
serves (a host going down); ``start()`` brings it back with the same key.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

SSHD = "/usr/sbin/sshd"
_START_WAIT = 10.0  # seconds for sshd to accept connections


def available() -> bool:
    tools = ("ssh-keygen", "setpriv")
    return os.path.exists(SSHD) and all(shutil.which(t) for t in tools) and os.geteuid() == 0


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "procpool-test", "-f", str(path)], check=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SSHServer:
    """One sshd acting as one host, with a user key it accepts and a known_hosts that trusts it."""

    def __init__(self, root: Path, user_key: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = root / "host_key"
        keygen(self.host_key)
        self.user_key = user_key
        (root / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
        pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\nMaxStartups 100\nMaxSessions 50\nLogLevel ERROR\n"
            # The login shell reads $HOME/.bashrc: this machine's own (it may start pyenv, which
            # waits on a lock a killed login leaves behind) is not the test host's business.
            f"SetEnv HOME={root}\n"
        )
        self.pid: int | None = None  # of sshd, while it runs
        self.start()

    @property
    def credentials(self) -> dict[str, str]:
        return {"username": "root", "key": str(self.user_key)}

    def options(self) -> dict[str, Any]:
        """``add_remote_worker`` arguments to reach this server, with this interpreter on the other side."""
        return {
            "host": "127.0.0.1", "port": self.port, "credentials": self.credentials,
            "python": sys.executable, "known_hosts": str(self.known_hosts),
        }  # fmt: skip

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
        # setpriv: sshd dies with whatever started it, even if that was SIGKILLed.
        # posix_spawn, not subprocess: Popen waits on a pipe until exec closes it, and a pool
        # worker forked meanwhile by another thread keeps a copy of that pipe for its whole life.
        command = ["setpriv", "--pdeathsig", "KILL", SSHD, "-D", "-f", str(self.config)]
        stdin = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        self.pid = os.posix_spawnp(command[0], command, os.environ, file_actions=stdin)
        deadline = time.monotonic() + _START_WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if os.waitpid(self.pid, os.WNOHANG) != (0, 0) or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start on port {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL sshd and every session, agent and task under it: the host is down."""
        if self.pid is None:
            return
        try:
            tree = [psutil.Process(self.pid), *psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped already, when it failed to start
        self.pid = None
        # The rest are init's to reap (here maybe never): dead is enough.
        deadline = time.monotonic() + _START_WAIT
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.01)

    def agents(self) -> list[psutil.Process]:
        """The procpool agents serving connections now (not their worker children)."""
        found = {}  # pid -> (process, parent pid)
        for proc in self.sessions():
            try:
                if "procpool._remote.agent" in " ".join(proc.cmdline()):
                    found[proc.pid] = (proc, proc.ppid())
            except psutil.Error:
                continue  # it ended meanwhile
        return [proc for proc, parent in found.values() if parent not in found]

    def sessions(self) -> list[psutil.Process]:
        """Processes serving connections now (sshd's children and theirs)."""
        if self.pid is None:
            return []
        return psutil.Process(self.pid).children(recursive=True)


@contextmanager
def loopback_hosts(count: int) -> Iterator[list[SSHServer]]:
    """``count`` servers on 127.0.0.1 that accept one user key; all killed at the end."""
    if count == 0:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="procpool-ssh-") as tmp:
        root = Path(tmp)
        keygen(root / "user_key")
        hosts: list[SSHServer] = []
        try:
            for i in range(count):
                hosts.append(SSHServer(root / f"host-{i}", root / "user_key"))
            yield hosts
        finally:
            for host in hosts:
                host.kill()
