"""The floor under procpool's per-task cost: its messages between its processes, with no bookkeeping.

    caller ── submission frame ──▶ dispatcher process ◀── "ready" ── worker (x2)
                                           └────── task frame ──────▶ │
    caller's reader thread ◀──────────── "done" ──────────────────────┘

The same processes and the same messages as procpool (the worker asks for each
task only when it can run it, so priorities stay strict), written plainly:
no records, futures, deadlines, counters or fencing. Run beside procpool in
one run, the ratio says how much of procpool's cost is its bookkeeping and
how much the round trips themselves. The "with started" column adds the
message a worker sent before each task until starts were read from its slot.
``multiprocessing.Pool`` runs beside them (``map(chunksize=1)`` for a batch):
its workers read tasks from one pipe filled ahead of them.

A second table times submit -> start on an idle pool: the floor through its
dispatcher process, the floor with the caller writing straight to a worker
(what one process fewer on the path would give), procpool and
``multiprocessing.Pool``.
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import os
import pickle
import select
import selectors
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from procpool import DistributedExecutor
from procpool._inbox import Inbox, framed

from . import pertask, tasks
from .common import conclude, say, table

WORKERS = 2
READY = b"R"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=20_000, help="no-op tasks per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure (the best is kept)")
    parser.add_argument("--starts", type=int, default=1000, help="samples per submit -> start figure")


def run(args: argparse.Namespace) -> int:
    rows = []
    figures: dict[str, dict[str, float]] = {}
    n, rounds = args.tasks, args.rounds
    for batched in (False, True):
        how = "batched" if batched else "one by one"
        say(f"measuring {how} ...")
        figure = {
            "floor": _best(rounds, lambda b=batched: floor(n, b, started=False)),
            "floor with started": _best(rounds, lambda b=batched: floor(n, b, started=True)),
            "procpool": _best(rounds, lambda b=batched: procpool_rate(n, b)),
            "multiprocessing.Pool": _best(rounds, lambda b=batched: pool_rate(n, b)),
        }
        figures[how] = figure
        ratio = f"{figure['procpool'] / figure['floor']:.2f}x"
        rows.append([how, *(round(v) for v in figure.values()), ratio])
    shown = table(["tasks/s", *figures["batched"], "procpool / floor"], rows)
    say("measuring submit -> start ...")
    starts = {
        "floor": start_floor(args.starts, direct=False),
        "floor, straight to a worker": start_floor(args.starts, direct=True),
    }
    for name in ("procpool", "multiprocessing.Pool"):
        with pertask.POOLS[name]() as submit:
            starts[name] = pertask.start_us(submit, args.starts)
    figures[START] = starts
    shown += "\n\n" + table([START, *starts], [["median", *(round(v) for v in starts.values())]])
    return conclude("floor", figures, shown)


START = "submit -> start, idle pool (us)"


def _best(rounds: int, measure: Callable[[], float]) -> float:  # the least disturbed run
    return max(measure() for _ in range(rounds))


def procpool_rate(n: int, batched: bool) -> float:
    with DistributedExecutor(max_local_workers=WORKERS, task_timeout=60) as ex:
        ex.wait_for_tasks(ex.submit_batch([(tasks.noop,)] * 100))
        start = time.perf_counter()
        if batched:
            ids = ex.submit_batch([(tasks.noop,)] * n)
        else:
            ids = [ex.submit_task(tasks.noop) for _ in range(n)]
        ex.wait_for_tasks(ids, timeout=600)
        return n / (time.perf_counter() - start)


def pool_rate(n: int, batched: bool) -> float:
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pool.map(tasks.noop_arg, range(100))
        start = time.perf_counter()
        pool_run(pool, n, batched)
        return n / (time.perf_counter() - start)


def pool_run(pool: Any, n: int, batched: bool) -> None:
    """``n`` no-ops in a ``multiprocessing.Pool``: one ``map(chunksize=1)``, or ``apply_async`` each."""
    if batched:
        pool.map(tasks.noop_arg, range(n), chunksize=1)
    else:
        for result in [pool.apply_async(tasks.noop) for _ in range(n)]:
            result.get()


def start_floor(samples: int, direct: bool) -> float:
    """Median microseconds from a submission to its task's start, through the bare floor.

    ``direct``: no dispatcher; the caller hands the task to an idle worker itself.
    """
    channel = socket.socketpair()
    lines = [socket.socketpair() for _ in range(WORKERS)]
    results = [socket.socketpair() for _ in range(WORKERS)]
    pids = [] if direct else [_fork(_dispatch, channel[1].fileno(), [line[1].fileno() for line in lines])]
    for line, result in zip(lines, results, strict=True):
        pids.append(_fork(_work, line[0].fileno(), result[0].fileno(), False))
    try:
        replies = {result[1].fileno(): Inbox(result[1].fileno()) for result in results}
        # direct: the caller hands every task to the first worker and reads its "ready" itself
        line = lines[0][1].fileno()
        asks = {line: Inbox(line)} if direct else {}
        if direct:
            _next_reply(asks)  # its first "ready"
        payload = pickle.dumps(tasks.started_at)
        times = []
        for i in range(samples):
            time.sleep(0.002)  # idle again: both workers wait for work
            before = time.monotonic()
            if direct:
                _write_all(line, framed(pickle.dumps((f"task-{i}", payload))))
            else:
                _write_all(channel[0].fileno(), framed(pickle.dumps([(2, i, f"task-{i}", payload)])))
            message = _next_reply(replies)[1]
            times.append(pickle.loads(pickle.loads(message)[3]) - before)
            if direct:
                _next_reply(asks)  # its "ready" came before its "done"
        return statistics.median(times) * 1e6
    finally:
        _end(pids, [channel, *lines, *results])


def _next_reply(inboxes: dict[int, Inbox]) -> tuple[int, Any]:
    """The first frame to arrive on any of ``inboxes`` (one frame at a time arrives here)."""
    while True:
        for fd, inbox in inboxes.items():
            frames = inbox.read()
            if frames:
                return fd, frames[0]
        select.select(list(inboxes), [], [])


def _end(pids: list[int], pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    for pair in pairs:
        for end in pair:
            end.close()


def floor(n: int, batched: bool, started: bool) -> float:
    """Tasks per second through the bare message pattern (forked processes, ended before it returns)."""
    channel = socket.socketpair()
    lines = [socket.socketpair() for _ in range(WORKERS)]
    results = [socket.socketpair() for _ in range(WORKERS)]
    pids = [_fork(_dispatch, channel[1].fileno(), [line[1].fileno() for line in lines])]
    for line, result in zip(lines, results, strict=True):
        pids.append(_fork(_work, line[0].fileno(), result[0].fileno(), started))
    try:
        done = threading.Semaphore(0)
        reader = threading.Thread(target=_read_results, args=([r[1].fileno() for r in results], n, done))
        reader.start()
        payload = pickle.dumps(tasks.noop)
        fd = channel[0].fileno()
        start = time.perf_counter()
        if batched:
            _write_all(fd, framed(pickle.dumps([(2, i, f"task-{i}", payload) for i in range(n)])))
        else:
            for i in range(n):
                _write_all(fd, framed(pickle.dumps([(2, i, f"task-{i}", payload)])))
        done.acquire()
        elapsed = time.perf_counter() - start
        reader.join()
        return n / elapsed
    finally:
        _end(pids, [channel, *lines, *results])


def _fork(body: Callable[..., None], *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body(*args)
        finally:
            os._exit(0)
    return pid


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


def _dispatch(channel: int, lines: list[int]) -> None:
    """The dispatcher: a heap of submissions; each "ready" gets the next task."""
    selector = selectors.DefaultSelector()
    inboxes = {fd: Inbox(fd) for fd in [channel, *lines]}
    for fd, inbox in inboxes.items():
        selector.register(fd, selectors.EVENT_READ, inbox)
    heap: list[tuple[int, int, str, bytes]] = []
    idle: list[int] = []
    while True:
        for key, _ in selector.select():
            for frame in key.data.read():
                if key.fd == channel:
                    for item in pickle.loads(frame):
                        heapq.heappush(heap, item)
                else:
                    idle.append(key.fd)
            if key.data.closed:
                return
        while idle and heap:
            _, _, task_id, payload = heapq.heappop(heap)
            _write_all(idle.pop(0), framed(pickle.dumps((task_id, payload))))


def _work(line: int, result: int, started: bool) -> None:
    """A worker: ask, run, report; it holds no task it is not running."""
    inbox = Inbox(line)
    _write_all(line, framed(READY))
    poll = selectors.DefaultSelector()
    poll.register(line, selectors.EVENT_READ)
    while not inbox.closed:
        poll.select()
        for frame in inbox.read():
            task_id, payload = pickle.loads(frame)
            if started:
                os.write(result, framed(pickle.dumps(("started", task_id))))
            value = pickle.loads(payload)()
            _write_all(line, framed(READY))
            os.write(result, framed(pickle.dumps(("done", task_id, True, pickle.dumps(value)))))


def _read_results(fds: list[int], n: int, done: threading.Semaphore) -> None:
    selector = selectors.DefaultSelector()
    for fd in fds:
        selector.register(fd, selectors.EVENT_READ, Inbox(fd))
    results: dict[str, object] = {}
    while len(results) < n:
        for key, _ in selector.select():
            for frame in key.data.read():
                message = pickle.loads(frame)
                if message[0] == "done":
                    results[message[1]] = pickle.loads(message[3])
    done.release()
