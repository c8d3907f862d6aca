"""On CUDA, whether a segment runs fused is measured on the GPU, not assumed.

The roofline (:func:`ksfx.codegen.fusion.segments`) says where fusing should pay; it
sees neither the fused kernel's smaller batch tiles and values re-read per tile nor a
spill. Under ``ksfx.config.fuse = "auto"`` the first call of a fused segment at a batch
size (rounded up to a power of two) times its fused launch against its steps one launch
each, as the op runs them otherwise, and every later call runs the faster: fusion can
then only make a chain faster on this GPU. Nothing is timed inside a trace (fake tensors:
the body of a ``triton_op``) or while a CUDA graph is captured; there the decision made
earlier at that size holds (the backend times each chain before Inductor traces it:
:func:`ksfx.backend.fusion_timing.time_chains`), and without one the steps run one by one.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ksfx.config import config
from ksfx.ops.stats import paused, record
from ksfx.pattern import FactorStep

log = logging.getLogger("ksfx.ops")

#: Timed launches of each side (after one untimed call that compiles it); the median counts.
REPEATS = 10


@dataclass(frozen=True)
class Race:
    """One timed segment: the median microseconds of each side (``fused_us`` None: no fused
    kernel could be built)."""

    segment: str
    layout: str
    dtype: str
    batch: int
    taps: bool
    fused_us: float | None
    steps_us: float

    @property
    def fused(self) -> bool:
        return self.fused_us is not None and self.fused_us < self.steps_us

    def __str__(self) -> str:
        fused = "no kernel" if self.fused_us is None else f"{self.fused_us:.1f} us"
        kind = "with every step's output" if self.taps else "forward"
        return (
            f"{self.segment} ({self.layout}, {self.dtype}, batch {self.batch}, {kind}): fused {fused}, "
            f"one launch per step {self.steps_us:.1f} us: {'fused' if self.fused else 'one by one'}"
        )


_lock = threading.Lock()
_races: dict[tuple, Race] = {}


def applies(x: torch.Tensor) -> bool:
    """Whether fused segments on ``x`` are timed before they run fused."""
    return x.is_cuda and config.fuse == "auto"


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


def race_key(steps: tuple[FactorStep, ...], batch_last: bool, x: torch.Tensor, bias: bool, taps: bool):
    """What a decision is kept under; ``None`` for a symbolic batch without a hint."""
    n = batch_hint(x.shape[1] if batch_last else x.shape[0])
    if n is None:
        return None
    return (steps, batch_last, x.dtype, str(x.device), bucket(n), bias, taps)


def _can_time(x: torch.Tensor) -> bool:
    if isinstance(x, torch._subclasses.FakeTensor) or x.device.type == "meta":
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def runs_fused(
    key,
    x: torch.Tensor,
    fused: Callable[[], object | None],
    one_by_one: Callable[[], object],
    describe: Callable[[], tuple[str, str, str, int, bool]],
) -> bool:
    """Whether the segment of ``key`` runs fused: the decision of its first timed call.

    ``fused`` runs the fused launch (``None``: no kernel), ``one_by_one`` the steps one
    launch each, on the call's own inputs; ``describe`` names the race for its record.
    """
    if key is None:
        return False
    with _lock:
        race = _races.get(key)
    if race is not None:
        return race.fused
    if not _can_time(x):
        return False
    with paused():
        fused_us, steps_us = _measure(fused, one_by_one)
    race = Race(*describe(), fused_us, steps_us)
    with _lock:
        _races.setdefault(key, race)
    log.info("ksfx: timed %s", race)
    record("fusion.timed")
    return race.fused


def _measure(fused: Callable[[], object | None], one_by_one: Callable[[], object]) -> tuple[float | None, float]:
    """Median microseconds of the fused side (``None``: no kernel) and of the steps one by
    one, over :data:`REPEATS` interleaved launches each (CUDA events), after one untimed call."""
    one_by_one()
    sides = [one_by_one] + ([fused] if fused() is not None else [])
    events: list[list[tuple]] = [[] for _ in sides]
    for _ in range(REPEATS):
        for side, timed in zip(sides, events, strict=True):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            side()
            stop.record()
            timed.append((start, stop))
    torch.cuda.synchronize()
    medians = [1000 * statistics.median(a.elapsed_time(b) for a, b in timed) for timed in events]
    return (medians[1] if len(medians) > 1 else None), medians[0]


def races() -> list[Race]:
    """Every decision made so far in this process, in the order they were made."""
    with _lock:
        return list(_races.values())


def forget() -> None:
    """Drop every decision (the next call of each segment times it again)."""
    with _lock:
        _races.clear()


__all__ = ["REPEATS", "Race", "applies", "batch_hint", "bucket", "forget", "race_key", "races", "runs_fused"]
