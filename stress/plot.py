"""The run's timeline as a PNG: throughput, queue depth by priority, memory (matplotlib, Agg)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

__all__ = ("plot_ratios", "plot_timeline")


def plot_timeline(samples: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Three panels over time; None (and nothing written) without matplotlib or samples."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if len(samples) < 2:
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_ratios(ratios: dict[str, float], path: Path) -> Path | None:
    """A bar per figure: how many times better procpool did (log scale; 1 is a tie)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not ratios:
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
