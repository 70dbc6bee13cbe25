"""How a task's outcome travels through the database: results and errors as bytes, and back."""

from __future__ import annotations

import pickle
from typing import Any

from .._errors import (
    RemoteTaskError,
    RemoteTraceback,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerLostError,
    WorkerMemoryError,
)
from .._payload import dumps

__all__ = ("dump_error", "load_error", "load_result", "retryable")


def retryable(error: BaseException, retry_errors: bool) -> bool:
    """As the local pool decides: a lost worker is retried; the task's own error only if asked."""
    if isinstance(error, WorkerMemoryError | TaskTimeoutError | TaskCancelledError):
        return False
    return retry_errors or isinstance(error, WorkerLostError)


def dump_error(error: BaseException) -> tuple[bytes, str]:
    """The error as bytes (itself, or a RemoteTaskError if it cannot be pickled) and its traceback text."""
    cause = error.__cause__
    text = cause.traceback_text if isinstance(cause, RemoteTraceback) else f"{type(error).__name__}: {error}"
    try:
        blob = dumps(error)
        pickle.loads(blob)  # an exception can pickle and still fail to unpickle (a required argument)
    except Exception:  # noqa: BLE001 - whatever went wrong, the text travels
        blob = dumps(RemoteTaskError(type(error).__qualname__, str(error), text))
    return blob, text


def load_error(blob: bytes | None, text: str | None, state: str) -> BaseException:
    """The error a submitter raises: the task's own, with the worker's traceback as ``__cause__``.

    With no blob, the database itself ended the attempt: a cancel, or a sweep of a lost lease.
    """
    error: BaseException
    if blob:
        try:
            error = pickle.loads(blob)
        except Exception as exc:  # noqa: BLE001 - a readable error in its place
            message = f"cannot unpickle the task's error: {exc}"
            error = RemoteTaskError(type(exc).__qualname__, message, text or "")
    elif state == "cancelled":
        error = TaskCancelledError(text or "cancelled")
    else:
        error = WorkerLostError(text or "its host lost the lease")
    if text and error.__cause__ is None and not isinstance(error, WorkerLostError | TaskCancelledError):
        error.__cause__ = RemoteTraceback(text)
    return error


def load_result(blob: bytes | None) -> Any:
    return None if blob is None else pickle.loads(blob)
