"""Launch counters, so users and tests can see which implementation actually ran."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_paused = threading.local()


def record(name: str, launches: int = 1) -> None:
    if getattr(_paused, "on", False):
        return
    with _lock:
        _counts[name] += launches


@contextlib.contextmanager
def paused():
    """Count nothing (in this thread): a traced op body plans launches, it runs none."""
    previous = getattr(_paused, "on", False)
    _paused.on = True
    try:
        yield
    finally:
        _paused.on = previous


def stats(reset: bool = False) -> dict[str, int]:
    """Launches per implementation since the last reset (e.g. ``{"triton.forward": 2}``).

    Names contain ``triton`` for generated kernels (``triton-interpret`` under the
    interpreter) and ``cpu`` for the CPU path. ``reset=True`` clears after reading.
    """
    with _lock:
        snapshot = dict(_counts)
        if reset:
            _counts.clear()
    return snapshot
