"""Remote workers measured against local ones, over real sshd on 127.0.0.1 (needs root and openssh-server).

- Round trip of a tiny task, one at a time: a local worker against a
  remote slot (the SSH channel, the link and the agent on the way).
- From a lost host to its task running elsewhere: the host killed (the
  connection closes at once) and the agent frozen with SIGSTOP (nothing
  closes: silence until ``heartbeat_timeout``, as a cut network looks).
- Throughput of 2 hosts x 2 slots against 4 local workers, tiny and 20 ms tasks.

The hosts are this machine, so the figures show what procpool adds, not a network.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle
import psutil

from procpool import DistributedExecutor, TaskStatus

from . import sshd
from .common import conclude, figure_table, percentile, say

_HEARTBEAT = 2.0  # seconds of silence before a connection counts as lost, in the loss figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=300, help="tasks per round-trip figure")
    parser.add_argument("--tasks", type=int, default=2000, help="tiny tasks per throughput figure")


def run(args: argparse.Namespace) -> int:
    if not sshd.available():
        say("the remote scenario needs root and openssh-server (apt-get install openssh-server)")
        return 1
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the remote side need not have stress
    with sshd.loopback_hosts(3) as hosts:
        figures = {
            **round_trips(hosts[0], args.calls),
            **losses(hosts[2]),
            **throughput(hosts[:2], args.tasks),
        }
    return conclude("remote", figures, figure_table(figures))


def add(ex: DistributedExecutor, host: sshd.SSHServer, **options: Any) -> list[str]:
    names = ex.add_remote_worker(**host.options(), **options)
    deadline = time.monotonic() + 30
    while not all(ex.get_stats()["workers"][n]["state"] == "idle" for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host.port}: remote slots not ready within 30 s")
        time.sleep(0.01)
    return names


@contextmanager
def remote_only() -> Iterator[tuple[DistributedExecutor, Path]]:
    """A pool whose one local worker is held until the gate file exists: tasks go to the hosts added."""
    with tempfile.TemporaryDirectory() as tmp:
        gate = Path(tmp) / "gate"
        with DistributedExecutor(max_local_workers=1, enable_remote=True) as ex:
            held = ex.submit_task(wait_for, (str(gate),))
            try:
                while ex.get_task(held).status is not TaskStatus.RUNNING:
                    time.sleep(0.005)
                yield ex, gate
            finally:
                gate.touch()


def wait_for(path: str) -> None:
    while not Path(path).exists():
        time.sleep(0.005)


def noop() -> None:
    pass


def pause(seconds: float) -> None:
    time.sleep(seconds)


def latencies(ex: DistributedExecutor, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        ex.get_task_result(ex.submit_task(noop), timeout=30)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def round_trips(host: sshd.SSHServer, calls: int) -> dict[str, Any]:
    say("round trips: local worker, then a remote slot ...")
    with DistributedExecutor(max_local_workers=1) as ex:
        latencies(ex, 20)  # warm
        local = latencies(ex, calls)
    with remote_only() as (ex, _):
        add(ex, host)
        latencies(ex, 20)
        remote = latencies(ex, calls)
    return {
        "tiny task round trip, local worker, median (ms)": statistics.median(local),
        "tiny task round trip, remote slot, median (ms)": statistics.median(remote),
        "tiny task round trip, remote slot, p99 (ms)": percentile(remote, 99),
        "remote / local round trip (median)": statistics.median(remote) / statistics.median(local),
    }


def losses(server: sshd.SSHServer) -> dict[str, Any]:
    say("losses: a host killed, then an agent frozen ...")
    killed = time_to_rerun(server, lambda agent: server.kill())
    server.start()
    frozen = time_to_rerun(server, lambda agent: agent.send_signal(signal.SIGSTOP))
    return {
        "host killed: loss to task running elsewhere (s)": killed,
        f"agent frozen: loss to task running elsewhere, heartbeat_timeout={_HEARTBEAT:g} (s)": frozen,
    }


def time_to_rerun(server: sshd.SSHServer, fail: Any) -> float:
    """Seconds from ``fail(agent)`` to the remote slot's task running on the local worker."""
    with remote_only() as (ex, gate):
        add(ex, server, heartbeat_timeout=_HEARTBEAT, reconnect_max=1.0)
        task_id = ex.submit_task(pause, (1.5,))
        while ex.get_task(task_id).status is not TaskStatus.RUNNING:
            time.sleep(0.005)
        gate.touch()  # the local worker is free to take the task over
        (agent,) = server.agents()
        start = time.time()  # wall clock, as the task record's started_at
        fail(agent)
        ex.get_task_result(task_id, timeout=30)
        record = ex.get_task(task_id)
        assert record.attempts == 2 and record.started_at is not None, record
        elapsed = record.started_at - start
        ex.remove_remote_worker("127.0.0.1", server.port, timeout=30)
    if agent.is_running():  # frozen: it was left behind by its closed connection until continued
        agent.send_signal(signal.SIGCONT)
        psutil.wait_procs([agent], timeout=10)
    return elapsed


def throughput(hosts: list[sshd.SSHServer], tasks: int) -> dict[str, Any]:
    say("throughput: 4 local workers, then 2 hosts x 2 slots ...")
    with DistributedExecutor(max_local_workers=4) as ex:
        local = rates(ex, tasks)
    with remote_only() as (ex, _):
        for host in hosts:
            add(ex, host, slots=2)
        remote = rates(ex, tasks)
    return {
        "tiny tasks/s, 4 local workers": local[0],
        "tiny tasks/s, 2 hosts x 2 slots": remote[0],
        "20 ms tasks/s, 4 local workers": local[1],
        "20 ms tasks/s, 2 hosts x 2 slots (ideal 200)": remote[1],
    }


def rates(ex: DistributedExecutor, tasks: int) -> tuple[float, float]:
    out = []
    for fn, args, count in ((noop, (), tasks), (pause, (0.02,), 400)):
        start = time.perf_counter()
        ids = ex.submit_batch([(fn, args)] * count)
        ex.wait_for_tasks(ids, timeout=300)
        out.append(count / (time.perf_counter() - start))
    return out[0], out[1]
