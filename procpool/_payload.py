"""How a call travels: the function and its arguments pickled apart, in one bytes object.

    payload = <4-byte length of F> F A      F = cloudpickle(function), A = cloudpickle((args, kwargs))

A batch pickles its function once, and a worker unpickles each distinct F
once (a small cache keyed by F): a function defined in ``__main__`` travels
by value, and unpickling it for every task would cost more than most tasks.
A cached function keeps its globals between tasks in one worker, as an
imported module's function does.

A big result is unpickled by ``loads_gently``: the unpickler fills each large
bytes object through ``readinto``, a slice at a time, so the copy (and its page
faults) never holds the GIL for long. A 300 MB result copied in one C call held
the supervisor thread up for 0.3 s; a slice takes about a millisecond.
"""

from __future__ import annotations

import mmap
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

__all__ = ("PYTHON", "dump_call", "dump_function", "dumps", "load_call", "loads_gently", "needs_same_python")

_LENGTH = 4
_CACHE_SIZE = 128  # distinct functions a worker keeps unpickled
_cache: dict[bytes, Callable[..., Any]] = {}  # in a worker: functions by their pickle
_by_reference: dict[Any, bytes] = {}  # in a caller: the pickle of functions sent by reference
_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})
_PLAIN_ITEMS = 32  # containers and their items looked at before cloudpickle is left to decide
_NO_ARGS = pickle.dumps(((), {}), cloudpickle.DEFAULT_PROTOCOL)
Readable = bytes | bytearray | memoryview | mmap.mmap
_SLICE = 1 << 20  # bytes copied per step by loads_gently: about a millisecond with the GIL held
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"  # code pickled by value runs on this version only
_BY_VALUE = (b"cloudpickle", b"CodeType")  # in every pickle of a function or class sent by value


def dump_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a function once, to pass to ``dump_call`` for each call of it.

    A function that cloudpickle sends by reference (a module's function, found by
    its name) always pickles to the same bytes: those are kept, so the next call of
    it costs a dict lookup. A function sent by value (a lambda, a closure, anything
    in ``__main__``) is pickled every time, since its globals may change meanwhile.
    """
    try:
        blob = _by_reference.get(fn)
    except TypeError:  # an unhashable callable object
        return cloudpickle.dumps(fn)  # type: ignore[no-any-return]
    if blob is not None and not cloudpickle.list_registry_pickle_by_value():
        return blob
    blob = cloudpickle.dumps(fn)
    if _module_function(fn) and not cloudpickle.list_registry_pickle_by_value():
        try:
            by_name = pickle.dumps(fn, cloudpickle.DEFAULT_PROTOCOL)
        except Exception:  # noqa: BLE001 - not found by its name: it travels by value
            by_name = None
        if by_name == blob:
            if len(_by_reference) >= _CACHE_SIZE:
                del _by_reference[next(iter(_by_reference))]  # the oldest
            _by_reference[fn] = blob
    return blob  # type: ignore[no-any-return]


def _module_function(fn: object) -> bool:
    # Plain functions, and builtins of a module: never bound to an object whose state travels.
    if isinstance(fn, types.FunctionType):
        return True
    return isinstance(fn, types.BuiltinFunctionType) and isinstance(fn.__self__, types.ModuleType | None)


def dumps(value: Any) -> bytes:
    """``cloudpickle.dumps``, with plain data (numbers, strings and containers of them) pickled in C."""
    if _plain(value, [_PLAIN_ITEMS]):
        return pickle.dumps(value, cloudpickle.DEFAULT_PROTOCOL)
    return cloudpickle.dumps(value)  # type: ignore[no-any-return]


def _plain(value: Any, budget: list[int]) -> bool:
    """True for data cloudpickle would pickle exactly as pickle does; looks at a bounded number of items.

    Past the bound cloudpickle decides: on a big container it is within a few
    microseconds of pickle, and a longer look here would cost more than it saves.
    """
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is tuple or kind is list:
        budget[0] -= len(value) + 1
        if budget[0] < 0:
            return False
        for item in value:  # noqa: SIM110 - all() over a generator costs twice this
            if type(item) not in _SCALARS and not _plain(item, budget):
                return False
        return True
    if kind is dict:
        budget[0] -= len(value) + 1
        if budget[0] < 0:
            return False
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _SCALARS and not _plain(item, budget)):
                return False
        return True
    return False


def dump_call(fn_blob: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """One payload for ``fn(*args, **kwargs)``; raises what pickling raises."""
    args_blob = _NO_ARGS if not args and not kwargs else dumps((args, kwargs))
    return len(fn_blob).to_bytes(_LENGTH, "little") + fn_blob + args_blob


def needs_same_python(payload: bytes) -> bool:
    """Whether the payload holds code pickled by value (a lambda, a closure, ``__main__``'s
    functions and classes): only the Python version that pickled it can run it.

    Conservative: any mention of cloudpickle's reconstructors, or of a code object, counts.
    """
    return any(marker in payload for marker in _BY_VALUE)


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
    args, kwargs = pickle.loads(memoryview(payload)[_LENGTH + size :])
    return fn, args, kwargs


class _Slices:
    """A read-only file over a buffer whose large reads copy one slice at a time."""

    def __init__(self, data: Readable) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(self._pos + n, len(self._view))
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out

    def readinto(self, buf: Any) -> int:
        out = memoryview(buf).cast("B")
        n = min(len(out), len(self._view) - self._pos)
        start = self._pos
        for i in range(0, n, _SLICE):  # between two slices, other threads get the GIL
            j = min(i + _SLICE, n)
            out[i:j] = self._view[start + i : start + j]
        self._pos += n
        return n

    def readline(self) -> bytes:  # protocol 0 only
        view, stop = self._view, self._pos
        while stop < len(view):
            found = bytes(view[stop : stop + 4096]).find(b"\n")
            if found >= 0:
                stop += found + 1
                break
            stop += 4096
        line = bytes(view[self._pos : stop])
        self._pos = min(stop, len(view))
        return line


def loads_gently(data: Readable) -> Any:
    """``pickle.loads(data)``, with large bytes objects copied a slice at a time (see above)."""
    return pickle.Unpickler(_Slices(data)).load()
