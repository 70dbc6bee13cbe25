"""A throwaway PostgreSQL server for the cluster tests and ``stress cluster`` (Debian's postgresql).

``initdb`` in a temporary folder (as the ``postgres`` user when run as root,
since initdb refuses root), the socket in that folder and no TCP listener,
trust authentication for local connections. ``stop()`` (fast or immediate,
a crash) and ``start()`` restart it on the same data; ``close()`` removes it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_START_WAIT = 30  # seconds for pg_ctl to see the server accept connections


def bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent  # beside initdb and pg_basebackup, not a lone symlink
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def available() -> bool:
    if bin_dir() is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


class Server:
    """One PostgreSQL server on a Unix socket in its own folder; ``dsn`` reaches its ``postgres`` db."""

    def __init__(
        self, name: str = "procpool-pg-", primary: Server | None = None, durable: bool = False
    ) -> None:
        """A new server; with ``primary``, a streaming standby of it (``pg_basebackup``).

        ``durable`` keeps fsync and synchronous commit on (what failover is tested with);
        otherwise they are off, for speed.
        """
        tools = bin_dir()
        if tools is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self._bin = tools
        self.root = Path(tempfile.mkdtemp(prefix=name))
        self.data = self.root / "data"
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        if primary is None:
            self._run(
                "initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync"
            )
        else:  # -R writes primary_conninfo and standby.signal
            self._run("pg_basebackup", "-D", str(self.data), "-h", str(primary.root), "-U", self.user, "-R")
            with open(self.data / "postgresql.auto.conf", "a") as auto:  # once promoted, wait for no standby
                auto.write("synchronous_standby_names = ''\n")
        speed = "" if durable else "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = ''\nunix_socket_directories = '{self.root}'\n{speed}"
                "max_connections = 200\nlog_min_messages = warning\n"
            )
        self.dsn = f"postgresql://{self.user}@/postgres?host={self.root}"
        self.start()

    def database(self, name: str) -> str:
        """Create an empty database (dropped first if it exists); its DSN."""
        with psycopg_connect(self.dsn) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn.replace("/postgres?", f"/{name}?")

    def drop(self, name: str) -> None:
        with psycopg_connect(self.dsn) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=self.root
        )
        if done.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()}")

    def standby(self) -> Server:
        """A synchronous standby of this server: a commit returns once the standby has it too."""
        with psycopg_connect(self.dsn) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("ALTER SYSTEM SET synchronous_commit = 'on'")
            conn.execute("SELECT pg_reload_conf()")
        return Server("procpool-pg-standby-", primary=self, durable=True)

    def promote(self) -> None:
        """Make this standby the primary."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def start(self) -> None:
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", str(_START_WAIT), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: "fast" ends every session; "immediate" is a crash (recovery at start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def psycopg_connect(dsn: str) -> Any:
    import psycopg  # the postgres extra: only what uses a server needs it

    return psycopg.connect(dsn, autocommit=True)
