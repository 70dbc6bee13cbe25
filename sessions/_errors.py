"""Errors raised by sessions.

SessionError
├── BrowserNotFoundError (FileNotFoundError)  no Chromium to run; says how to install one
├── BrowserLaunchError                         Chromium did not start; holds its own output
├── ProfileInUseError                          another browser runs on that account's profile
├── SessionPoolFullError                       every session is in use and max_sessions is reached
│                                              (after waiting acquire_timeout for one to free)
├── SessionPoolClosedError (RuntimeError)      a call after close(), or in a forked child
├── CallTimeoutError (TimeoutError)            a browser call got no answer within call_timeout
├── PageCrashedError                           the page's renderer died; its pending calls fail
└── BrowserGoneError                           the browser stopped answering; pending calls fail
"""

from __future__ import annotations

__all__ = (
    "BrowserGoneError",
    "BrowserLaunchError",
    "BrowserNotFoundError",
    "CallTimeoutError",
    "PageCrashedError",
    "ProfileInUseError",
    "SessionError",
    "SessionPoolClosedError",
    "SessionPoolFullError",
)


class SessionError(Exception):
    """Base class of every error sessions raises on its own account."""


class BrowserNotFoundError(SessionError, FileNotFoundError):
    """No Chromium executable was found."""


class BrowserLaunchError(SessionError):
    """Chromium exited or did not listen in time; the message holds its output."""


class ProfileInUseError(SessionError):
    """Another browser (another pool or process) runs on that profile directory."""


class SessionPoolFullError(SessionError):
    """``max_sessions`` are open and every one is in use, so none can be evicted."""


class SessionPoolClosedError(SessionError, RuntimeError):
    """The pool was closed."""


class CallTimeoutError(SessionError, TimeoutError):
    """A browser call got no answer within ``call_timeout``; the browser and page live on."""


class PageCrashedError(SessionError):
    """The page's renderer died (a crash, or killed for its memory); open a new page."""


class BrowserGoneError(SessionError):
    """The browser stopped answering (frozen, or gone); its session is replaced on next use."""
