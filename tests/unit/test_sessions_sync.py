"""The blocking proxies' plumbing and the state files, without a browser."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sessions._state import _cookie_param, load, write_private
from sessions._sync import Blocking, pyppeteer_timeout, unwrap, wrap


class Fake:
    """Stands in for a pyppeteer object (wrapping goes by module)."""

    __module__ = "pyppeteer.page"

    def title(self) -> str:
        return "t"


def run_here(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


def test_pyppeteer_objects_are_wrapped_and_unwrapped_anywhere_in_a_value() -> None:
    page = Fake()
    wrapped = wrap({"pages": [page, 1], "pair": (page, "x")}, run_here)
    assert isinstance(wrapped["pages"][0], Blocking) and wrapped["pages"][1] == 1
    assert isinstance(wrapped["pair"], tuple) and wrapped["pair"][1] == "x"
    assert unwrap(wrapped) == {"pages": [page, 1], "pair": (page, "x")}
    assert wrapped["pages"][0].title() == "t" and wrapped["pages"][0] == wrap(page, run_here)
    assert wrap(ValueError("x"), run_here).args == ("x",)  # errors stay errors


@given(st.one_of(st.none(), st.integers(-5, 10**6), st.floats(allow_nan=False), st.booleans()))
def test_pyppeteer_s_own_timeout_extends_the_bound(ms: Any) -> None:
    expected = ms / 1000 if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0 else 0.0
    assert pyppeteer_timeout((), {"timeout": ms}) == expected
    assert pyppeteer_timeout(("#x", {"timeout": ms}), {}) == expected


def test_a_session_cookie_stays_a_session_cookie() -> None:
    session: dict[str, Any] = {"name": "s", "value": "1", "domain": "h", "path": "/", "expires": -1}
    session.update(session=True, size=2)
    lasting = {**session, "expires": 2e9, "session": False}
    assert "expires" not in _cookie_param(session) and "size" not in _cookie_param(session)
    assert _cookie_param(lasting)["expires"] == 2e9


def test_state_files_are_private_and_whole(tmp_path: Path) -> None:
    path = tmp_path / "state" / "a.json"
    write_private(path, {"cookies": [{"name": "s"}], "origins": {}})
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path.parent).st_mode & 0o777 == 0o700
    assert load(path)["cookies"] == [{"name": "s"}]
    path.write_text("{not json")
    assert load(path) == {"cookies": [], "origins": {}}  # a broken file is a fresh start, not a crash
    assert json.loads(json.dumps(load(tmp_path / "none.json"))) == {"cookies": [], "origins": {}}
