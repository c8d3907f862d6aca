"""Which consecutive factor steps of a chain run as one fused launch, and how.

A fused segment keeps a batch tile's whole feature vector on chip from one factor to
the next: the input is read once, each factor gathers its ``c`` inputs per output row
from the previous factor's on-chip output (the permutations between factors fold into
that gather), and only the last factor's output is stored. The segment moves
``|X| + |W| + |Y|`` bytes, where per-factor launches move every intermediate twice more.

This first version fuses small-block factors (the ``fma`` kernel mode: butterflies and
other chains of blocks under 16x16), whose per-factor launches are bound by those
round trips. A segment ends where a factor needs tensor cores, where an intermediate is
wider than :data:`MAX_WIDTH` (the tile no longer fits on chip), or where a factor must
keep the non-finite behaviour of a dense product (that needs its input in memory).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ksfx.codegen.tiling import clamp_pow2, kernel_mode, next_pow2
from ksfx.pattern import FactorStep
from ksfx.pattern.perm import compose

#: Widest feature vector a fused segment holds per batch row (input, intermediates, output).
MAX_WIDTH = 4096
#: Features a program holds in registers at once (batch tile x padded width), about 64 KiB of fp32.
TILE_ELEMENTS = 16384


@dataclass(frozen=True)
class Segment:
    """Steps ``start:stop`` of a plan (application order), fused when ``fused``; ``why`` says why not."""

    start: int
    stop: int
    fused: bool
    why: str = ""


def fusable(step: FactorStep, batch_last: bool) -> str:
    """Empty when ``step`` can join a fused segment, else the reason it cannot."""
    p = step.pattern
    if kernel_mode(p, batch_last) != "fma":
        return f"{p} has {p.b}x{p.c} blocks (tensor-core kernel of its own)"
    if max(p.in_features, p.out_features) > MAX_WIDTH:
        return f"{p} is wider than {MAX_WIDTH} features"
    return ""


def segments(steps: list[FactorStep], batch_last: bool, dense: list[bool] | None = None) -> list[Segment]:
    """The plan cut into maximal fused runs of at least two steps, and single steps between them.

    ``dense[k]``: step ``k`` stands for a dense product (its own launch, see the op).
    """
    return list(_segments(tuple(steps), batch_last, tuple(dense or [False] * len(steps))))


@functools.lru_cache(maxsize=1024)
def _segments(steps: tuple[FactorStep, ...], batch_last: bool, dense: tuple[bool, ...]) -> tuple[Segment, ...]:
    reasons = ["stands for a dense product" if dense[k] else fusable(s, batch_last) for k, s in enumerate(steps)]
    out: list[Segment] = []
    k = 0
    while k < len(steps):
        stop = k
        while stop < len(steps) and not reasons[stop]:
            stop += 1
        if stop - k >= 2:
            out.append(Segment(k, stop, True))
            k = stop
        else:
            out.append(Segment(k, k + 1, False, reasons[k] or "no fusable neighbour"))
            k += 1
    return tuple(out)


def describe(cut: list[Segment]) -> str:
    """``cut`` in words, steps numbered from 1 in application order (for ``explain``)."""
    parts = []
    for seg in cut:
        if seg.fused:
            parts.append(f"steps {seg.start + 1}-{seg.stop} fused in one launch")
        else:
            parts.append(f"step {seg.start + 1} alone ({seg.why})")
    return "; ".join(parts)


@functools.lru_cache(maxsize=1024)
def _on_chip(steps: tuple[FactorStep, ...]) -> tuple[FactorStep, ...]:
    moved: list[FactorStep] = []
    pending = None
    for k, step in enumerate(steps):
        in_perm = step.in_perm
        if pending is not None:
            in_perm = pending if in_perm is None else compose(pending, in_perm)
        last = k == len(steps) - 1
        moved.append(FactorStep(step.pattern, in_perm, step.out_perm if last else None))
        pending = None if last else step.out_perm
    return tuple(moved)


def on_chip_steps(steps: list[FactorStep] | tuple[FactorStep, ...]) -> tuple[FactorStep, ...]:
    """The segment's steps with every permutation between two factors moved to the later
    factor's loads (the gather from the on-chip vector); the last keeps its stores' permutation."""
    return _on_chip(tuple(steps))


@dataclass(frozen=True)
class FusedTile:
    """Batch rows per program and warps of a fused launch."""

    block_m: int
    num_warps: int


def fused_tile(steps: tuple[FactorStep, ...], n: int) -> FusedTile:
    """Batch rows so that a program's widest vector tile stays near :data:`TILE_ELEMENTS`, on 8 warps.

    Compiled for sm_90 (triton 3.9, butterflies of width 64-1024, fp32 and bf16, both
    layouts): no spill on 8 warps; width 256 on 4 warps spilled (114-243 spill instructions).
    """
    width = max(next_pow2(max(s.pattern.in_features, s.pattern.out_features)) for s in steps)
    block_m = clamp_pow2(TILE_ELEMENTS // width, 1, 64)
    block_m = min(block_m, clamp_pow2(n, 1, block_m))
    return FusedTile(block_m, 8)
