"""An account's login state on disk: cookies (session cookies too) and local storage.

    save(browser, context) ── Storage.getCookies + its pages' localStorage ──▶ <root>/state/<account>.json
    restore(browser, context) ◀── the same file: Storage.setCookies, then each origin's storage

A Chromium restart drops session cookies and an incognito context keeps
nothing, so the pool saves this on close, on recycle and every
``state_save_interval``, and restores it when the account's session is made
again. Files are the user's alone (0600 in a 0700 folder), written whole
(a crash leaves the old file or the new one) and never logged.

Local storage is restored as Playwright restores ``storage_state``: a
scratch page visits each origin with every request answered by an empty page
(nothing reaches the network), sets the items, and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ._driver import Browser, BrowserContext, bounded

__all__ = ("load", "profile_name", "restore", "save", "state_path")

log = logging.getLogger("sessions")
_COOKIE_FIELDS = ("name", "value", "domain", "path", "secure", "httpOnly", "sameSite", "priority")
_READ_STORAGE = "() => [location.origin, Object.entries(localStorage)]"
_WRITE_STORAGE = "(items) => { for (const [k, v] of items) localStorage.setItem(k, v); }"
_EMPTY = {"status": 200, "contentType": "text/html", "body": "<html></html>"}


def profile_name(account: str) -> str:
    """A file or folder name for an account: readable, safe, and distinct for distinct accounts."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", account)[:40].lstrip(".") or "account"
    return f"{safe}-{hashlib.sha256(account.encode()).hexdigest()[:8]}"


def state_path(root: Path, account: str) -> Path:
    return root / "state" / f"{profile_name(account)}.json"


def load(path: Path) -> dict[str, Any]:
    """The saved state, or an empty one (none yet, or unreadable)."""
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict):
            return state
    except (OSError, ValueError):
        pass
    return {"cookies": [], "origins": {}}


async def save(browser: Browser, context_id: str | None, path: Path, timeout: float) -> None:
    """Write the context's cookies and its open pages' local storage to ``path``."""
    params = {"browserContextId": context_id} if context_id else {}
    reply = await bounded(browser._connection.send("Storage.getCookies", params), timeout)
    state = load(path)
    state["cookies"] = reply.get("cookies", [])
    for target in browser.targets():
        owner = target._targetInfo.get("browserContextId")
        mine = owner == context_id if context_id else owner not in browser._contexts
        if target.type != "page" or not mine:
            continue
        with contextlib.suppress(Exception):  # a page navigating or closing: the next save has it
            page = await bounded(target.page(), timeout)
            origin, items = await bounded(page.evaluate(_READ_STORAGE), timeout)
            if origin.startswith("http"):
                state["origins"][origin] = dict(items)
    _write(path, state)


def _write(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(state, file)
    os.replace(temporary, path)


async def restore(browser: Browser, context: Browser | BrowserContext, path: Path, timeout: float) -> None:
    """Put the saved cookies and local storage back into ``context`` (a fresh one)."""
    state = load(path)
    context_id = getattr(context, "_id", None)
    cookies = [_cookie_param(c) for c in state.get("cookies", [])]
    if cookies:
        params: dict[str, Any] = {"cookies": cookies}
        if context_id:
            params["browserContextId"] = context_id
        await bounded(browser._connection.send("Storage.setCookies", params), timeout)
    origins = {o: items for o, items in state.get("origins", {}).items() if items}
    if origins:
        await _restore_storage(context, origins, timeout)


async def _restore_storage(
    context: Browser | BrowserContext, origins: dict[str, Any], timeout: float
) -> None:
    page = await bounded(context.newPage(), timeout)
    try:
        await bounded(page.setRequestInterception(True), timeout)
        page.on("request", lambda request: asyncio.ensure_future(request.respond(_EMPTY)))
        for origin, items in origins.items():
            try:
                await bounded(page.goto(origin + "/"), timeout)
                await bounded(page.evaluate(_WRITE_STORAGE, list(items.items())), timeout)
            except Exception as exc:  # noqa: BLE001 - one origin's storage is not worth the session
                log.warning("could not restore the local storage of %s: %s", origin, exc)
    finally:
        with contextlib.suppress(Exception):
            await bounded(page.close(), timeout)


def _cookie_param(cookie: dict[str, Any]) -> dict[str, Any]:
    param = {k: cookie[k] for k in _COOKIE_FIELDS if k in cookie}
    if not cookie.get("session") and cookie.get("expires", -1) > 0:
        param["expires"] = cookie["expires"]
    return param
