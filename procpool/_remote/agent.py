"""The remote end of a remote worker, started over SSH: ``python -m procpool._remote.agent``.

    link (local) ══ frames on stdin / stdout (the SSH channel) ══▶ agent ── pipe ──▶ worker child
                                                                    │     (its own process group;
                                                                    │      one task at a time)
                                                                    └─ deadlines, kill ladder,
                                                                       deaths, beats with memory

- The agent holds at most the one task its link sent. It enforces that
  task's deadline here: SIGTERM to the child's group, SIGKILL after the
  grace, then "timedout". A child that dies mid-task is reported "lost". A
  new child replaces either. The child runs tasks with the local worker's
  ``run_task``, so results and errors come back exactly as locally.
- It beats every interval, with the memory of its whole tree, and exits,
  killing the child's group, when the link falls silent, the channel ends or
  its parent (sshd) dies: no remote work outlives its connection.
- stdout carries frames only; anything a task prints goes to stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from .. import _worker
from .._containment import Jail, Jails, enter, kill_orphans
from .._memory import TreeSampler
from .._payload import load_call
from .._process import set_parent_death_signal
from .._scheduling import describe_exit
from .._worker import run_task
from .frames import MARKER, FrameReader, encode

__all__ = ("main",)

_BROKEN_EXIT = 3  # the worker child could not start (its initializer failed)


class Agent:
    """Runs on the remote host; the one owner of its worker child."""

    def __init__(self, inp: int, out: int, reader: FrameReader, hello: tuple[Any, ...], term: int) -> None:
        self.beat_every: float = hello[1]
        self.silence: float = hello[2]  # seconds without a frame from the link before giving up
        self.grace: float = hello[3]
        self.sample_every: float = hello[4]
        self.initializer: bytes | None = hello[5]
        # A cgroup per worker child where the host has a writable one: what a task detaches
        # then dies even if this agent is SIGKILLed (the next agent or pool on the host sweeps
        # the cgroups of dead owners). Else this agent is a subreaper (see main).
        self.jails = Jails()
        self.max_tasks: int | None = hello[6]  # a fresh child after this many tasks (max_tasks_per_worker)
        self.ran = 0  # tasks the current child ran
        self.generation = 0  # children started so far: events of a replaced child are stale
        self.inp, self.out = inp, out
        self.reader = reader  # it read the hello: any frame after it is buffered there
        self.selector = selectors.DefaultSelector()
        self.selector.register(inp, selectors.EVENT_READ, "link")
        self.selector.register(term, selectors.EVENT_READ, "term")  # SIGTERM arrived
        self.child: Any = None  # multiprocessing.Process
        self.conn: Connection | None = None
        self.jail = Jail(0, None)  # the worker child and whatever it started; set with each child
        self.child_pidfd = -1  # readable once the child has exited
        self.task: tuple[str, int, float] | None = None  # task id, attempt, started (monotonic)
        self.deadline: float | None = None  # the running task's; None once it is killed for it
        self.kill_at: float | None = None  # when SIGKILL follows the SIGTERM
        self.escalated = False
        self.heard = self.next_beat = self.next_sample = time.monotonic()
        self.sampler = TreeSampler()
        self.memory: tuple[int, int, int, int, float, bool] | None = None

    def send(self, message: tuple[Any, ...]) -> None:
        data = memoryview(encode(message))
        while data:
            data = data[os.write(self.out, data) :]

    def serve(self) -> None:
        """Run until the link says stop, falls silent or goes away."""
        self.start_child()
        self.send(("ready", os.getpid()))
        if not self.handle(self.reader.drain()):
            return
        while True:
            now = time.monotonic()
            if now - self.heard > self.silence:
                return  # the link (or the network to it) is gone
            events = self.selector.select(max(0.0, self.next_due() - now))
            generation = self.generation
            for key, _ in events:
                if key.data == "term":
                    return
                if key.data != "link" and self.generation != generation:
                    continue  # the child was replaced in this round: its new one may reuse these fds
                if key.data == "link":
                    if not self.on_link():
                        return
                elif key.data == "result":
                    self.on_result()
                else:
                    self.on_child_exit()
            self.fire_timers(time.monotonic())

    def next_due(self) -> float:
        due: list[float] = [self.next_beat, self.heard + self.silence]
        due += [t for t in (self.deadline, self.kill_at) if t is not None]
        return min(due)

    def on_link(self) -> bool:
        data = os.read(self.inp, 1 << 16)
        if not data:
            return False
        self.heard = time.monotonic()
        return self.handle(self.reader.feed(data))

    def handle(self, messages: list[tuple[Any, ...]]) -> bool:
        for message in messages:
            if message[0] == "stop":
                return False
            if message[0] == "run":
                self.run(*message[1:])
        return True

    def run(self, task_id: str, attempt: int, payload: bytes, timeout: float) -> None:
        assert self.task is None and self.conn is not None, "the link sends one task at a time"
        now = time.monotonic()
        self.task = (task_id, attempt, now)
        self.deadline, self.escalated = now + timeout, False
        self.conn.send((task_id, attempt, payload))

    def on_result(self) -> None:
        assert self.conn is not None
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.selector.unregister(self.conn)  # dead: its exit follows
            return
        # After the deadline a late result does not count: the kill is under way.
        if self.task is not None and self.deadline is not None and message[1] == self.task[0]:
            self.task = self.deadline = None
            self.send(message)
            self.ran += 1
            if self.max_tasks is not None and self.ran >= self.max_tasks and self.child is not None:
                self.jail.kill()  # done with it: a fresh one takes over now
                self.on_child_exit()

    def on_child_exit(self) -> None:
        child, self.child = self.child, None
        child.join()
        self.selector.unregister(self.child_pidfd)
        os.close(self.child_pidfd)
        if self.conn is not None:
            if self.conn.fileno() in self.selector.get_map():
                self.selector.unregister(self.conn)
            self.conn.close()
            self.conn = None
        self.jail.kill()  # whatever the task left, in the group or out of it
        self.jail.remove()  # its cgroup, if empty already (else it goes with the agent's)
        kill_orphans()  # what left the tree came back to this subreaper: it goes too
        self.kill_at = None
        if self.task is None and child.exitcode == _BROKEN_EXIT:
            raise SystemExit(_BROKEN_EXIT)
        if self.task is not None:
            task_id, attempt, started = self.task
            elapsed = time.monotonic() - started
            if self.deadline is None:  # it was killed for its deadline
                self.send(("timedout", task_id, attempt, elapsed, self.escalated))
            else:
                self.send(("lost", task_id, attempt, elapsed, describe_exit(child.exitcode)))
            self.task = self.deadline = None
        self.start_child()

    def fire_timers(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline and self.child is not None:
            self.deadline = None  # marks the task as killed for its deadline
            self.jail.signal(signal.SIGTERM)
            self.kill_at = now + self.grace
        if self.kill_at is not None and now >= self.kill_at and self.child is not None:
            self.kill_at, self.escalated = None, True
            self.jail.kill()
        if now >= self.next_beat:
            self.next_beat = now + self.beat_every
            if now >= self.next_sample:
                self.next_sample = now + self.sample_every
                self.memory = self.measure()
            self.send(("beat", self.memory))

    def measure(self) -> tuple[int, int, int, int, float, bool] | None:
        self.sampler.scan()
        tree = self.sampler.sample(os.getpid())
        self.sampler.prune()
        if tree is None:
            return None
        return tree.uss, tree.pss, tree.rss, tree.processes, tree.cpu_percent, tree.exact

    def start_child(self) -> None:
        ctx = multiprocessing.get_context("fork")  # the agent is single-threaded: fork is safe
        parent, child = ctx.Pipe()
        cgroup = self.jails.path_for(f"child-{self.generation}")
        args = (child, parent, os.getpid(), self.initializer, cgroup)
        process = ctx.Process(target=_child_main, args=args, name="procpool-remote")
        process.start()
        child.close()
        assert process.pid is not None
        try:
            os.setpgid(process.pid, process.pid)
        except OSError:
            pass  # it did it first
        self.child, self.conn, self.ran = process, parent, 0
        self.jail = Jail(process.pid, cgroup)
        self.generation += 1
        self.selector.register(parent, selectors.EVENT_READ, "result")
        # Its pidfd, not its sentinel: a daemon the task left holds the sentinel pipe open.
        self.child_pidfd = os.pidfd_open(process.pid)
        self.selector.register(self.child_pidfd, selectors.EVENT_READ, "exit")

    def close(self) -> None:
        """Kill the child and whatever it started, however detached."""
        if self.child is not None:
            self.jail.kill()
            self.child.join(1.0)
        kill_orphans()
        self.jails.close()


def _child_main(
    conn: Connection, agents_end: Connection, agent: int, initializer: bytes | None, cgroup: str | None
) -> None:
    """The worker child: run tasks one at a time, as a local worker does."""
    agents_end.close()  # else a dead agent's pipe never reads as closed here
    if cgroup is not None:
        enter(cgroup)
    _worker.remote = True
    signal.set_wakeup_fd(-1)  # the agent's SIGTERM pipe is not this process's
    os.setpgid(0, 0)
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != agent:
        os._exit(1)  # the agent died before the guard was armed
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        try:
            fn, args, kwargs = load_call(initializer)
            fn(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - the traceback goes to the link's stderr
            traceback.print_exc()
            os._exit(_BROKEN_EXIT)
    me = os.getpid()
    while True:
        try:
            task_id, attempt, payload = conn.recv()
        except EOFError:
            return
        outcome = run_task(task_id, attempt, payload)
        if os.getpid() != me:
            os._exit(0)  # a copy the task forked came back here: only the child itself reports
        conn.send(outcome)


def main() -> None:
    """Entry point: frames on the inherited stdin/stdout; the process's own output to stderr."""
    inp, out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # a task's print() must not corrupt the frame stream
    sys.stdout = sys.stderr
    # SIGTERM (also sshd's session ending: the parent-death signal) only wakes the loop through
    # this pipe: a handler that raised could cut the cleanup short and leave the child running.
    term_r, term_w = os.pipe()
    os.set_blocking(term_w, False)
    signal.set_wakeup_fd(term_w)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal(signal.SIGTERM)
    enter(None)  # a subreaper: what a task detaches (double forks, new sessions) stays its child
    os.write(out, MARKER)
    reader = FrameReader(lambda n: os.read(inp, n))
    agent: Agent | None = None
    code = 0
    try:
        hello = reader.read()
        agent = Agent(inp, out, reader, hello, term_r)
        agent.serve()
    except (EOFError, OSError):
        pass  # the channel closed
    except SystemExit as exc:  # its worker child could not start
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        if agent is not None:
            agent.close()
    # Not sys.exit: multiprocessing's exit hook would wait for a child that outlived its kill.
    os._exit(code)


if __name__ == "__main__":
    main()
