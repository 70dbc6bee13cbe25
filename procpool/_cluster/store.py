"""The cluster's queue in PostgreSQL: every state change is one statement, fenced by attempt.

submitter ── submit (one INSERT per batch, NOTIFY procpool_new) ──▶ procpool_tasks
host      ── claim (ORDER BY priority, id FOR UPDATE SKIP LOCKED) ──▶ running, attempt + 1, lease
host      ── renew (its held (id, attempt) pairs) ◀── which it still holds, which are cancelled
host      ── finish / fail / end (WHERE id, attempt, host, state = running) ──▶ NOTIFY procpool_done
anyone    ── sweep: running past its lease ──▶ retrying (attempt counted) or failed; idempotent
submitter ── cancel: pending ──▶ cancelled; running ──▶ cancel_requested, NOTIFY procpool_cancel

Lease times are the database's own clock (``now()``), so hosts' clocks never
matter. A result from an attempt that no longer holds the task (its lease
was swept, or it was cancelled) matches no row and is rejected. This is the
one module that imports psycopg.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .._payload import PYTHON

__all__ = ("CANCEL", "DONE", "NEW", "Claim", "Listener", "Row", "Store", "StoreError", "check_dsn", "masked")

NEW, DONE, CANCEL = "procpool_new", "procpool_done", "procpool_cancel"  # NOTIFY channels
_CLAIMABLE = ("pending", "retrying")
_TERMINAL = ("completed", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS procpool_tasks (
    id bigserial PRIMARY KEY,
    priority smallint NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    name text NOT NULL,
    payload bytea,
    timeout double precision NOT NULL,
    max_retries integer NOT NULL,
    retry_errors boolean NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    host text,
    lease_until timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    result bytea,
    error bytea,
    error_text text,
    submitter text NOT NULL,
    submitted_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
);
ALTER TABLE procpool_tasks ADD COLUMN IF NOT EXISTS python text;  -- tables made by an earlier version
CREATE INDEX IF NOT EXISTS procpool_tasks_queue ON procpool_tasks (priority, id)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS procpool_tasks_leases ON procpool_tasks (lease_until) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS procpool_tasks_finished ON procpool_tasks (finished_at)
    WHERE state IN ('completed', 'failed', 'cancelled');
CREATE TABLE IF NOT EXISTS procpool_hosts (
    name text PRIMARY KEY,
    slots integer NOT NULL,
    busy integer NOT NULL,
    completed bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at timestamptz NOT NULL DEFAULT now()
);
"""
_SCHEMA_LOCK = 0x70726F63  # an advisory lock: two first users do not create the tables at once


class StoreError(ConnectionError):
    """The database could not be reached, or a statement failed for lack of it; retry later."""


class Claim(NamedTuple):
    """A task a host now holds: run attempt ``attempt`` of it within ``timeout`` seconds."""

    task_id: int
    attempt: int
    priority: int
    name: str
    payload: bytes
    timeout: float
    retry_errors: bool


class Row(NamedTuple):
    """One task as the database has it (a submitter's view; no payload)."""

    task_id: int
    state: str
    priority: int
    name: str
    attempts: int
    host: str | None
    result: bytes | None
    error: bytes | None
    error_text: str | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None


_ROW = (
    "id, state, priority, name, attempts, host, result, error, error_text, extract(epoch from submitted_at), "
    "extract(epoch from started_at), extract(epoch from finished_at)"
)


def masked(dsn: str) -> str:
    """The DSN with its password replaced, fit for a log or a repr."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)  # type: ignore[arg-type]


def _readable(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection has input: the server's goodbye (or its end of file)."""
    poll = select.poll()
    poll.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poll.poll(0))


def check_dsn(dsn: object) -> str:
    """Raise ValueError naming the problem (never the password) if ``dsn`` cannot be a DSN."""
    if not isinstance(dsn, str):
        raise TypeError(f"queue must be a PostgreSQL DSN string, not {type(dsn).__name__}")
    if not dsn.strip():
        raise ValueError(
            "queue is empty: give a PostgreSQL DSN (postgresql://user@host/dbname; "
            "'postgresql://' takes everything from the PG* environment variables)"
        )
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ValueError("queue is not a valid PostgreSQL DSN (postgresql://user@host/dbname)") from None
    return dsn


