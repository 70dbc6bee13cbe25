"""Hypothesis stateful test: submit, batch, cancel, worker kills, frozen workers and hostile tasks.

Hostile tasks fork the worker and return in both processes, or leave a
double-forked daemon in a session of its own (then return, or hang to their
deadline). Invariants checked (DESIGN.md): stats add up after every step; in
the end every task is in exactly one terminal state, reported exactly once,
and no process a task started outlives the pool.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections import Counter
from pathlib import Path

import faults
from conftest import pid_alive, wait_until
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from procpool import DistributedExecutor, TaskPriority, TaskRecord, TaskStatus, WorkerLostError
from procpool._states import TERMINAL

KINDS = {
    "ok": (faults.double, (3,), None),
    "raise": (faults.raise_value_error, (), None),
    "die": (faults.kill_self, (), None),
    "hang": (faults.hang, (), 0.2),
    "slow": (faults.sleep_then, (0.05, 1), None),
    "fork": (faults.fork_and_return, (7,), None),
    "daemon": (faults.daemon_then_return, (), None),  # its pid file is added at submission
    "daemon_hang": (faults.daemon_then_hang, (), 0.3),
}
DAEMONS = ("daemon", "daemon_hang")
PARTS = ("pending_tasks", "running_tasks", "completed_tasks", "failed_tasks", "cancelled_tasks")


class ExecutorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # heartbeat_timeout=1: a frozen worker is found hung and replaced within about 2 s.
        self.executor = DistributedExecutor(
            max_local_workers=2, task_timeout=20, max_retries=1, kill_grace=0.2, heartbeat_timeout=1.0
        )
        self.tmp = Path(tempfile.mkdtemp(prefix="procpool-machine-"))
        self.kinds: dict[str, str] = {}
        self.cancelled: set[str] = set()
        self.terminal_events: Counter[str] = Counter()
        self.steps: list[tuple[object, ...]] = []  # for the failure message
        for event in ("task_complete", "task_failed", "task_cancelled"):
            self.executor.register_callback(event, self._count)

    def _count(self, record: TaskRecord) -> None:
        self.terminal_events[record.task_id] += 1

    @rule(kind=st.sampled_from(sorted(KINDS)), priority=st.sampled_from(list(TaskPriority)))
    def submit(self, kind: str, priority: TaskPriority) -> None:
        fn, args, timeout = KINDS[kind]
        if kind in DAEMONS:
            args = (str(self.tmp / f"daemon-{len(self.kinds)}"),)
        task_id = self.executor.submit_task(fn, args, priority=priority, timeout=timeout)
        self.kinds[task_id] = kind
        self.steps.append(("submit", task_id, kind))

    @rule(kinds=st.lists(st.sampled_from(["ok", "slow", "raise"]), min_size=1, max_size=5))
    def submit_batch(self, kinds: list[str]) -> None:
        ids = self.executor.submit_batch([KINDS[k][:2] for k in kinds], priority=TaskPriority.HIGH)
        self.kinds.update(zip(ids, kinds, strict=True))
        self.steps.append(("batch", ids, kinds))

    @precondition(lambda self: bool(self.kinds))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.kinds)))
        self.steps.append(("cancel", task_id))
        if self.executor.cancel_task(task_id):
            self.cancelled.add(task_id)
            assert self.executor.get_task(task_id).status is TaskStatus.CANCELLED

    @rule(slot=st.integers(0, 1))
    def kill_worker(self, slot: int) -> None:
        self._signal_worker(slot, signal.SIGKILL, "kill")

    @rule(slot=st.integers(0, 1))
    def freeze_worker(self, slot: int) -> None:
        """SIGSTOP a worker and leave it stopped: it must be found hung, killed and replaced."""
        self._signal_worker(slot, signal.SIGSTOP, "freeze")

    def _signal_worker(self, slot: int, signum: int, step: str) -> None:
        pid = self.executor.get_stats()["workers"][f"local-worker-{slot}"]["pid"]
        self.steps.append((step, slot, pid))
        if pid > 0:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    @invariant()
    def stats_add_up(self) -> None:
        stats = self.executor.get_stats()
        assert stats["total_tasks"] == len(self.kinds)
        assert stats["total_tasks"] == sum(stats[k] for k in PARTS)

    def teardown(self) -> None:
        try:
            self._check_the_end()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _check_the_end(self) -> None:
        try:
            self.executor.wait_for_tasks(list(self.kinds), timeout=30)
        except TimeoutError:
            stuck = [self.executor.get_task(t) for t in self.kinds if not self.executor.get_task(t).done]
            self.executor.shutdown(wait=False, cancel_futures=True)  # it cannot end with a task lost
            raise AssertionError(f"tasks never ended: {stuck}; steps: {self.steps}") from None
        self.executor.shutdown(wait=True, cancel_futures=True)
        daemons = [int(p.read_text()) for p in self.tmp.glob("daemon-*")]
        assert wait_until(lambda: not any(pid_alive(pid) for pid in daemons), 5), (daemons, self.steps)
        for task_id, kind in self.kinds.items():
            record = self.executor.get_task(task_id)
            assert record.status in TERMINAL
            assert self.terminal_events[task_id] == 1, (task_id, self.terminal_events[task_id])
            # kill_worker may use up any task's attempts: FAILED with WorkerLostError is then allowed.
            lost = record.status is TaskStatus.FAILED and isinstance(record.error, WorkerLostError)
            if task_id in self.cancelled:
                assert record.status is TaskStatus.CANCELLED, record
            elif kind in ("hang", "daemon_hang"):
                assert record.status is TaskStatus.CANCELLED or lost, record
            elif kind in ("raise", "die"):
                assert record.status is TaskStatus.FAILED, record
            else:
                assert record.status is TaskStatus.COMPLETED or lost, record
        stats = self.executor.get_stats()
        assert stats["pending_tasks"] == stats["running_tasks"] == 0
        assert stats["total_tasks"] == sum(stats[k] for k in PARTS)


ExecutorMachine.TestCase.settings = settings(
    max_examples=15,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestExecutorMachine = ExecutorMachine.TestCase
