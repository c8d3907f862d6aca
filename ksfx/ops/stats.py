"""Launch counters, so users and tests can see which implementation actually ran."""

from __future__ import annotations

import threading
from collections import Counter

from ksfx.ops.thread_flag import ThreadFlag

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_paused = ThreadFlag()


def record(name: str, launches: int = 1) -> None:
    if _paused:
        return
    with _lock:
        _counts[name] += launches


def paused():
    """Count nothing (in this thread): a traced op body plans launches, it runs none."""
    return _paused.on()


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