class Store:
    """One connection to the cluster's database; each method is one transaction.

    Thread-safe (one statement at a time). A connection the server closed while
    it was idle (a restart, a failover) is replaced before the statement is sent;
    one lost while a statement runs raises StoreError, and the next call connects again.
    """

    def __init__(self, dsn: str, connect_timeout: float = 5.0) -> None:
        self._dsn = check_dsn(dsn)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def __repr__(self) -> str:
        return f"<Store {masked(self._dsn)}>"

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and _readable(self._conn):
            self._drop()  # the server ended it: an idle connection has nothing to read
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=max(1, round(self._connect_timeout))
            )
        return self._conn

    def _run(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        with self._lock, _unreachable(self._drop):
            conn = self._connection()
            with conn.cursor() as cur:  # one statement: its own transaction (autocommit)
                cur.execute(sql, params)
                return cur.fetchall() if cur.description is not None else []

    def _drop(self) -> None:
        _close_quietly(self._conn)
        self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- set-up ----------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the tables if they are missing (idempotent; safe from many hosts at once)."""
        self._run(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK}); {_SCHEMA}")

    # -- submitters --------------------------------------------------------------

    def submit(
        self,
        tasks: Sequence[tuple[int, str, bytes, float, int, bool]],
        submitter: str,
        pythons: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Queue rows of (priority, name, payload, timeout, max_retries, retry_errors); ids in order.

        ``pythons``: per row, the only Python version ("3.11") whose hosts may claim it, or
        None for any (see ``_payload.needs_same_python``); None for all rows by default.
        """
        if not tasks:
            return []
        columns = [list(c) for c in zip(*tasks, strict=True)]
        columns.append(list(pythons) if pythons is not None else [None] * len(tasks))
        rows = self._run(
            "WITH new AS (INSERT INTO procpool_tasks "
            "(priority, name, payload, timeout, max_retries, retry_errors, python, submitter) "
            "SELECT p, n, b, t, r, e, v, %s FROM unnest(%s::smallint[], %s::text[], %s::bytea[], "
            "%s::float8[], %s::integer[], %s::boolean[], %s::text[]) "
            "WITH ORDINALITY AS t(p, n, b, t, r, e, v, o) ORDER BY o RETURNING id) "
            "SELECT id, pg_notify(%s, '') FROM new ORDER BY id",
            [submitter, *columns, NEW],
        )
        return [row[0] for row in rows]

    def cancel(self, task_id: int, running: bool = True) -> bool:
        """Cancel a task: a queued one ends now; a running one (if ``running``) is asked to stop.

        Returns False if it had ended (or was running, without ``running``).
        """
        states = "('pending', 'retrying', 'running')" if running else "('pending', 'retrying')"
        rows = self._run(
            "WITH c AS (UPDATE procpool_tasks SET "
            "state = CASE WHEN state = 'running' THEN state ELSE 'cancelled' END, "
            "cancel_requested = true, payload = CASE WHEN state = 'running' THEN payload END, "
            "finished_at = CASE WHEN state = 'running' THEN NULL ELSE now() END, "
            "error_text = COALESCE(error_text, 'cancelled by the user') "
            f"WHERE id = %s AND state IN {states} RETURNING id, state) "
            "SELECT id, state, pg_notify(CASE WHEN state = 'running' THEN %s ELSE %s END, id::text) FROM c",
            [task_id, CANCEL, DONE],
        )
        return bool(rows)

    def rows(self, task_ids: Iterable[int], ended_only: bool = False) -> list[Row]:
        """The tasks among ``task_ids`` (ended ones only, if asked) as the database has them."""
        where = " AND state IN ('completed', 'failed', 'cancelled')" if ended_only else ""
        found = self._run(f"SELECT {_ROW} FROM procpool_tasks WHERE id = ANY(%s){where}", [list(task_ids)])
        return [_row(r) for r in found]

    def counts(self) -> dict[str, Any]:
        """Tasks by state and queued tasks by priority, and the hosts seen in the last minute."""
        states = {s: n for s, n in self._run("SELECT state, count(*) FROM procpool_tasks GROUP BY state")}
        depth = {
            p: n
            for p, n in self._run(
                "SELECT priority, count(*) FROM procpool_tasks WHERE state IN ('pending', 'retrying') "
                "GROUP BY priority"
            )
        }
        hosts = self._run(
            "SELECT name, slots, busy, completed, failed, extract(epoch from now() - seen_at) "
            "FROM procpool_hosts WHERE seen_at > now() - interval '60 seconds' ORDER BY name"
        )
        return {"states": states, "depth": depth, "hosts": hosts}

    # -- hosts -------------------------------------------------------------------

    def claim(self, host: str, count: int, lease: float, python: str = PYTHON) -> list[Claim]:
        """Take up to ``count`` queued tasks, highest priority and oldest first, each for one attempt.

        A host of Python ``python`` skips the tasks only another version can run.
        """
        if count <= 0:
            return []
        rows = self._run(
            "WITH picked AS (SELECT id FROM procpool_tasks WHERE state IN ('pending', 'retrying') "
            "AND (python IS NULL OR python = %s) "
            "ORDER BY priority, id LIMIT %s FOR UPDATE SKIP LOCKED) "
            "UPDATE procpool_tasks t SET state = 'running', attempts = t.attempts + 1, host = %s, "
            "lease_until = now() + make_interval(secs => %s), started_at = now() "
            "FROM picked WHERE t.id = picked.id "
            "RETURNING t.id, t.attempts, t.priority, t.name, t.payload, t.timeout, t.retry_errors",
            [python, count, host, lease],
        )
        return sorted((Claim(*r) for r in rows), key=lambda c: (c.priority, c.task_id))

    def renew(
        self, host: str, held: Sequence[tuple[int, int]], lease: float
    ) -> tuple[set[tuple[int, int]], set[int]]:
        """Extend the leases of ``held`` (id, attempt) pairs: which it still holds, which are cancelled."""
        if not held:
            return set(), set()
        ids, attempts = (list(c) for c in zip(*held, strict=True))
        rows = self._run(
            "UPDATE procpool_tasks t SET lease_until = now() + make_interval(secs => %s) "
            "FROM unnest(%s::bigint[], %s::integer[]) AS h(id, attempt) "
            "WHERE t.id = h.id AND t.attempts = h.attempt AND t.host = %s AND t.state = 'running' "
            "RETURNING t.id, t.attempts, t.cancel_requested",
            [lease, ids, attempts, host],
        )
        return {(r[0], r[1]) for r in rows}, {r[0] for r in rows if r[2]}

    def finish(self, host: str, task_id: int, attempt: int, result: bytes) -> bool:
        """Record attempt ``attempt``'s result; False (and nothing written) if it no longer holds the task."""
        return bool(self.finish_many(host, [(task_id, attempt, result)]))

    def finish_many(self, host: str, results: Sequence[tuple[int, int, bytes]]) -> set[int]:
        """Record (id, attempt, result) results in one statement; the ids whose attempt still held them."""
        if not results:
            return set()
        ids, attempts, blobs = (list(c) for c in zip(*results, strict=True))
        rows = self._run(
            "WITH u AS (UPDATE procpool_tasks t SET state = 'completed', result = h.result, error = NULL, "
            "error_text = NULL, lease_until = NULL, payload = NULL, finished_at = now() "
            "FROM unnest(%s::bigint[], %s::integer[], %s::bytea[]) AS h(id, attempt, result) "
            "WHERE t.id = h.id AND t.attempts = h.attempt AND t.host = %s AND t.state = 'running' "
            "RETURNING t.id) SELECT id, pg_notify(%s, id::text) FROM u",
            [ids, attempts, blobs, host, DONE],
        )
        return {r[0] for r in rows}

    def fail(self, host: str, task_id: int, attempt: int, error: bytes, text: str, retry: bool) -> str | None:
        """Record a failed attempt: queued again in its place while retries remain (``retry``), else failed.

        Returns the task's new state, or None if the attempt no longer held it.
        """
        state = (
            "CASE WHEN cancel_requested THEN 'cancelled' WHEN attempts <= max_retries THEN 'retrying' "
            "ELSE 'failed' END"
            if retry
            else "CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END"
        )
        rows = self._end_rows(host, task_id, attempt, state, error=error, text=text)
        return rows[0][1] if rows else None

    def end(self, host: str, task_id: int, attempt: int, error: bytes, text: str) -> bool:
        """Record an attempt cancelled for good (its deadline, or the user's cancel)."""
        return self._end(host, task_id, attempt, "'cancelled'", error=error, text=text)

    def _end(self, host: str, task_id: int, attempt: int, state: str, **values: Any) -> bool:
        return bool(self._end_rows(host, task_id, attempt, state, **values))

    def _end_rows(
        self,
        host: str,
        task_id: int,
        attempt: int,
        state: str,
        result: bytes | None = None,
        error: bytes | None = None,
        text: str | None = None,
    ) -> list[tuple[Any, ...]]:
        terminal = "s.new IN ('completed', 'failed', 'cancelled')"
        return self._run(
            f"WITH s AS (SELECT id, {state} AS new FROM procpool_tasks "
            "WHERE id = %s AND attempts = %s AND host = %s AND state = 'running' FOR UPDATE), "
            "u AS (UPDATE procpool_tasks t SET state = s.new, result = %s, error = %s, error_text = %s, "
            f"lease_until = NULL, host = CASE WHEN {terminal} THEN t.host END, "
            f"payload = CASE WHEN {terminal} THEN NULL ELSE t.payload END, "
            f"finished_at = CASE WHEN {terminal} THEN now() END "
            "FROM s WHERE t.id = s.id RETURNING t.id, t.state) "
            "SELECT id, state, pg_notify(CASE WHEN state = 'retrying' THEN %s ELSE %s END, id::text) FROM u",
            [task_id, attempt, host, result, error, text, NEW, DONE],
        )

    def sweep(self, result_ttl: float | None = None) -> list[tuple[int, str]]:
        """Requeue or fail every task whose lease ran out, and drop ended tasks older than ``result_ttl``.

        Idempotent, and any host may run it at any time. Returns the swept (id, new state) pairs.
        """
        terminal = "s.new IN ('completed', 'failed', 'cancelled')"
        rows = self._run(
            "WITH s AS (SELECT id, CASE WHEN cancel_requested THEN 'cancelled' "
            "WHEN attempts <= max_retries THEN 'retrying' ELSE 'failed' END AS new FROM procpool_tasks "
            "WHERE state = 'running' AND lease_until < now() FOR UPDATE SKIP LOCKED), "
            "u AS (UPDATE procpool_tasks t SET state = s.new, error = NULL, "
            "error_text = 'host ' || t.host || ' lost its lease on attempt ' || t.attempts, "
            f"lease_until = NULL, host = CASE WHEN {terminal} THEN t.host END, "
            f"payload = CASE WHEN {terminal} THEN NULL ELSE t.payload END, "
            f"finished_at = CASE WHEN {terminal} THEN now() END "
            "FROM s WHERE t.id = s.id RETURNING t.id, t.state) "
            "SELECT id, state, pg_notify(CASE WHEN state = 'retrying' THEN %s ELSE %s END, id::text) FROM u",
            [NEW, DONE],
        )
        if result_ttl is not None:
            self._run(
                "DELETE FROM procpool_tasks WHERE state IN ('completed', 'failed', 'cancelled') "
                "AND finished_at < now() - make_interval(secs => %s)",
                [result_ttl],
            )
        return [(r[0], r[1]) for r in rows]

    def beat(self, host: str, slots: int, busy: int, completed: int, failed: int) -> None:
        """Say this host is alive, with its figures (for ``procpool top --queue``)."""
        self._run(
            "INSERT INTO procpool_hosts (name, slots, busy, completed, failed) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET slots = excluded.slots, busy = excluded.busy, "
            "completed = excluded.completed, failed = excluded.failed, seen_at = now()",
            [host, slots, busy, completed, failed],
        )

    def leave(self, host: str) -> None:
        self._run("DELETE FROM procpool_hosts WHERE name = %s", [host])


def _row(r: tuple[Any, ...]) -> Row:
    number, state, priority, name, attempts, host, result, error, text, submitted, started, finished = r
    return Row(
        number, state, priority, name, attempts, host, result, error, text, float(submitted),
        None if started is None else float(started), None if finished is None else float(finished),
    )  # fmt: skip


def _reason(exc: psycopg.Error) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Listener:
    """A connection of its own that LISTENs on the given channels; ``wait`` returns what arrived.

    After a lost connection it connects again on the next ``wait``, and says
    so (``reconnected``): notifications sent meanwhile are lost, so the caller
    looks at the table once.
    """

    def __init__(self, dsn: str, channels: Sequence[str]) -> None:
        self._dsn = check_dsn(dsn)
        self._channels = tuple(channels)
        self._conn: psycopg.Connection[Any] | None = None
        self.reconnected = False

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """Notifications received within ``timeout`` seconds (returns at the first ones)."""
        with _unreachable(self.close):
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
                for channel in self._channels:
                    self._conn.execute(f"LISTEN {channel}")
                self.reconnected = True
            found = [(n.channel, n.payload) for n in self._conn.notifies(timeout=timeout, stop_after=1)]
            while True:  # and everything else already here
                more = [(n.channel, n.payload) for n in self._conn.notifies(timeout=0)]
                if not more:
                    return found
                found.extend(more)

    def close(self) -> None:
        _close_quietly(self._conn)
        self._conn = None


def _close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass


@contextmanager
def _unreachable(drop: Callable[[], None]) -> Iterator[None]:
    """A lost connection: ``drop`` it (the next call connects again) and raise StoreError."""
    try:
        yield
    except psycopg.OperationalError as exc:
        drop()
        raise StoreError(f"cluster database unreachable: {_reason(exc)}") from None
