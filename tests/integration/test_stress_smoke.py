"""The stress demo runs briefly, passes its own checks and writes its report (and plot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def demo(tmp_path: Path, *options: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "stress", "--workers", "2", "--seed", "1", *options]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every task ended exactly once" in out.stdout
    report: dict[str, Any] = json.loads((tmp_path / "stress-out" / "demo.json").read_text())
    assert report["problems"] == [] and report["tasks"] > 0
    assert report["stats"]["total_tasks"] == report["tasks"]
    assert report["tracebacks on stderr"] == 0 and "Traceback" not in out.stderr, out.stderr
    return report


def test_the_demo_without_browsers_passes_its_checks(tmp_path: Path) -> None:
    report = demo(tmp_path, "--duration", "3", "--fault-rate", "0.2", "--no-browser")
    assert report["by_kind"]["hang"]["CANCELLED"] >= 1
    assert "browse" not in report["by_kind"]


@pytest.mark.browser
def test_the_demo_with_browsers_fans_out_and_plots(tmp_path: Path) -> None:
    report = demo(tmp_path, "--duration", "8", "--accounts", "2")
    assert report["by_kind"]["browse"]["COMPLETED"] >= 2
    assert any(name.endswith("browser") and mb > 10 for name, mb in report["peak_memory_mb"].items())
    assert report["session_pool"]["total_requests"] >= 1
    assert (tmp_path / "stress-out" / "demo.png").stat().st_size > 10_000
