"""sessions: a pool of headless Chromium browsers (not built yet; see the issue tracker)."""

from __future__ import annotations

__all__: tuple[str, ...] = ()
