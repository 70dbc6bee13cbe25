"""CPython's own concurrent.futures tests, run against DistributedExecutor.

The test file is not part of this repository: it comes from Debian's
``libpython3.X-testsuite`` package (``./run tests`` installs it), for the
running interpreter's version. This adapter only makes the executor classes:
CPython's test mixins with ``executor_type`` set to ``DistributedExecutor``,
once per start method. Every test runs, except those listed in ``SKIPS`` with
the reason; README.md lists the deliberate differences.
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any

import pytest

from procpool import DistributedExecutor

_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
_SOURCE = Path(f"/usr/lib/python{_VERSION}/test/test_concurrent_futures.py")

pytestmark = [pytest.mark.slow, pytest.mark.conformance]

if not _SOURCE.exists():
    pytest.skip(
        f"CPython's concurrent.futures tests are not installed ({_SOURCE}): "
        f"apt-get install libpython{_VERSION}-testsuite",
        allow_module_level=True,
    )

# Its helpers pickle by reference, so workers started by spawn or forkserver must import the
# module by the same name: a folder with a link to it goes on sys.path, which they inherit.
_LINKS = Path(tempfile.mkdtemp(prefix="procpool-cpython-tests-"))
atexit.register(shutil.rmtree, _LINKS, ignore_errors=True)
(_LINKS / "cpython_test_concurrent_futures.py").symlink_to(_SOURCE)
sys.path.insert(0, str(_LINKS))
cf_tests: Any = importlib.import_module("cpython_test_concurrent_futures")

_WORKER_DEATH = (
    "a worker that dies fails only its own task (WorkerLostError, after retries) and the pool "
    "goes on; ProcessPoolExecutor breaks the whole pool (BrokenProcessPool)"
)
_PRIVATE = "reads ProcessPoolExecutor's private attributes (_processes, _executor_manager_thread, ...)"
_BY_NAME = "uses ProcessPoolExecutor itself by name, or imports the executor from concurrent.futures"

SKIPS = {
    # deliberate differences (README.md, "concurrent.futures")
    "test_killed_child": _WORKER_DEATH,
    "test_exit_at_task_unpickle": _WORKER_DEATH,
    "test_crash_at_task_unpickle": _WORKER_DEATH,
    "test_crash_during_func_exec_on_worker": _WORKER_DEATH,
    "test_crash_during_result_pickle_on_worker": _WORKER_DEATH,
    "test_shutdown_deadlock": _WORKER_DEATH,
    "test_error_at_task_unpickle": (
        "arguments that fail to unpickle in the worker fail that task with the unpickling error; "
        "ProcessPoolExecutor breaks the pool"
    ),
    "test_error_during_result_unpickle_in_result_handler": (
        "a result that fails to unpickle fails that task (RemoteTaskError); ProcessPoolExecutor "
        "breaks the pool"
    ),
    "test_exit_during_result_unpickle_in_result_handler": (
        "a result whose unpickling exits fails that task (RemoteTaskError); ProcessPoolExecutor "
        "breaks the pool"
    ),
    "test_error_at_task_pickle": (
        "an argument that cannot be pickled fails at submit() with TypeError; ProcessPoolExecutor "
        "fails the Future later"
    ),
    "test_shutdown_deadlock_pickle": (
        "an argument that cannot be pickled fails at submit() with TypeError (and the test reads "
        "_executor_manager_thread)"
    ),
    "test_max_tasks_per_child": (
        "max_tasks_per_child works under fork too (ProcessPoolExecutor refuses it); "
        "the test also reads _processes"
    ),
    "test_max_tasks_per_child_defaults_to_spawn_context": (
        "max_tasks_per_child does not change the start method (it works under every one)"
    ),
    "test_cancel_futures": (
        "asserts that some of 50 tasks began before shutdown(cancel_futures=True) right after "
        "they were submitted: ProcessPoolExecutor hands max_workers + 1 to its call queue at once "
        "and counts them begun; procpool never prefetches, so that depends on timing (the "
        "behaviour is tested deterministically in test_futures_api.py)"
    ),
    "test_traceback": (
        "the worker's traceback is a procpool.RemoteTraceback (traceback_text), not "
        "ProcessPoolExecutor's private _RemoteTraceback class"
    ),
    # tests of ProcessPoolExecutor's internals, or of it by name
    "test_processes_terminate": _PRIVATE,
    "test_saturation": _PRIVATE,
    "test_idle_process_reuse_one": _PRIVATE,
    "test_idle_process_reuse_multiple": _PRIVATE,
    "test_context_manager_shutdown": _BY_NAME,
    "test_del_shutdown": _BY_NAME,
    "test_shutdown_no_wait": _BY_NAME,
    "test_interpreter_shutdown": _BY_NAME,
    "test_submit_after_interpreter_shutdown": _BY_NAME,
    "test_hang_gh83386": _BY_NAME,
}

# CPython's mixins that it runs against every ProcessPoolExecutor start method.
_MIXINS = (
    "InitializerMixin",
    "FailingInitializerMixin",
    "ProcessPoolShutdownTest",
    "WaitTests",
    "AsCompletedTests",
    "ProcessPoolExecutorTest",
    "ExecutorDeadlockTest",
)
_START_METHODS = ("fork", "forkserver", "spawn")


class _ProcpoolMixin(cf_tests.ExecutorMixin):  # type: ignore[misc]
    executor_type = DistributedExecutor
    ctx: str


def _make_classes() -> dict[str, type]:
    made = {}
    for mixin_name in _MIXINS:
        mixin = getattr(cf_tests, mixin_name)
        skips = {
            name: unittest.skip(reason)(getattr(mixin, name))
            for name, reason in SKIPS.items()
            if hasattr(mixin, name)
        }
        for method in _START_METHODS:
            start = type(f"Procpool{method.title()}", (_ProcpoolMixin,), {"ctx": method})
            name = f"TestProcpool{method.title()}{mixin_name.removesuffix('Mixin')}"
            made[name] = type(name, (mixin, start, cf_tests.BaseTestCase), skips)
    return made


globals().update(_make_classes())
