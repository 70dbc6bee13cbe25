"""Blocking proxies of pyppeteer objects, for plain code; every call runs on the pool's loop.

    with pool.sync_session("acct") as browser:      Blocking(Browser or BrowserContext)
        page = browser.newPage()                     ── run on the pool loop, awaited there ──▶ Blocking(Page)
        page.goto(url); page.waitForSelector("#x")   coroutines, futures and WaitTasks alike
        page.evaluate("document.title")              plain values come back as they are

A call is bounded by the pool's ``call_timeout``, plus pyppeteer's own
``timeout`` (milliseconds) when the call passes one; at the bound it is
cancelled on the loop and raises ``CallTimeoutError``. Proxies given as
arguments (an element handle to ``evaluate``) are unwrapped. Event handlers
(``page.on``) run on the pool's loop and get plain pyppeteer objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ("Blocking", "pyppeteer_timeout", "unwrap", "wrap")

Runner = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


class Blocking:
    """A pyppeteer object whose methods block until done (see the module docstring)."""

    __slots__ = ("_obj", "_run")

    def __init__(self, obj: Any, run: Runner) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_run", run)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        if callable(value) and not isinstance(value, type):
            return _Method(value, self._run)
        return wrap(value, self._run)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot set {name!r} on a blocking proxy of {type(self._obj).__name__}")

    def __repr__(self) -> str:
        return f"<blocking {self._obj!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blocking) and other._obj is self._obj

    def __hash__(self) -> int:
        return id(self._obj)

    def __dir__(self) -> list[str]:
        return dir(self._obj)


class _Method:
    __slots__ = ("_fn", "_run")

    def __init__(self, fn: Callable[..., Any], run: Runner) -> None:
        self._fn, self._run = fn, run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return wrap(self._run(self._fn, unwrap(args), unwrap(kwargs)), self._run)

    def __repr__(self) -> str:
        return f"<blocking {self._fn!r}>"


def wrap(value: Any, run: Runner) -> Any:
    """pyppeteer objects (in lists, tuples and dicts too) as Blocking proxies; the rest unchanged."""
    if isinstance(value, (list, tuple)):
        return type(value)(wrap(v, run) for v in value)
    if isinstance(value, dict):
        return {k: wrap(v, run) for k, v in value.items()}
    if type(value).__module__.startswith("pyppeteer.") and not isinstance(value, BaseException):
        return Blocking(value, run)
    return value


def unwrap(value: Any) -> Any:
    if isinstance(value, Blocking):
        return value._obj
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def pyppeteer_timeout(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    """Seconds of pyppeteer's own ``timeout`` (ms) in a call's keywords or options dict; else 0."""
    options = [kwargs, *(a for a in args if isinstance(a, dict))]
    for each in options:
        ms = each.get("timeout")
        if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0:
            return ms / 1000
    return 0.0
