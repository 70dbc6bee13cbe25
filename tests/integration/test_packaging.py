"""What a user gets from ``pip install``: the sdist and wheel, installed in a fresh venv outside the checkout.

The wheel is built from the sdist (``python -m build`` does both, in that
order), so a file missing from either fails here. The seed examples then run
in that venv from a folder that is not the checkout, so nothing resolves to
the source tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT = 600  # seconds; the first install may download every dependency

SEED_EXECUTOR = """
from procpool import get_distributed_executor, TaskPriority, TaskStatus
import time

def test_task(x):
    time.sleep(1)
    return x * 2

executor = get_distributed_executor(max_workers=3)
ids = [executor.submit_task(function=test_task, args=(i,), priority=TaskPriority.HIGH) for i in range(10)]
print(executor.wait_for_tasks(ids, timeout=30))
print(executor.get_stats()["completed_tasks"], executor.get_task(ids[0]).status is TaskStatus.COMPLETED)
"""

SEED_SESSIONS = """
from sessions import get_optimized_session_pool, SessionPool

pool = get_optimized_session_pool()
b1 = pool.get_session('test-account-1')
assert pool.get_session('test-account-1') is b1
stats = pool.get_stats()
print(stats["active_sessions"], stats["sessions"]["test-account-1"]["memory_mb"] > 0)
pool.close_all()
"""


def _run(*args: str | Path, cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the venv's python, the built wheel), built and installed once for this module."""
    where = tmp_path_factory.mktemp("package")
    dist = where / "dist"
    _run(sys.executable, "-m", "build", "--outdir", dist, ROOT, cwd=where, timeout=PIP_TIMEOUT)
    wheel = next(dist.glob("procpool-*.whl"))
    assert next(dist.glob("procpool-*.tar.gz"))
    _run(sys.executable, "-m", "venv", where / "venv", cwd=where)
    python = where / "venv" / "bin" / "python"
    extras = f"{wheel}[browser,remote,prometheus,postgres]"
    pip = (python, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    _run(*pip, extras, cwd=where, timeout=PIP_TIMEOUT)
    yield python, wheel
    shutil.rmtree(where, ignore_errors=True)


def test_the_wheel_holds_every_package_and_needs_only_cloudpickle_and_psutil(
    installed: tuple[Path, Path],
) -> None:
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    in_tree = {
        str(p.parent.relative_to(ROOT)) for p in ROOT.glob("[ps]*/**/__init__.py") if "stress" not in p.parts
    }
    assert in_tree <= packages and not any(n.startswith("stress/") for n in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [
        line.split(":", 1)[1].strip()
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(r.split(">")[0] for r in requires) == ["cloudpickle", "psutil"]
    assert "License-Expression: MIT" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_every_public_module_imports_from_the_installed_wheel(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    python, _ = installed
    script = """
        import procpool, procpool.prometheus, sessions
        assert "site-packages" in procpool.__file__ and "site-packages" in sessions.__file__
        assert set(procpool.__all__) <= set(dir(procpool)) and set(sessions.__all__) <= set(dir(sessions))
        import importlib.util
        assert importlib.util.find_spec("stress") is None
        print("ok")
    """
    assert _run(python, "-c", textwrap.dedent(script), cwd=tmp_path).strip() == "ok"


def test_sessions_without_pyppeteer_names_the_extra_to_install(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    python, _ = installed
    script = textwrap.dedent("""
        import sys
        sys.modules["pyppeteer"] = None  # as if not installed
        try:
            import sessions
        except ImportError as e:
            print(e)
    """)
    assert "pip install 'procpool[browser]'" in _run(python, "-c", script, cwd=tmp_path)


def test_cluster_mode_runs_from_the_wheel_and_names_its_extra_when_psycopg_is_missing(
    installed: tuple[Path, Path], tmp_path: Path, queue_dsn: str
) -> None:
    python, _ = installed
    script = textwrap.dedent(f"""
        from procpool import DistributedExecutor

        def test_task(x):
            return x * 2

        with DistributedExecutor(max_local_workers=2, queue={queue_dsn!r}) as ex:
            print(ex.wait_for_tasks([ex.submit_task(test_task, (i,)) for i in range(4)], timeout=60))
    """)
    assert _run(python, "-c", script, cwd=tmp_path).strip() == "[0, 2, 4, 6]"
    missing = textwrap.dedent(f"""
        import sys
        sys.modules["psycopg"] = None  # as if not installed
        from procpool import DistributedExecutor
        try:
            DistributedExecutor(queue={queue_dsn!r})
        except RuntimeError as e:
            print(e)
    """)
    assert "pip install 'procpool[postgres]'" in _run(python, "-c", missing, cwd=tmp_path)
    host = textwrap.dedent(f"""
        import sys
        sys.modules["psycopg"] = None
        from procpool._top import main
        sys.exit(main(["host", "--queue", {queue_dsn!r}]))
    """)
    done = subprocess.run([python, "-c", host], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("procpool host: error: cluster mode needs psycopg"), done.stderr
    assert "pip install 'procpool[postgres]'" in done.stderr


def test_the_seed_executor_example_runs_from_the_wheel(installed: tuple[Path, Path], tmp_path: Path) -> None:
    python, _ = installed
    out = _run(python, "-c", SEED_EXECUTOR, cwd=tmp_path, timeout=60).splitlines()
    assert out == [str([2 * i for i in range(10)]), "10 True"]


@pytest.mark.browser
def test_the_seed_sessions_example_runs_from_the_wheel(installed: tuple[Path, Path], tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("needs Chromium: apt-get install chromium")
    python, _ = installed
    assert _run(python, "-c", SEED_SESSIONS, cwd=tmp_path, timeout=120).split() == ["1", "True"]
