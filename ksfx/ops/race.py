"""On CUDA, which implementation runs a step or a segment is measured on the GPU.

The roofline (:func:`ksfx.codegen.fusion.segments`) says where fusing should pay and the
dispatch policy (:mod:`ksfx.ops.dispatch`) which steps the generated kernels win, both
from an H100 and a model: neither sees this GPU, a fused kernel's smaller batch tiles and
values re-read per tile, or a spill. Under ``ksfx.config.fuse = "auto"`` (fused segments:
fused against their steps one launch each) and ``ksfx.config.dispatch = "auto"`` (each
step: the generated kernel against the plain-torch path, cuBLAS bmm), the first call at a
batch size (rounded up to a power of two) times the sides on its own inputs, and every
later call runs the fastest: ksfx can then only pick what is faster on this GPU.

Nothing is timed inside a trace (fake tensors: the body of a ``triton_op``) or while a
CUDA graph is captured; there the decision made earlier at that size holds (the backend
runs each chain before Inductor traces it: :func:`ksfx.backend.timing.time_chains`), and
without one the caller's default runs (a segment one launch per step, a step as the
dispatch policy says).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ksfx.config import config
from ksfx.ops.stats import paused

log = logging.getLogger("ksfx.ops")

#: Timed launches of each side (after one untimed call that compiles it); the median counts.
REPEATS = 10


@dataclass(frozen=True)
class Race:
    """One timed choice: the median microseconds of each side (``None``: it could not run,
    e.g. a kernel Triton could not build)."""

    subject: str
    layout: str
    dtype: str
    batch: int
    times: tuple[tuple[str, float | None], ...]

    @property
    def winner(self) -> str:
        timed = [(us, label) for label, us in self.times if us is not None]
        return min(timed)[1]

    def __str__(self) -> str:
        sides = ", ".join(f"{label} {'could not run' if us is None else f'{us:.1f} us'}" for label, us in self.times)
        return f"{self.subject} ({self.layout}, {self.dtype}, batch {self.batch}): {sides}: {self.winner}"


_lock = threading.Lock()
_races: dict[tuple, Race] = {}


def applies(x: torch.Tensor) -> bool:
    """Whether choices on ``x`` are timed (CUDA; each kind of choice also needs its
    ``ksfx.config`` setting at ``"auto"``)."""
    return x.is_cuda


def fusion_applies(x: torch.Tensor) -> bool:
    return applies(x) and config.fuse == "auto"


def dispatch_applies(x: torch.Tensor) -> bool:
    return applies(x) and config.dispatch == "auto"


def bucket(n: int) -> int:
    """Batch sizes sharing a decision: ``n`` rounded up to a power of two."""
    return 1 << max(n - 1, 0).bit_length()


def batch_hint(n) -> int | None:
    """``n``, or the hint of a symbolic ``n`` (a dynamic-shape trace: tiles are chosen for
    it too); ``None`` without one."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return None if hint is None else int(hint)


def race_key(subject: tuple, batch_last: bool, x: torch.Tensor):
    """What a decision is kept under; ``None`` for a symbolic batch without a hint."""
    n = batch_hint(x.shape[1] if batch_last else x.shape[0])
    if n is None:
        return None
    return (subject, batch_last, x.dtype, str(x.device), bucket(n))


def _can_time(x: torch.Tensor) -> bool:
    """Not in a trace (a fake tensor, or one wrapping it: AOT's functional tensors) nor a capture."""
    if torch._subclasses.fake_tensor.is_fake(x) or x.device.type == "meta":
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def decide(
    key,
    x: torch.Tensor,
    sides: dict[str, Callable[[], object | None]],
    subject: Callable[[], str],
    batch_last: bool,
    default: str,
) -> str:
    """The label of the side that runs ``key``'s choice: the fastest of its first timed call.

    Each side runs the choice on the call's own inputs and returns ``None`` where it
    cannot; ``default`` where nothing can be timed and nothing was decided. ``subject``
    names the choice in its record (called only when it is timed: this runs every call).
    """
    if key is None:
        return default
    with _lock:
        race = _races.get(key)
    if race is not None:
        return race.winner
    if not _can_time(x):
        return default
    with paused(), torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        times = _measure(sides)
    if all(us is None for us in times.values()):
        return default
    n = x.shape[1] if batch_last else x.shape[0]
    layout = "batch-last" if batch_last else "batch-first"
    race = Race(subject(), layout, str(x.dtype).removeprefix("torch."), int(n), tuple(times.items()))
    with _lock:
        race = _races.setdefault(key, race)
    log.info("ksfx: timed %s", race)
    return race.winner


def _measure(sides: dict[str, Callable[[], object | None]]) -> dict[str, float | None]:
    """Median microseconds of each side over :data:`REPEATS` interleaved launches (CUDA
    events), after one untimed call; ``None`` for a side whose call returned ``None``."""
    runnable = {label: side for label, side in sides.items() if side() is not None}
    events: dict[str, list[tuple]] = {label: [] for label in runnable}
    for _ in range(REPEATS):
        for label, side in runnable.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            side()
            stop.record()
            events[label].append((start, stop))
    torch.cuda.synchronize()
    medians = {label: 1000 * statistics.median(a.elapsed_time(b) for a, b in timed) for label, timed in events.items()}
    return {label: medians.get(label) for label in sides}


def races() -> list[Race]:
    """Every decision made so far in this process, in the order they were made."""
    with _lock:
        return list(_races.values())


def forget() -> None:
    """Drop every decision (the next call of each choice times it again)."""
    with _lock:
        _races.clear()


__all__ = [
    "REPEATS",
    "Race",
    "applies",
    "batch_hint",
    "bucket",
    "decide",
    "dispatch_applies",
    "forget",
    "fusion_applies",
    "race_key",
    "races",
]
