"""A per-thread switch held on for the length of a ``with`` block (nested blocks restore it)."""

from __future__ import annotations

import contextlib
import threading


class ThreadFlag:
    """``if flag:`` reads it in the current thread; ``with flag.on():`` sets it there."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def on(self):
        previous = bool(self)
        self._local.on = True
        try:
            yield
        finally:
            self._local.on = previous
