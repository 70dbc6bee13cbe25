"""How a SessionPool ends: close(), garbage collection, interpreter exit; and its root's lock.

    SessionPool.close ─┐
    garbage collection ├─▶ weakref.finalize ─▶ shut_down: every session closed (logins saved),
    interpreter exit ──┘                          the loop thread ended, the temporary root removed
    a forked child ── the same ──▶ nothing: the browsers are the parent's

The finalizer holds what the pool's end needs (loop, thread, core), never
the pool, so a dropped pool can be collected.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # registers its exit hook before the pool's (see below)
import contextlib
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

from ._core import Core
from ._hosts import lock_folder

__all__ = ("lock_root", "register_exit_hook", "shut_down")


def lock_root(root: Path) -> int:
    busy = f"profile_root {root} is in use by another SessionPool; give each pool its own root"
    return lock_folder(root, ".pool.lock", busy)


def shut_down(
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
    core: Core,
    upkeep: concurrent.futures.Future[None],
    owner: int,
    temporary: Path | None,
    root_lock: int,
) -> None:
    """Close every browser and end the loop thread (close(), garbage collection, or exit)."""
    if os.getpid() != owner:
        return  # a forked copy: the browsers are the parent's
    if threading.current_thread() is thread:  # dropped on its own loop: finish there, unseen
        done = loop.create_task(_wind_down(core, upkeep))

        def finish(_: object) -> None:
            _release_root(temporary, root_lock)
            loop.stop()

        done.add_done_callback(finish)
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(_wind_down(core, upkeep), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
    _release_root(temporary, root_lock)


def _release_root(temporary: Path | None, root_lock: int) -> None:
    os.close(root_lock)
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)


async def _wind_down(core: Core, upkeep: concurrent.futures.Future[None]) -> None:
    upkeep.cancel()
    await core.close_all()
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:  # connections winding down: end them before the loop closes
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def register_exit_hook(finalizer: weakref.finalize[Any, Any]) -> None:
    # Closing stops browsers through the loop's default thread pool, and at interpreter exit
    # concurrent.futures refuses new work from its own exit hook on, which runs before atexit
    # functions. Hooks of threading's own exit run in reverse order of registration, and
    # concurrent.futures.thread (imported above) registered first: this one runs before it.
    # In a forked child (multiprocessing calls threading._shutdown as a worker ends) the
    # finalizer does nothing: the browsers are the parent's.
    try:
        threading._register_atexit(finalizer)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # another Python, or exit has begun: the plain hook
        atexit.register(finalizer)
