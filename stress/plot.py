"""The scenarios' charts as PNG files (matplotlib, Agg); without matplotlib none is drawn.

- ``plot_timeline``: the demo's throughput, queue depth by priority and memory over time.
- ``plot_soak``: memory, open fds and /dev/shm entries over a soak run.
- ``plot_ratios``: how many times better procpool did than each peer.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

__all__ = ("plot_ratios", "plot_soak", "plot_timeline")


def plot_timeline(samples: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Three panels over time; None (and nothing written) without matplotlib or samples."""
    plt = _pyplot()
    if plt is None or len(samples) < 2:
        return None
    t = [s["t"] for s in samples]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    rates = [0.0] + [
        (b["finished"] - a["finished"]) / max(b["t"] - a["t"], 0.25) for a, b in itertools.pairwise(samples)
    ]
    top.plot(t, rates, color="tab:blue")
    top.set_ylabel("tasks finished / s")
    for priority in ("URGENT", "HIGH", "NORMAL", "LOW"):
        middle.plot(t, [s["depth"][priority] for s in samples], label=priority)
    middle.set_ylabel("queued tasks")
    middle.legend(loc="upper right", ncol=4, fontsize="small")
    bottom.plot(t, [s["workers_mb"] for s in samples], label="workers (USS)")
    bottom.plot(t, [s["browsers_mb"] for s in samples], label="browsers (USS)")
    bottom.set_ylabel("MB")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    return _save(plt, fig, path)


def plot_ratios(ratios: dict[str, float], path: Path) -> Path | None:
    """A bar per figure: how many times better procpool did (log scale; 1 is a tie)."""
    plt = _pyplot()
    if plt is None or not ratios:
        return None
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    colors = ["tab:green" if ratios[n] >= 1 else "tab:red" for n in names]
    ax.barh(names, [ratios[n] for n in names], color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("procpool better by (x), log scale")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize="small")
    return _save(plt, fig, path)


def plot_soak(samples: list[dict[str, float]], path: Path) -> Path | None:
    """Memory of the manager, workers and browsers, and fds and /dev/shm entries, over time."""
    plt = _pyplot()
    if plt is None or len(samples) < 2:
        return None
    t = [s["t"] for s in samples]
    fig, (mem, fds) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, label in (("manager_mb", "manager"), ("workers_mb", "workers"), ("browsers_mb", "browsers")):
        mem.plot(t, [s[key] for s in samples], label=f"{label} (USS)")
    mem.set_ylabel("MB")
    mem.legend(loc="upper left", fontsize="small")
    fds.plot(t, [s["fds"] for s in samples], label="open fds")
    fds.plot(t, [s["shm"] for s in samples], label="/dev/shm entries")
    fds.set_xlabel("seconds")
    fds.legend(loc="upper left", fontsize="small")
    fig.suptitle("python -m stress soak")
    return _save(plt, fig, path)


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
