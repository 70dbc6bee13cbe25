"""Every other stress scenario runs briefly, exits 0 and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stress import pg, sshd

ROOT = Path(__file__).resolve().parents[2]


def scenario(tmp_path: Path, name: str, *options: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "stress", name, *options]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report: dict[str, Any] = json.loads((tmp_path / "stress-out" / f"{name}.json").read_text())
    assert report["problems"] == []
    return report


@pytest.mark.browser
def test_chaos_survives_its_faults(tmp_path: Path) -> None:
    report = scenario(tmp_path, "chaos", "--duration", "6", "--every", "0.5", "--seed", "2")
    assert sum(report["faults"].values()) >= 5 and report["tasks"] > 0


def test_soak_without_browsers_sees_no_growth(tmp_path: Path) -> None:
    report = scenario(tmp_path, "soak", "--duration", "6", "--every", "0.5", "--no-browser")
    assert len(report["samples"]) >= 8
    assert (tmp_path / "stress-out" / "soak.png").exists()


@pytest.mark.browser
@pytest.mark.slow
def test_compare_measures_every_figure_and_charts_the_ratios(tmp_path: Path) -> None:
    report = scenario(tmp_path, "compare", "--tasks", "200", "--repeat", "2")
    figures = report["figures"]
    assert len(figures) == 12 and all("procpool" in f for f in figures.values())
    assert (tmp_path / "stress-out" / "compare.png").exists()


def test_pertask_measures_every_pool_and_procpools_cpu(tmp_path: Path) -> None:
    report = scenario(tmp_path, "pertask", "--tasks", "100", "--starts", "10", "--rounds", "1")
    pools = report["figures"]["pools"]
    assert set(pools) == {"procpool", "ProcessPoolExecutor", "multiprocessing.Pool", "pebble", "loky"}
    assert all(0 < f["submit -> start, median (us)"] < 1e6 for f in pools.values())
    cpu = report["figures"]["procpool cpu per task (us)"]
    assert all(value > 0 for value in cpu.values())


def test_floor_runs_the_bare_messages_beside_procpool(tmp_path: Path) -> None:
    report = scenario(tmp_path, "floor", "--tasks", "300", "--rounds", "1", "--starts", "20")
    for how in ("one by one", "batched"):
        figure = report["figures"][how]
        assert set(figure) == {"floor", "floor with started", "procpool", "multiprocessing.Pool"}
        assert all(0 < rate < 1e7 for rate in figure.values())
    starts = report["figures"]["submit -> start, idle pool (us)"]
    assert set(starts) == {"floor", "floor, straight to a worker", "procpool", "multiprocessing.Pool"}
    assert all(0 < us < 1e6 for us in starts.values())


def test_overhead_reports_its_figures(tmp_path: Path) -> None:
    report = scenario(tmp_path, "overhead", "--workers", "4", "--calls", "200")
    assert report["figures"]["idle worker USS, median (MB)"] > 0


@pytest.mark.ssh
@pytest.mark.skipif(not sshd.available(), reason="needs root and openssh-server")
def test_remote_measures_round_trips_losses_and_throughput(tmp_path: Path) -> None:
    report = scenario(tmp_path, "remote", "--calls", "30", "--tasks", "200")
    figures = report["figures"]
    assert figures["host killed: loss to task running elsewhere (s)"] < 2.0  # noticed at once, not by silence
    assert figures["tiny tasks/s, 2 hosts x 2 slots"] > 0


@pytest.mark.ssh
@pytest.mark.skipif(not sshd.available(), reason="needs root and openssh-server")
def test_chaos_with_remote_hosts_survives_agents_and_hosts_lost(tmp_path: Path) -> None:
    options = ("--no-browser", "--remote", "2", "--duration", "8", "--every", "0.3", "--seed", "5")
    report = scenario(tmp_path, "chaos", *options)
    # A fault counts only if it found a target: an agent may be reconnecting, a host down already.
    assert sum(report["faults"].get(f, 0) for f in ("agent SIGKILL", "agent SIGSTOP", "host down")) >= 1
    assert sum(report["faults"].values()) >= 5


@pytest.mark.skipif(not pg.available(), reason="needs PostgreSQL")
def test_cluster_survives_host_and_database_faults(tmp_path: Path) -> None:
    # A database restart takes a second or more on a loaded machine: the count is asked for.
    options = ["--duration", "4", "--every", "1", "--min-faults", "3", "--tasks", "100", "--hosts", "2"]
    options += ["--seed", "3"]
    report = scenario(tmp_path, "cluster", *options)
    assert report["tasks"] > 0 and sum(report["faults"].values()) >= 3
    assert report["cluster"]["tasks_per_s"] > 0 and report["local"]["tasks_per_s"] > 0
