"""The stress demo runs briefly, passes its own checks and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_passes_its_checks(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "stress", "--duration", "3", "--workers", "2", "--fault-rate", "0.2"]
    out = subprocess.run(
        [*command, "--seed", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every task ended exactly once" in out.stdout
    report = json.loads((tmp_path / "stress-out" / "demo.json").read_text())
    assert report["problems"] == [] and report["tasks"] > 0
    assert report["stats"]["total_tasks"] == report["tasks"]
    assert report["by_kind"]["hang"]["CANCELLED"] >= 1
