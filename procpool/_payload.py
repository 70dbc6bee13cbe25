"""How a call travels: the function and its arguments pickled apart, in one bytes object.

    payload = <4-byte length of F> F A      F = cloudpickle(function), A = cloudpickle((args, kwargs))

A batch pickles its function once, and a worker unpickles each distinct F
once (a small cache keyed by F): a function defined in ``__main__`` travels
by value, and unpickling it for every task would cost more than most tasks.
A cached function keeps its globals between tasks in one worker, as an
imported module's function does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cloudpickle

__all__ = ("dump_call", "dump_function", "load_call")

_LENGTH = 4
_CACHE_SIZE = 128  # distinct functions a worker keeps unpickled
_cache: dict[bytes, Callable[..., Any]] = {}


def dump_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a function once, to pass to ``dump_call`` for each call of it."""
    return cloudpickle.dumps(fn)  # type: ignore[no-any-return]


def dump_call(fn_blob: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """One payload for ``fn(*args, **kwargs)``; raises what pickling raises."""
    args_blob: bytes = cloudpickle.dumps((args, kwargs))
    return len(fn_blob).to_bytes(_LENGTH, "little") + fn_blob + args_blob


def load_call(payload: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """The function and arguments of a payload (in the worker)."""
    size = int.from_bytes(payload[:_LENGTH], "little")
    fn_blob = payload[_LENGTH : _LENGTH + size]
    fn = _cache.get(fn_blob)
    if fn is None:
        fn = cloudpickle.loads(fn_blob)
        if len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]  # the oldest
        _cache[fn_blob] = fn
    args, kwargs = cloudpickle.loads(payload[_LENGTH + size :])
    return fn, args, kwargs
