"""The cluster's queue on a real PostgreSQL server: order, fencing, leases, cancel, secrets."""

from __future__ import annotations

import threading

import pytest

from procpool._cluster.store import Store, StoreError, check_dsn, masked
from stress import pg

Row = tuple[int, str, bytes, float, int, bool]


def row(priority: int = 2, max_retries: int = 1, retry: bool = True) -> Row:
    return (priority, "f", b"payload", 5.0, max_retries, retry)


@pytest.fixture
def store(queue_dsn: str) -> Store:
    s = Store(queue_dsn)
    s.create_schema()
    yield s  # type: ignore[misc]
    s.close()


def expire(store: Store, host: str) -> None:
    store._run("UPDATE procpool_tasks SET lease_until = now() - interval '1 second' WHERE host = %s", [host])


def test_a_host_claims_only_what_its_python_can_run(store: Store) -> None:
    # Code pickled by value (a lambda) runs on the Python version that pickled it only.
    first, other, second = store.submit([row(), row(0), row()], "s", pythons=[None, "9.9", "3.0"])
    assert [c.task_id for c in store.claim("h", 5, 30, python="3.0")] == [first, second]
    assert store.claim("h", 5, 30, python="3.0") == []
    assert [c.task_id for c in store.claim("new", 5, 30, python="9.9")] == [other]


def test_claims_in_priority_then_submission_order_with_a_retry_in_its_place(store: Store) -> None:
    low, first, second, urgent = store.submit([row(3), row(2), row(2), row(0)], "s")
    claimed = store.claim("h", 2, 30)
    assert [c.task_id for c in claimed] == [urgent, first]
    assert store.fail("h", first, 1, b"e", "boom", retry=True) == "retrying"
    again = store.claim("h", 2, 30)
    assert [(c.task_id, c.attempt) for c in again] == [(first, 2), (second, 1)]  # ahead of later ones
    assert [c.task_id for c in store.claim("h", 5, 30)] == [low]


def test_a_result_from_an_attempt_that_lost_its_lease_is_rejected(store: Store) -> None:
    (number,) = store.submit([row(max_retries=2)], "s")
    (old,) = store.claim("frozen", 1, 30)
    expire(store, "frozen")
    assert store.sweep() == [(number, "retrying")]
    assert store.sweep() == []  # idempotent
    (new,) = store.claim("other", 1, 30)
    assert new.attempt == old.attempt + 1 == 2
    assert not store.finish("frozen", number, old.attempt, b"stale")
    assert store.fail("frozen", number, old.attempt, b"e", "stale", True) is None
    assert store.renew("frozen", [(number, old.attempt)], 30) == (set(), set())
    assert store.finish("other", number, new.attempt, b"fresh")
    assert not store.finish("other", number, new.attempt, b"twice")  # once ended, nothing rewrites it
    (r,) = store.rows([number])
    assert (r.state, r.result, r.attempts) == ("completed", b"fresh", 2)


def test_the_same_host_cannot_rewrite_a_task_it_failed(store: Store) -> None:
    (number,) = store.submit([row(max_retries=0)], "s")
    (claim,) = store.claim("h", 1, 30)
    assert store.fail("h", number, claim.attempt, b"e", "boom", True) == "failed"
    assert not store.finish("h", number, claim.attempt, b"late")
    assert not store.end("h", number, claim.attempt, b"", "late")
    assert store.rows([number])[0].state == "failed"


def test_lease_expiry_counts_the_attempt_and_fails_once_retries_are_spent(store: Store) -> None:
    (number,) = store.submit([row(max_retries=1)], "s")
    for expected in ("retrying", "failed"):
        store.claim("h", 1, 30)
        expire(store, "h")
        assert store.sweep() == [(number, expected)]
    (r,) = store.rows([number])
    assert r.attempts == 2 and "lost its lease" in (r.error_text or "")


def test_renewal_keeps_a_lease_and_reports_a_cancel(store: Store) -> None:
    (number,) = store.submit([row()], "s")
    (claim,) = store.claim("h", 1, 0.5)
    assert store.renew("h", [(number, 1)], 30) == ({(number, 1)}, set())
    assert store.sweep() == []
    assert store.cancel(number, running=False) is False  # running: a Future's cancel() declines
    assert store.cancel(number) is True
    assert store.renew("h", [(number, 1)], 30) == ({(number, 1)}, {number})
    assert store.fail("h", number, claim.attempt, b"e", "killed", True) == "cancelled"  # not retried


def test_cancel_drops_a_queued_task_and_declines_an_ended_one(store: Store) -> None:
    queued, done = store.submit([row(), row()], "s")
    assert store.cancel(queued) is True
    assert store.claim("h", 5, 30)[0].task_id == done
    assert store.finish("h", done, 1, b"r")
    assert store.cancel(done) is False and store.cancel(queued) is False
    assert store.cancel(10**9) is False
    assert store.rows([queued])[0].state == "cancelled"


def test_concurrent_claimers_never_take_one_task_twice(store: Store, queue_dsn: str) -> None:
    ids = store.submit([row() for _ in range(300)], "s")
    taken: list[list[int]] = []

    def claimer(name: str) -> None:
        mine: list[int] = []
        s = Store(queue_dsn)
        while claims := s.claim(name, 7, 30):
            mine += [c.task_id for c in claims]
        s.close()
        taken.append(mine)

    threads = [threading.Thread(target=claimer, args=(f"h{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [i for mine in taken for i in mine]
    assert sorted(everything) == ids


def test_results_older_than_their_ttl_are_dropped(store: Store) -> None:
    old, new = store.submit([row(), row()], "s")
    store.claim("h", 2, 30)
    assert store.finish("h", old, 1, b"r") and store.finish("h", new, 1, b"r")
    store._run("UPDATE procpool_tasks SET finished_at = now() - interval '2 hours' WHERE id = %s", [old])
    store.sweep(result_ttl=3600)
    assert [r.task_id for r in store.rows([old, new])] == [new]


def test_the_password_never_shows() -> None:
    dsn = "postgresql://alice:s3cr3t-pw@db.example.com:5432/jobs?sslmode=require"
    assert "s3cr3t" not in masked(dsn) and "sslmode=require" in masked(dsn)
    assert "s3cr3t" not in repr(Store(dsn))
    with pytest.raises(ValueError) as bad:
        check_dsn("postgresql://alice:s3cr3t@/x?bogus_option=1")
    assert "s3cr3t" not in str(bad.value)
    unreachable = Store("postgresql://alice:s3cr3t-pw@127.0.0.1:1/jobs", connect_timeout=1)
    with pytest.raises(StoreError) as down:
        unreachable.claim("h", 1, 30)
    assert "s3cr3t" not in str(down.value)


def test_the_first_call_after_a_database_restart_reconnects(store: Store, pg_server: pg.Server) -> None:
    (number,) = store.submit([row()], "s")
    pg_server.stop("fast")  # the server ends the idle connection as it goes
    pg_server.start()
    assert [r.task_id for r in store.rows([number])] == [number]  # no StoreError: nothing was sent yet
    assert store.submit([row()], "s") == [number + 1]  # and a write on it counts once
