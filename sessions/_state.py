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

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._driver import Browser, BrowserContext, bounded, context_of, pages_of

__all__ = ("load", "origin_of", "profile_name", "restore", "save", "state_path", "write_private")

log = logging.getLogger("sessions")
_COOKIE_FIELDS = ("name", "value", "domain", "path", "secure", "httpOnly", "sameSite", "priority")
_READ_STORAGE = "() => [location.origin, Object.entries(localStorage)]"
_WRITE_STORAGE = "(items) => { for (const [k, v] of items) localStorage.setItem(k, v); }"
_EMPTY = {  # Fetch.fulfillRequest's answer to every request of a scratch page
    "responseCode": 200,
    "responseHeaders": [{"name": "Content-Type", "value": "text/html"}],
    "body": base64.b64encode(b"<html></html>").decode(),
}


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


async def save(
    browser: Browser, context_id: str | None, path: Path, timeout: float, visited: Iterable[str] = ()
) -> None:
    """Write the context's cookies and local storage to ``path``.

    Local storage is read from the open pages, and from the ``visited``
    origins that have none open (a scratch page, so only when closing).
    """
    params = {"browserContextId": context_id} if context_id else {}
    reply = await bounded(browser._connection.send("Storage.getCookies", params), timeout)
    state = load(path)
    state["cookies"] = reply.get("cookies", [])
    read = set()
    for target in pages_of(browser, context_id):
        with contextlib.suppress(Exception):  # a page navigating or closing: the next save has it
            page = await bounded(target.page(), timeout)
            origin, items = await bounded(page.evaluate(_READ_STORAGE), timeout)
            if origin.startswith("http"):
                state["origins"][origin] = dict(items)
                read.add(origin)
    unread = {o for o in visited if o.startswith("http")} - read
    if unread:
        context = context_of(browser, context_id)
        assert context is not None
        async with _scratch_page(context, timeout) as page:
            for origin in sorted(unread):
                with contextlib.suppress(Exception):
                    await bounded(page.goto(origin + "/"), timeout)
                    _, items = await bounded(page.evaluate(_READ_STORAGE), timeout)
                    state["origins"][origin] = dict(items)
    write_private(path, state)


def origin_of(url: str) -> str | None:
    """The origin of an http(s) URL, else None."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme in ("http", "https") and parts.netloc else None


def write_private(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as JSON, whole (a crash leaves the old file or the new), 0600 in a 0700 folder."""
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
    async with _scratch_page(context, timeout) as page:
        for origin, items in origins.items():
            try:
                await bounded(page.goto(origin + "/"), timeout)
                await bounded(page.evaluate(_WRITE_STORAGE, list(items.items())), timeout)
            except Exception as exc:  # noqa: BLE001 - one origin's storage is not worth the session
                log.warning("could not restore the local storage of %s: %s", origin, exc)


@contextlib.asynccontextmanager
async def _scratch_page(context: Browser | BrowserContext, timeout: float) -> AsyncIterator[Any]:
    """A page of ``context`` whose every request is answered with an empty page, off the network."""
    page = await bounded(context.newPage(), timeout)
    client = page._client
    try:
        client.on("Fetch.requestPaused", lambda event: _answer(client, event["requestId"]))
        await bounded(client.send("Fetch.enable", {"patterns": [{"urlPattern": "*"}]}), timeout)
        yield page
    finally:
        with contextlib.suppress(Exception):
            await bounded(page.close(), timeout)


def _answer(client: Any, request_id: str) -> None:
    reply = client.send("Fetch.fulfillRequest", {"requestId": request_id, **_EMPTY})
    reply.add_done_callback(lambda f: f.cancelled() or f.exception())  # a page closing meanwhile: fine


def _cookie_param(cookie: dict[str, Any]) -> dict[str, Any]:
    param = {k: cookie[k] for k in _COOKIE_FIELDS if k in cookie}
    if not cookie.get("session") and cookie.get("expires", -1) > 0:
        param["expires"] = cookie["expires"]
    return param
