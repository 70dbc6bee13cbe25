"""Helpers the scenarios share: leak checks, percentiles, tables, reports."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

OUT = Path("stress-out")


def add_run_arguments(parser: argparse.ArgumentParser, duration: float, workers: int, what: str) -> None:
    """The options every scenario with a pool has."""
    parser.add_argument(
        "--duration", type=float, default=duration, help=f"seconds of {what} (default {duration:g})"
    )
    parser.add_argument("--workers", type=int, default=workers, help=f"local workers (default {workers})")
    parser.add_argument("--no-browser", action="store_true", help="no browsers: workers only")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


class StderrWatch:
    """Counts tracebacks written to stderr by this process and every child it starts (fd 2).

    Output still reaches the terminal: fd 2 goes through a pipe this reads and tees.
    """

    MARKS = (b"Traceback (most recent call last)", b"exception was never retrieved")

    def __init__(self) -> None:
        self.tracebacks = 0
        sys.stderr.flush()
        self._terminal = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, args=(read,), name="stderr-watch", daemon=True)
        self._thread.start()

    def _pump(self, read: int) -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                self.tracebacks += any(mark in line for mark in self.MARKS)
                os.write(self._terminal, line)

    def close(self) -> int:
        """Put stderr back; the tracebacks counted."""
        sys.stderr.flush()
        os.dup2(self._terminal, 2)  # the pipe ends once the children holding it have ended too
        self._thread.join(5.0)
        return self.tracebacks


# Helpers that peers start once per interpreter and keep on purpose.
FOREIGN_HELPERS = ("loky.backend.resource_tracker",)


def leftovers(timeout: float = 5.0) -> list[str]:
    """Descendant processes and procpool shared-memory blocks still there after ``timeout``."""
    from multiprocessing import forkserver, resource_tracker

    # multiprocessing's own helpers live as long as this process (their children still count).
    helpers = {
        resource_tracker._resource_tracker._pid,  # type: ignore[attr-defined]
        forkserver._forkserver._forkserver_pid,  # type: ignore[attr-defined]
    }
    deadline = time.monotonic() + timeout
    while True:
        procs = [
            p for p in psutil.Process().children(recursive=True) if p.pid not in helpers and not _foreign(p)
        ]
        blocks = [p.name for p in Path("/dev/shm").glob(f"procpool-{psutil.Process().pid}-*")]
        if (not procs and not blocks) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out = []
    for p in procs:
        try:
            out.append(f"process {p.pid}: {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            continue
    return out + [f"shared memory /dev/shm/{b}" for b in blocks]


def _foreign(proc: psutil.Process) -> bool:
    try:
        command = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(helper in command for helper in FOREIGN_HELPERS)


def call_cost_us(fn: Callable[[], object], calls: int, rounds: int = 20) -> float:
    """Microseconds per call: the median of ``rounds`` timings (this machine is noisy)."""
    fn()
    per_round = max(1, calls // rounds)
    times = timeit.repeat(fn, number=per_round, repeat=rounds)
    return statistics.median(times) / per_round * 1e6


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def conclude(name: str, figures: dict[str, Any], shown: str) -> int:
    """Print ``shown`` (a table), check for leftovers, write the JSON report; the exit code."""
    say("\n" + shown)
    problems = leftovers()
    for problem in problems:
        say(f"PROBLEM: left behind: {problem}")
    say(f"\nreport: {write_report(name, {'figures': figures, 'problems': problems})}")
    return 1 if problems else 0


def figure_table(figures: dict[str, Any]) -> str:
    """Name and value, a row each."""
    return table(["figure", "value"], [[name, value] for name, value in figures.items()])


def write_report(name: str, report: dict[str, Any]) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def say(message: str) -> None:
    print(message, flush=True)


def is_tty() -> bool:
    return sys.stdout.isatty()
