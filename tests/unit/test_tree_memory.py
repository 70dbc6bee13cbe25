"""Process-tree memory: real figures for a live tree, nothing for a vanished one."""

from __future__ import annotations

import os
import subprocess
import sys

from procpool._memory import TreeSampler


def test_a_tree_is_summed_and_a_vanished_process_is_skipped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = TreeSampler()
        sampler.scan()
        tree = sampler.sample(os.getpid())
        assert tree is not None and tree.processes >= 2 and tree.exact
        assert 0 < tree.uss <= tree.pss <= tree.rss
        child.kill()
        child.wait()
        assert sampler.sample(child.pid) is None  # gone since the scan: no figures, no error
        sampler.scan()
        again = sampler.sample(os.getpid())
        assert again is not None and again.processes == tree.processes - 1
    finally:
        child.kill()
        child.wait()
