from __future__ import annotations

import inspect
import types

import procpool
import sessions


def test_all_lists_exactly_the_public_names() -> None:
    for package in (procpool, sessions):
        public = {
            n
            for n, v in vars(package).items()
            if not n.startswith("_") and n != "annotations" and not isinstance(v, types.ModuleType)
        }  # fmt: skip (submodules such as procpool.prometheus are not names of the package)
        assert set(package.__all__) == public, package.__name__


def test_the_seed_session_api() -> None:
    init = inspect.signature(sessions.SessionPool)
    assert [(p, init.parameters[p].default) for p in list(init.parameters)[:4]] == [
        ("max_sessions", 3), ("session_idle_timeout", 600), ("health_check_interval", 60),
        ("memory_threshold_mb", 500.0),
    ]  # fmt: skip
    for name in ("get_session", "register_hook", "get_stats", "close_session", "close_all", "__enter__"):
        assert callable(getattr(sessions.SessionPool, name))


def test_seed_signatures_and_defaults() -> None:
    init = inspect.signature(procpool.DistributedExecutor)
    assert [(p, init.parameters[p].default) for p in list(init.parameters)[:4]] == [
        ("max_local_workers", 3), ("task_timeout", 300), ("enable_remote", False), ("max_retries", 3)
    ]  # fmt: skip
    get = inspect.signature(procpool.get_distributed_executor)
    assert get.parameters["max_workers"].default == 3
    submit = inspect.signature(procpool.DistributedExecutor.submit_task)
    assert list(submit.parameters)[1:] == ["function", "args", "kwargs", "priority", "timeout"]
    result = inspect.signature(procpool.DistributedExecutor.get_task_result)
    assert (result.parameters["wait"].default, result.parameters["timeout"].default) == (True, 30)
    assert inspect.signature(procpool.DistributedExecutor.wait_for_tasks).parameters["timeout"].default == 60
    assert [p.name for p in procpool.TaskPriority] == ["URGENT", "HIGH", "NORMAL", "LOW"]


def test_the_manager_authkey_never_appears_in_a_repr() -> None:
    import os

    from procpool._worker import WorkerSpec

    key = os.urandom(32)
    spec = WorkerSpec(
        "local-worker-0.0", 0, "/tmp/x", "/tmp/y", key, None, "procpool-1-a", None, 1, 1.0, None, (), None
    )  # type: ignore[arg-type]
    assert repr(key) not in repr(spec) and "authkey" not in repr(spec)
