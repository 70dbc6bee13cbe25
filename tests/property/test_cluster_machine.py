"""The cluster's queue against a model, on a real PostgreSQL server, over several simulated hosts.

Rules submit, claim, finish, fail, cancel, renew, let leases run out and sweep;
a stale host writes with attempts it no longer holds. After every step:
the database holds exactly the model's states and attempts (invariant 1: a
terminal state is sticky, and each task was announced done exactly once),
claims came in strict (priority, id) order with retries in their place
(invariant 3), and the counts add up (invariant 4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from procpool._cluster.store import DONE, Listener, Store

HOSTS = ("h0", "h1", "h2")
CLAIMABLE = ("pending", "retrying")
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Model:
    priority: int
    max_retries: int
    retry: bool
    state: str = "pending"
    attempts: int = 0
    host: str | None = None
    cancel_requested: bool = False
    expired: bool = False


class ClusterQueue(RuleBasedStateMachine):
    dsn = ""

    @initialize()
    def fresh(self) -> None:
        self.store = Store(self.dsn)
        self.store.create_schema()
        self.store._run("TRUNCATE procpool_tasks RESTART IDENTITY")
        self.listener = Listener(self.dsn, [DONE])
        self.listener.wait(0)
        self.tasks: dict[int, Model] = {}
        self.stale: list[tuple[str, int, int]] = []  # (host, id, attempt) no longer holding their task
        self.announced: dict[int, int] = {}

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
            self.listener.close()

    def held(self, host: str | None = None) -> list[int]:
        return sorted(
            i for i, t in self.tasks.items() if t.state == "running" and (host is None or t.host == host)
        )

    def lose(self, number: int) -> None:
        task = self.tasks[number]
        assert task.host is not None
        self.stale.append((task.host, number, task.attempts))

    # -- rules -----------------------------------------------------------------

    @rule(
        priorities=st.lists(st.integers(0, 3), min_size=1, max_size=4),
        max_retries=st.integers(0, 2),
        retry=st.booleans(),
    )
    def submit(self, priorities: list[int], max_retries: int, retry: bool) -> None:
        rows = [(p, "f", b"payload", 5.0, max_retries, retry) for p in priorities]
        ids = self.store.submit(rows, "submitter")
        assert ids == sorted(ids) and len(ids) == len(priorities)
        for number, priority in zip(ids, priorities, strict=True):
            self.tasks[number] = Model(priority, max_retries, retry)

    @rule(host=st.sampled_from(HOSTS), count=st.integers(1, 3))
    def claim(self, host: str, count: int) -> None:
        waiting = sorted(
            (t.priority, i) for i, t in self.tasks.items() if t.state in CLAIMABLE
        )  # strict order: retries kept their id, so their place
        expected = [i for _, i in waiting[:count]]
        claims = self.store.claim(host, count, 30.0)
        assert [c.task_id for c in claims] == expected
        for c in claims:
            task = self.tasks[c.task_id]
            task.state, task.attempts, task.host, task.expired = "running", task.attempts + 1, host, False
            assert c.attempt == task.attempts

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        held = self.held()
        if not held:
            return
        number = data.draw(st.sampled_from(held))
        task = self.tasks[number]
        assert self.store.finish(task.host, number, task.attempts, b"result")  # type: ignore[arg-type]
        task.state = "completed"

    @rule(data=st.data(), retry=st.booleans())
    def fail(self, data: st.DataObject, retry: bool) -> None:
        held = self.held()
        if not held:
            return
        number = data.draw(st.sampled_from(held))
        task = self.tasks[number]
        state = self.store.fail(task.host, number, task.attempts, b"error", "boom", retry)  # type: ignore[arg-type]
        if task.cancel_requested:
            expected = "cancelled"
        elif retry and task.attempts <= task.max_retries:
            expected = "retrying"
        else:
            expected = "failed"
        assert state == expected
        self.lose(number)
        task.state = expected
        task.host = task.host if expected in TERMINAL else None

    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        held = self.held()
        if not held:
            return
        number = data.draw(st.sampled_from(held))
        task = self.tasks[number]
        assert self.store.end(task.host, number, task.attempts, b"", "deadline")  # type: ignore[arg-type]
        task.state = "cancelled"

    @rule(data=st.data(), running=st.booleans())
    def cancel(self, data: st.DataObject, running: bool) -> None:
        if not self.tasks:
            return
        number = data.draw(st.sampled_from(sorted(self.tasks)))
        task = self.tasks[number]
        expected = task.state in CLAIMABLE or (running and task.state == "running")
        assert self.store.cancel(number, running=running) is expected
        if expected:
            task.cancel_requested = True
            if task.state in CLAIMABLE:
                task.state = "cancelled"

    @rule(host=st.sampled_from(HOSTS))
    def renew(self, host: str) -> None:
        pairs = [(i, self.tasks[i].attempts) for i in self.held(host)]
        stale = [(i, a) for h, i, a in self.stale if h == host]
        kept, cancelled = self.store.renew(host, pairs + stale, 30.0)
        assert kept == set(pairs)
        assert cancelled == {i for i, _ in pairs if self.tasks[i].cancel_requested}
        for i, _ in pairs:
            self.tasks[i].expired = False

    @rule(host=st.sampled_from(HOSTS))
    def expire(self, host: str) -> None:
        """Time passes for this host's leases (it froze, or died)."""
        self.store._run(
            "UPDATE procpool_tasks SET lease_until = now() - interval '1 second' "
            "WHERE host = %s AND state = 'running'",
            [host],
        )
        for i in self.held(host):
            self.tasks[i].expired = True

    @rule()
    def sweep(self) -> None:
        expected = {}
        for i, task in self.tasks.items():
            if task.state == "running" and task.expired:
                if task.cancel_requested:
                    expected[i] = "cancelled"
                elif task.attempts <= task.max_retries:
                    expected[i] = "retrying"
                else:
                    expected[i] = "failed"
        assert dict(self.store.sweep()) == expected
        for i, state in expected.items():
            self.lose(i)
            task = self.tasks[i]
            task.state, task.expired = state, False
            task.host = task.host if state in TERMINAL else None
        assert self.store.sweep() == []  # idempotent

    @rule(data=st.data(), how=st.sampled_from(["finish", "fail", "end"]))
    def stale_write(self, data: st.DataObject, how: str) -> None:
        """A host writes for an attempt it no longer holds: rejected, nothing changes."""
        if not self.stale:
            return
        host, number, attempt = data.draw(st.sampled_from(self.stale))
        if how == "finish":
            assert not self.store.finish(host, number, attempt, b"late")
        elif how == "fail":
            assert self.store.fail(host, number, attempt, b"late", "late", True) is None
        else:
            assert not self.store.end(host, number, attempt, b"late", "late")

    # -- invariants --------------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        if not hasattr(self, "store"):
            return
        rows = {r.task_id: r for r in self.store.rows(list(self.tasks))}
        assert set(rows) == set(self.tasks)
        for number, task in self.tasks.items():
            row = rows[number]
            assert (row.state, row.attempts) == (task.state, task.attempts), number
            if task.state == "running":
                assert row.host == task.host
            if task.state in TERMINAL:
                assert row.finished_at is not None
            if task.state == "completed":
                assert row.result == b"result"

    @invariant()
    def each_end_announced_once(self) -> None:
        if not hasattr(self, "store"):
            return
        ended = {i for i, t in self.tasks.items() if t.state in TERMINAL}
        deadline = time.monotonic() + 5
        while True:
            for _, payload in self.listener.wait(0 if set(self.announced) == ended else 0.05):
                self.announced[int(payload)] = self.announced.get(int(payload), 0) + 1
            if set(self.announced) == ended or time.monotonic() > deadline:
                break
        assert set(self.announced) == ended
        assert all(n == 1 for n in self.announced.values()), self.announced

    @invariant()
    def counts_add_up(self) -> None:
        if not hasattr(self, "store"):
            return
        counts = self.store.counts()
        assert sum(counts["states"].values()) == len(self.tasks)
        queued = [t.priority for t in self.tasks.values() if t.state in CLAIMABLE]
        assert counts["depth"] == {p: queued.count(p) for p in set(queued)}


@pytest.mark.timeout(300)
def test_cluster_queue_machine(queue_dsn: str) -> None:
    ClusterQueue.dsn = queue_dsn
    run_state_machine_as_test(
        ClusterQueue,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
