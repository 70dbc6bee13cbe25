"""procpool: run work in processes you can trust.

Every task runs in a worker process; a task past its deadline is killed with
its whole process group; a crashing task takes nothing else down; nothing
submitted is lost.
"""

from __future__ import annotations

from ._errors import (
    BrokenPoolError,
    ExecutorShutdownError,
    ProcpoolError,
    RemoteAuthError,
    RemoteConnectError,
    RemoteHostKeyError,
    RemoteTaskError,
    RemoteTraceback,
    RemoteVersionError,
    RemoteWorkerError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerLostError,
    WorkerMemoryError,
)
from ._executor import DistributedExecutor, get_distributed_executor
from ._states import TaskPriority, TaskStatus
from ._task import TaskFuture, TaskRecord
from ._worker import companion_info

__all__ = (
    "BrokenPoolError",
    "DistributedExecutor",
    "ExecutorShutdownError",
    "ProcpoolError",
    "RemoteAuthError",
    "RemoteConnectError",
    "RemoteHostKeyError",
    "RemoteTaskError",
    "RemoteTraceback",
    "RemoteVersionError",
    "RemoteWorkerError",
    "TaskCancelledError",
    "TaskFuture",
    "TaskPriority",
    "TaskRecord",
    "TaskStatus",
    "TaskTimeoutError",
    "WorkerLostError",
    "WorkerMemoryError",
    "companion_info",
    "get_distributed_executor",
)

__version__ = "0.1.0"
