"""``python -m procpool host`` (serve the cluster queue) and ``top --queue`` (watch the cluster)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, TextIO

from .._executor import DistributedExecutor
from .._states import TaskPriority
from .host import DEFAULT_LEASE, Host
from .store import Store, StoreError, masked

__all__ = ("add_host_arguments", "run_host", "top_queue")


def add_host_arguments(host: argparse.ArgumentParser) -> None:
    host.add_argument(
        "--queue", required=True,
        help="the PostgreSQL DSN (postgresql://user@host/db), or - to read it from the first line of "
        "stdin; then the end of stdin stops the host. A password on the command line shows in ps: "
        "use -, PGPASSWORD or ~/.pgpass",
    )  # fmt: skip
    host.add_argument("--slots", type=int, default=3, help="worker processes (default 3)")
    host.add_argument("--lease", type=float, default=DEFAULT_LEASE, help="seconds a claim lasts unrenewed")
    host.add_argument("--name", help="this host's name in the queue (default hostname:pid:random)")
    host.add_argument("--task-timeout", type=float, default=300.0, help="the local pool's default deadline")
    host.add_argument(
        "--companion", help="module:factory, called once for a companion factory (sessions:pinned_browsers)"
    )


def run_host(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options: dict[str, Any] = {"task_timeout": args.task_timeout}
    dsn = sys.stdin.readline().strip() if args.queue == "-" else args.queue
    try:
        if args.companion:
            options["companion"] = _companion(args.companion)
        host = Host(dsn, args.slots, DistributedExecutor, lease=args.lease, name=args.name, **options)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:  # bad options: said in one line
        print(f"procpool host: error: {exc}", file=sys.stderr)
        return 2
    if args.queue == "-":  # started by an executor over SSH: it ends us by closing our stdin
        threading.Thread(target=_stop_at_eof, args=(host,), name="procpool-host-stdin", daemon=True).start()

    def stop(signum: int, _: object) -> None:
        log = logging.getLogger("procpool.cluster")
        log.info("signal %d: claiming no more; ending once running tasks are written", signum)
        host.stop(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        host.run()
    except StoreError as exc:
        print(f"procpool host: {exc}", file=sys.stderr)
        return 1
    return 0


def _stop_at_eof(host: Host) -> None:
    while os.read(sys.stdin.fileno(), 4096):
        pass
    logging.getLogger("procpool.cluster").info(
        "stdin closed: claiming no more; ending once running tasks are written"
    )
    host.stop(wait=False)


def _companion(spec: str) -> Any:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--companion must be module:factory, not {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--companion {spec!r} cannot be loaded: {exc}") from None
    return factory()


def top_queue(dsn: str, interval: float, once: bool, as_json: bool, out: TextIO) -> int:
    """Print the cluster's hosts, queue by priority and throughput, every ``interval`` seconds."""
    store = Store(dsn)
    last: tuple[float, int] | None = None
    try:
        while True:
            try:
                counts = store.counts()
            except StoreError as exc:
                print(f"{masked(dsn)}: {exc}", file=out)
                if once:
                    return 1
                time.sleep(interval)
                continue
            ended = sum(counts["states"].get(s, 0) for s in ("completed", "failed", "cancelled"))
            now = time.monotonic()
            rate = None if last is None else (ended - last[1]) / (now - last[0])
            last = (now, ended)
            view = _view(counts, rate)
            print(json.dumps(view) if as_json else _render(view, masked(dsn)), file=out, flush=True)
            if once:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        store.close()


def _view(counts: dict[str, Any], rate: float | None) -> dict[str, Any]:
    return {
        "tasks": counts["states"],
        "queue_depth": {p.name: counts["depth"].get(int(p), 0) for p in TaskPriority},
        "tasks_per_second": rate,
        "hosts": [
            {"name": n, "slots": s, "busy": b, "completed": c, "failed": f, "seen_seconds_ago": float(a)}
            for n, s, b, c, f, a in counts["hosts"]
        ],
    }


def _render(view: dict[str, Any], where: str) -> str:
    tasks = ", ".join(f"{state} {n}" for state, n in sorted(view["tasks"].items())) or "none"
    queue = "  ".join(f"{p} {n}" for p, n in view["queue_depth"].items())
    rate = view["tasks_per_second"]
    lines = [
        f"cluster {where}",
        f"tasks: {tasks}",
        f"queued: {queue}   ended/s: {'-' if rate is None else f'{rate:.1f}'}",
        f"{'HOST':<40} {'SLOTS':>5} {'BUSY':>5} {'DONE':>8} {'FAIL':>6} {'SEEN':>6}",
    ]
    for h in view["hosts"]:
        lines.append(
            f"{h['name']:<40} {h['slots']:>5} {h['busy']:>5} {h['completed']:>8} {h['failed']:>6} "
            f"{h['seen_seconds_ago']:>5.1f}s"
        )
    return "\n".join(lines) + "\n"
