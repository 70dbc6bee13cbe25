"""Real memory of a browser's process tree, with psutil (USS and PSS, not summed RSS).

Summed RSS counts the pages Chromium's processes share once per process and
overstates a browser 3-9x. Measuring a tree reads smaps_rollup per process
(~20 ms for a browser), so the pool calls this from a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

__all__ = ("TreeMemory", "measure")

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TreeMemory:
    """A process tree's memory in MiB."""

    uss_mb: float
    pss_mb: float
    rss_mb: float  # summed, for comparison only
    processes: int


def measure(procs: list[psutil.Process]) -> TreeMemory:
    """Sum USS, PSS and RSS over ``procs``, skipping those that end meanwhile."""
    uss = pss = rss = count = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        uss, pss, rss, count = uss + info.uss, pss + info.pss, rss + info.rss, count + 1
    return TreeMemory(uss / MB, pss / MB, rss / MB, count)
