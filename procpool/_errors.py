"""Errors raised by procpool.

    ProcpoolError
    ├── TaskTimeoutError (TimeoutError)      the task ran past its deadline and was killed
    ├── TaskCancelledError (CancelledError)  the task was cancelled by the user or a shutdown
    ├── WorkerLostError (ChildProcessError)  the worker running the task died (crash, signal, exit)
    │   │                                    or stopped sending heartbeats and was killed
    │   └── WorkerMemoryError (MemoryError)  the task's worker passed the hard memory limit
    ├── RemoteTaskError                      the task raised an exception that could not travel back
    ├── RemoteWorkerError                    a remote host cannot serve as a worker
    │   ├── RemoteConnectError (ConnectionError)  it cannot be reached, or its agent did not start
    │   ├── RemoteAuthError (PermissionError)     the credentials were refused
    │   ├── RemoteHostKeyError                    its host key is unknown or has changed
    │   └── RemoteVersionError                    its Python, procpool or cloudpickle differs
    ├── ExecutorShutdownError (RuntimeError) a call was made after shutdown()
    └── BrokenPoolError (BrokenExecutor)     the pool cannot go on: its manager process died,
                                             or its initializer keeps raising

A task's own exception reaches the caller unchanged, with the worker's
traceback attached as ``__cause__`` (a ``RemoteTraceback``).
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor, CancelledError

__all__ = (
    "BrokenPoolError",
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
    "TaskTimeoutError",
    "WorkerLostError",
    "WorkerMemoryError",
)


class ProcpoolError(Exception):
    """Base class of every error procpool raises on its own account."""


class TaskTimeoutError(ProcpoolError, TimeoutError):
    """The task ran past its deadline; its worker's process group was killed."""


class TaskCancelledError(ProcpoolError, CancelledError):
    """The task was cancelled before it could finish."""


class WorkerLostError(ProcpoolError, ChildProcessError):
    """The worker process running the task died before reporting a result."""


class WorkerMemoryError(WorkerLostError, MemoryError):
    """The task's worker passed ``max_worker_memory_mb`` mid-task with ``hard_memory_limit`` on."""


class ExecutorShutdownError(ProcpoolError, RuntimeError):
    """The executor was used after ``shutdown()``."""


class BrokenPoolError(ProcpoolError, BrokenExecutor):
    """No task can run any more: the manager process died, or the initializer keeps raising.

    For an initializer, its exception is the ``__cause__``.
    """


class RemoteTaskError(ProcpoolError):
    """The task raised an exception that could not be sent back as itself.

    Attributes:
        type_name: qualified name of the original exception type.
        message: ``str()`` of the original exception.
        traceback_text: the worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[type[RemoteTaskError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.traceback_text))


class RemoteWorkerError(ProcpoolError):
    """A remote host cannot serve as a worker. Messages never hold credentials."""


class RemoteConnectError(RemoteWorkerError, ConnectionError):
    """The host cannot be reached over SSH, or the agent did not start there."""


class RemoteAuthError(RemoteWorkerError, PermissionError):
    """The SSH server refused the credentials."""


class RemoteHostKeyError(RemoteWorkerError):
    """The host's key is not in known_hosts, or differs from the one there."""


class RemoteVersionError(RemoteWorkerError):
    """The remote Python, procpool or cloudpickle differs from the local one."""


class RemoteTraceback(Exception):
    """Carries a worker's traceback text; set as ``__cause__`` of a task's error."""

    def __init__(self, traceback_text: str) -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback_text}"""'
