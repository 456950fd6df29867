"""Stopping a run on request (a SIGTERM to the CLI) at the engine's next safe point.

The CLI's signal handler records the request and raises :class:`~dflashdeconv.errors.Terminated`
at once. Python runs handlers wherever the main thread is, and where that is code that cannot
pass an exception on (a garbage-collector callback or a finaliser: Python prints "Exception
ignored" and carries on) the raise is lost; the recorded request is not: the engine checks it
between tasks and between solver rounds, where raising leaves every recorded step resumable.
"""

from __future__ import annotations

import threading

from ..errors import Terminated

_requested = threading.Event()


def request() -> None:
    """Ask the running engine to stop at its next safe point."""
    _requested.set()


def clear() -> None:
    """Forget a request (a new run starts)."""
    _requested.clear()


def check() -> None:
    """Raise :class:`Terminated` if a stop was requested."""
    if _requested.is_set():
        raise Terminated()
