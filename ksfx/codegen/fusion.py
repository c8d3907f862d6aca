"""Which consecutive factor steps of a chain run as one fused launch, and how.

A fused segment keeps a batch tile's feature vector on chip from one factor to the
next: the input is read once, each factor gathers its inputs from the previous factor's
on-chip output (the permutations between factors fold into that gather), and only the
last factor's output is stored. The segment moves ``|X| + |W| + |Y|`` bytes, where
per-factor launches move every intermediate twice more.

Two kinds of factor join a segment (:func:`~ksfx.codegen.tiling.kernel_mode`):

* small blocks (``fma``: butterflies and other chains of blocks under 16x16) compute
  their whole output vector at once by rank-1 updates over γ;
* tensor-core blocks (``dot`` / ``dot3``) compute it as ``(group, β tile)`` tiles of
  :class:`DotTiles`, each a ``tl.dot`` over γ tiles gathered from the on-chip vector;
  the tiles of an intermediate are joined into one vector (in tile-interleaved order,
  which the next factor's gather undoes); the last factor stores each tile as it is done.

A segment ends where the vectors it holds per batch row no longer fit the register tile
(:data:`TILE_ELEMENTS` with at least :data:`MIN_ROWS` rows, or :data:`MAX_WIDTH` for
small blocks), or where a factor must keep the non-finite behaviour of a dense product
(that needs its input in memory). On a GPU a segment also fuses only where the roofline
says fusing pays (:func:`roofline_gain`, :data:`MIN_GAIN`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from ksfx.codegen.devices import Device
from ksfx.codegen.tiling import MIN_DOT, cdiv, clamp_pow2, next_pow2, uses_tensor_cores
from ksfx.pattern import ALPHA, DELTA, GAMMA, FactorStep, IndexPerm, KSPattern
from ksfx.pattern.ks import mixed_radix_compose
from ksfx.pattern.perm import compose

#: Widest feature vector a small-block segment holds per batch row (input, intermediates, output).
MAX_WIDTH = 4096
#: Features a program holds in registers at once (batch tile x padded width), about 64 KiB of fp32.
TILE_ELEMENTS = 16384
#: Fewest batch rows of a segment with tensor-core factors (``tl.dot`` needs 16).
MIN_ROWS = MIN_DOT
#: Warps of a fused launch (:func:`fused_warps`).
FUSED_WARPS = 8
#: ... and of one whose tensor-core factors run as fp32 FMA dots (IEEE).
FMA_DOT_WARPS = 16
#: Bytes a thread loads at once to load wide (8 or 16 bytes).
WIDE_BYTES = 8
#: Least roofline speed-up of fusing a run (over its steps one launch each) for it to fuse
#: on a GPU. A fused segment runs on smaller batch tiles than the per-factor kernels (its
#: values re-read per tile, its registers shared by every factor), which the roofline does
#: not count: 10% is an assumption until a GPU run times both.
MIN_GAIN = 1.1


@dataclass(frozen=True)
class Segment:
    """Steps ``start:stop`` of a plan (application order), fused when ``fused``; ``why`` says why not."""

    start: int
    stop: int
    fused: bool
    why: str = ""


@dataclass(frozen=True)
class DotTiles:
    """How a tensor-core factor of a segment tiles its output: ``tiles`` tiles of ``block_n``
    rows (β) of one group ``(α, δ)``, tile ``t = group * beta_tiles + β // block_n``, each
    reduced over γ in steps of ``block_k``. Joined on chip, row β of tile ``t`` sits at
    column ``(β % block_n) * padded + t`` of a vector ``width`` wide."""

    block_n: int
    block_k: int
    beta_tiles: int
    tiles: int

    @property
    def padded(self) -> int:
        return next_pow2(self.tiles)

    @property
    def width(self) -> int:
        return self.padded * self.block_n


def dot_tiles(
    pattern: KSPattern, itemsize: int = 2, rows_from_memory: int = 0, warps: int = FUSED_WARPS, fma_dots: bool = False
) -> DotTiles:
    """γ tiles of 16 in fp32 on chip: compiled for sm_90 (triton 3.9, batch 25,088), the
    ViT-S/16 MLP segments spilled 2184-4671 instructions with 64 and none with 16 (FMA dots
    under IEEE); 32 gave the MLP-down segment 1385-1433 in its loop.

    ``fma_dots`` (fp32 under IEEE) on :data:`FUSED_WARPS`: β tiles of at most 32. Compiled
    for sm_90 (triton 3.6, ``benchmarks.fused_census --grid monarch``), the n = 1024 pairs
    with 64-wide blocks (16 batch rows, 8 warps) spilled 247-1,836 instructions in loops
    with 64 and 0-2 with 32; on 16 warps (n = 512, 32 rows) 32 spilled more.

    ``rows_from_memory``: the batch rows of a first factor that reads its γ tiles from
    memory. Its tile is then wide enough for :data:`WIDE_BYTES` a thread of ``warps``:
    16 rows x 16 fp32 is one 4-byte load a thread on 8 warps; 32 made the Monarch n = 1024
    segment load 70/70 wide (70/134 with 16), both layouts.
    """
    block_n = clamp_pow2(pattern.b, MIN_DOT, 32 if fma_dots and warps == FUSED_WARPS else 64)
    beta_tiles = cdiv(pattern.b, block_n)
    widest = 64 if itemsize <= 2 else MIN_DOT
    if rows_from_memory:
        wide = next_pow2(cdiv(WIDE_BYTES * 32 * warps, rows_from_memory * itemsize))
        widest = max(widest, min(64, wide))
    block_k = clamp_pow2(pattern.c, MIN_DOT, widest)
    return DotTiles(block_n, block_k, beta_tiles, pattern.groups * beta_tiles)


def is_dot(step: FactorStep, batch_last: bool) -> bool:
    return uses_tensor_cores(step.pattern, batch_last)


def values_order(step: FactorStep, batch_last: bool) -> tuple[int, int, int, int]:
    """The order (outermost first) in which a segment's kernel reads a step's values
    (a copy of ``|W|`` per launch where it is not the stored ``(a, b, c, d)``).

    A tensor-core factor loads ``[γ, β]`` tiles at one ``δ``: with ``d > 1`` the stored
    order strides them by ``d`` along γ and ``c·d`` along β, so β goes innermost. A
    small-block factor loads, per γ, one value per output row ``(α, β, δ)``: γ outermost
    makes that vector contiguous.
    """
    if not is_dot(step, batch_last):
        return (2, 0, 1, 3)
    return (0, 3, 2, 1) if step.pattern.d > 1 else (0, 1, 2, 3)


def value_strides(step: FactorStep, batch_last: bool) -> tuple[int, int, int, int]:
    """Strides of ``values[α, β, γ, δ]`` laid out in :func:`values_order`."""
    shape = step.pattern.as_tuple()
    strides, size = [0] * 4, 1
    for dim in reversed(values_order(step, batch_last)):
        strides[dim], size = size, size * shape[dim]
    return tuple(strides)


def table_in_tile_order(step: FactorStep, batch_last: bool) -> bool:
    """Whether a fused segment reads ``step``'s input index table in ``(α, δ, γ)`` order,
    γ fastest, rather than in feature order. A tensor-core factor looks a γ tile of one
    ``(α, δ)`` up at a time: in feature order its entries are ``d`` apart (an int32 load per
    lane, the sm_90 census shows 4-byte ``cp.async``), in this order one contiguous run.
    Small-block factors look a whole row vector up per γ, contiguous in δ: feature order."""
    return isinstance(step.in_perm, IndexPerm) and is_dot(step, batch_last) and step.pattern.d > 1


def table_position(step: FactorStep, batch_last: bool) -> sympy.Expr:
    """Where ``step``'s input table holds the entry of ``x'[col(α, γ, δ)]`` (see :func:`table_in_tile_order`)."""
    p = step.pattern
    if table_in_tile_order(step, batch_last):
        return mixed_radix_compose((ALPHA, DELTA, GAMMA), (p.a, p.d, p.c))
    return p.col_expr


def needs_input_whole(steps: tuple[FactorStep, ...], batch_last: bool) -> bool:
    """Whether the first factor can only read its input from a tile loaded whole.

    Small blocks gather from it; a tensor-core first factor can read its γ tiles straight
    from memory, except batch-first with ``d > 1``, where those reads would be strided
    by ``d`` along the contiguous axis.
    """
    first = steps[0]
    return not is_dot(first, batch_last) or (first.pattern.d > 1 and not batch_last)


def reads_input_whole(steps: tuple[FactorStep, ...], batch_last: bool, itemsize: int, warps: int = FUSED_WARPS) -> bool:
    """Whether the segment loads its input tile whole before the first factor.

    Where it must (:func:`needs_input_whole`), and where the γ tiles read straight from
    memory would be under :data:`WIDE_BYTES` a thread and the input is no wider than a
    vector the segment holds anyway (so its batch rows stay). Compiled for sm_90 (batch
    25,088): the Monarch n = 1024 segment in bf16 read 16 x 32 tiles, 35/67 loads wide;
    loading its input whole, 43/43, with no more spill (triton 3.6 and 3.9).
    """
    if needs_input_whole(steps, batch_last):
        return True
    first, rows = steps[0].pattern, segment_rows(steps, batch_last)
    tile_bytes = rows * dot_tiles(first, itemsize, rows, warps).block_k * itemsize
    narrow = tile_bytes < WIDE_BYTES * 32 * warps
    return narrow and next_pow2(first.in_features) <= max(on_chip_widths(steps, batch_last), default=0)


def on_chip_widths(steps: tuple[FactorStep, ...], batch_last: bool) -> list[int]:
    """Columns of each vector the segment holds whole per batch row (padded to powers of two)."""
    widths = [next_pow2(steps[0].pattern.in_features)] if needs_input_whole(steps, batch_last) else []
    for k, step in enumerate(steps):
        if not is_dot(step, batch_last):
            widths.append(next_pow2(step.pattern.out_features))
        elif k < len(steps) - 1:  # the last tensor-core factor stores tile by tile
            widths.append(dot_tiles(step.pattern).width)
    return widths


def _overflow(steps: tuple[FactorStep, ...], batch_last: bool) -> str:
    """Empty when ``steps`` fit one fused launch, else why not."""
    widest = max(on_chip_widths(steps, batch_last), default=0)
    if any(is_dot(s, batch_last) for s in steps):
        limit = TILE_ELEMENTS // MIN_ROWS
        if widest > limit:
            return f"a {widest}-wide vector on chip leaves under {MIN_ROWS} rows for tensor cores"
    elif widest > MAX_WIDTH:
        return f"a {widest}-wide vector on chip (at most {MAX_WIDTH})"
    return ""


@dataclass(frozen=True)
class Ceilings:
    """What :func:`roofline_gain` weighs a run with: a GPU's ceilings for one dtype and precision."""

    device: str
    bandwidth: float  # bytes/s
    ffma: float  # FLOP/s of small-block factors (fp32 FMA)
    dots: float  # FLOP/s of tensor-core factors' tl.dot
    itemsize: int
    min_gain: float = MIN_GAIN  # a run fuses from this roofline gain up


def ceilings(device: Device, dtype: str, precision: str, min_gain: float | None = None) -> Ceilings:
    """``device``'s ceilings for ``dtype`` (``float32`` / ``float16`` / ``bfloat16``) under
    the kernel key's ``precision``: fp32 dots run on FMA under ``ieee`` (the sm_90 census
    shows FFMA and no HGMMA), on wgmma under ``tf32``; 16-bit dots on wgmma.
    ``min_gain``: :data:`MIN_GAIN` unless given (0: every run that fits fuses)."""
    unit = "wgmma16" if dtype != "float32" else ("ffma" if precision == "ieee" else "wgmma_tf32")
    itemsize = 4 if dtype == "float32" else 2
    rates = device.rates["ffma"].flops, device.rates[unit].flops
    return Ceilings(device.name, device.bandwidth, *rates, itemsize, MIN_GAIN if min_gain is None else min_gain)


def roofline_gain(steps: tuple[FactorStep, ...], batch_last: bool, ceil: Ceilings) -> float:
    """The roofline time of ``steps`` one launch each over that of one fused launch, per batch
    row (a large batch: the values are left out). Each launch takes the longer of its bytes
    (input and output features) over the bandwidth and its FLOPs over its unit's rate; fused,
    the intermediates move no bytes and the FLOPs stay. Compute-bound runs gain little
    (the ViT-S/16 MLP chains in fp32 under IEEE: 1.00-1.03x on H100), memory-bound ones
    up to the number of steps (a 10-factor butterfly: 10x)."""
    return sum(_alone_times(steps, batch_last, ceil)) / _fused_time(steps, batch_last, ceil)


def _flops_times(steps: tuple[FactorStep, ...], batch_last: bool, ceil: Ceilings) -> list[float]:
    return [2 * s.pattern.nnz / (ceil.dots if is_dot(s, batch_last) else ceil.ffma) for s in steps]


def _alone_times(steps: tuple[FactorStep, ...], batch_last: bool, ceil: Ceilings) -> list[float]:
    """Each step's roofline time per batch row as a launch of its own."""
    moved = [(s.pattern.in_features + s.pattern.out_features) * ceil.itemsize / ceil.bandwidth for s in steps]
    return [max(m, c) for m, c in zip(moved, _flops_times(steps, batch_last, ceil), strict=True)]


def _fused_time(steps: tuple[FactorStep, ...], batch_last: bool, ceil: Ceilings) -> float:
    """The roofline time per batch row of ``steps`` as one fused launch."""
    features = steps[0].pattern.in_features + steps[-1].pattern.out_features
    return max(features * ceil.itemsize / ceil.bandwidth, sum(_flops_times(steps, batch_last, ceil)))


def segments(
    steps: list[FactorStep], batch_last: bool, dense: list[bool] | None = None, ceil: Ceilings | None = None
) -> list[Segment]:
    """The plan cut into fused runs of at least two steps, and single steps between them.

    ``dense[k]``: step ``k`` stands for a dense product (its own launch, see the op).
    ``ceil``: on a GPU, each stretch of steps that could fuse is cut where the roofline
    says it runs fastest, every fused run reaching ``ceil.min_gain`` by :func:`roofline_gain`
    (:func:`_cheapest_cut`).
    ``None``: every stretch fuses whole, as under the interpreter, which exists to test the kernels.
    """
    return list(_segments(tuple(steps), batch_last, tuple(dense or [False] * len(steps)), ceil))


@functools.lru_cache(maxsize=1024)
def _segments(
    steps: tuple[FactorStep, ...], batch_last: bool, dense: tuple[bool, ...], ceil: Ceilings | None
) -> tuple[Segment, ...]:
    moved = _on_chip(steps)  # permutations as the fused kernel would hold them (they change no width)
    out: list[Segment] = []
    k = 0
    while k < len(steps):
        stop = k + 1
        while stop < len(steps) and not dense[k] and not dense[stop] and not _overflow(moved[k : stop + 1], batch_last):
            stop += 1
        if ceil is not None and stop - k >= 2:
            out += _cheapest_cut(moved, k, stop, batch_last, ceil)
        elif stop - k >= 2:
            out.append(Segment(k, stop, True))
        elif dense[k]:
            out.append(Segment(k, stop, False, "stands for a dense product"))
        elif stop < len(steps) and not dense[stop]:
            out.append(Segment(k, stop, False, f"with step {stop + 1}, {_overflow(moved[k : stop + 1], batch_last)}"))
        else:
            out.append(Segment(k, stop, False, "no fusable neighbour"))
        k = stop
    return tuple(out)


def _cheapest_cut(
    moved: tuple[FactorStep, ...], start: int, stop: int, batch_last: bool, ceil: Ceilings
) -> list[Segment]:
    """Steps ``start:stop`` (a stretch that fits one launch) cut into single steps and fused
    runs with the least roofline time, each fused run gaining at least ``ceil.min_gain``
    (fewer launches on a tie). A sub-run can pay where the whole stretch does not: two
    memory-bound factors after two FMA-bound ones."""
    alone = _alone_times(moved[start:stop], batch_last, ceil)
    best: dict[int, tuple[float, int, list[Segment]]] = {stop: (0.0, 0, [])}
    for i in range(stop - 1, start - 1, -1):
        time, launches, cut = best[i + 1]
        options = [(alone[i - start] + time, launches + 1, [Segment(i, i + 1, False), *cut])]
        for j in range(i + 2, stop + 1):
            run = moved[i:j]
            # a sub-run may read its first input whole where the stretch did not
            fits = j - i == stop - start or not _overflow(run, batch_last)
            if not fits or roofline_gain(run, batch_last, ceil) < ceil.min_gain:
                continue
            time, launches, cut = best[j]
            options.append((_fused_time(run, batch_last, ceil) + time, launches + 1, [Segment(i, j, True), *cut]))
        best[i] = min(options, key=lambda option: option[:2])
    cut = best[start][2]
    gain = roofline_gain(moved[start:stop], batch_last, ceil)
    why = f"fusing steps {start + 1}-{stop} gains {gain:.2f}x by the roofline on {ceil.device}"
    why += f", under {ceil.min_gain}x" if gain < ceil.min_gain else ""
    for seg in (seg for seg in cut if seg.fused):
        why += f"; steps {seg.start + 1}-{seg.stop} {roofline_gain(moved[seg.start : seg.stop], batch_last, ceil):.2f}x"
    return [seg if seg.fused else Segment(seg.start, seg.stop, False, why) for seg in cut]


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


def fma_dots(dtype: str, precision: str) -> bool:
    """Whether a segment's tensor-core factors run ``tl.dot`` as FMAs: fp32 under IEEE
    (``dtype`` / ``precision`` as in the kernel key)."""
    return dtype == "float32" and precision == "ieee"


#: Fewest rows and columns of a block that a fused tensor-core factor multiplies: smaller
#: blocks are merged, several to a block padded with zeros (:func:`merged_steps`).
MERGED_BLOCK = 32


def block_merge(step: FactorStep, batch_last: bool) -> tuple[int, int]:
    """``(ga, gd)``: how many blocks of ``step`` one merged block holds, neighbours in α
    (``ga``) or in δ (``gd``), one of them 1; ``(1, 1)`` for blocks of at least
    :data:`MERGED_BLOCK` or a count that divides neither ``a`` nor ``d``.

    ``I_a ⊗ 1_{b×c} ⊗ I_d`` lies inside ``I_{a/g} ⊗ 1_{gb×gc} ⊗ I_d`` and inside
    ``I_a ⊗ 1_{gb×gc} ⊗ I_{d/g}`` (blocks ``δ = j·d/g + δ'``, ``j < g``, on the diagonal):
    the same features, ``g`` times the FLOPs, ``1/g`` the tiles. Compiled for sm_90
    (triton 3.6, batch 25,088, ``benchmarks.fused_census --grid monarch``), Monarch pairs
    with 16x16 blocks spilled 400-2000 instructions in bf16 and 32x32 ones none at n = 1024.
    """
    p = step.pattern
    side = min(p.b, p.c)
    if not is_dot(step, batch_last) or side >= MERGED_BLOCK:
        return 1, 1
    g = next_pow2(cdiv(MERGED_BLOCK, side))
    while g > 1 and p.a % g and p.d % g:
        g //= 2
    if g == 1:
        return 1, 1
    return (g, 1) if p.a % g == 0 else (1, g)


def merged_step(step: FactorStep, ga: int, gd: int) -> FactorStep:
    """``step`` on the pattern whose blocks hold ``ga`` x ``gd`` of its own (:func:`block_merge`)."""
    p = step.pattern
    g = ga * gd
    return FactorStep(KSPattern(p.a // ga, p.b * g, p.c * g, p.d // gd), step.in_perm, step.out_perm)


def merged_steps(
    steps: tuple[FactorStep, ...], batch_last: bool, fma_dots: bool
) -> tuple[tuple[FactorStep, ...], tuple[tuple[int, int], ...]]:
    """A fused segment's steps as its kernel runs them, and the :func:`block_merge` of each;
    nothing merged where its tensor-core factors run as FMA dots (``fma_dots``: fp32 under
    IEEE, where FLOPs cost) or where the merged segment would no longer fit."""
    none = ((1, 1),) * len(steps)
    merges = none if fma_dots else tuple(block_merge(step, batch_last) for step in steps)
    if merges == none:
        return steps, none
    merged = tuple(merged_step(step, *g) for step, g in zip(steps, merges, strict=True))
    return (steps, none) if _overflow(merged, batch_last) else (merged, merges)


@dataclass(frozen=True)
class FusedTile:
    """Batch rows per program and warps of a fused launch."""

    block_m: int
    num_warps: int
    num_stages: int = 3  # Triton's default
    splits: int = 1

    def meta(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m}


def fused_tile(steps: tuple[FactorStep, ...], n: int, batch_last: bool, dtype: str, precision: str) -> FusedTile:
    """Batch rows so that a program's widest vector tile stays near :data:`TILE_ELEMENTS`,
    on :func:`fused_warps`; ``dtype`` / ``precision`` as in the kernel key."""
    block_m = segment_rows(steps, batch_last)
    block_m = min(block_m, clamp_pow2(n, _fewest_rows(steps, batch_last), block_m))
    return FusedTile(block_m, fused_warps(steps, batch_last, dtype, precision))


def fused_warps(steps: tuple[FactorStep, ...], batch_last: bool, dtype: str, precision: str) -> int:
    """8 warps; 16 where tensor-core factors run as fp32 FMA dots (``float32`` under
    ``ieee``) on batch tiles of 32 rows or more.

    Compiled for sm_90 (batch 25,088): butterflies of width 64-1024, fp32 and bf16, both
    layouts, no spill on 8 warps, and width 256 on 4 warps spilled 114-243 instructions
    (triton 3.9). FMA dots hold their operands in registers: on 8 warps the ViT-S/16 MLP
    segments in fp32 (32 rows) spilled 727-1064 instructions, on 16 warps 0-248 (triton
    3.6). The 16-row Monarch n = 1024 segment spills nothing on 8 warps, and on 16 its
    values tiles are one 4-byte load a thread (8/78 loads wide).
    """
    dots = fma_dots(dtype, precision) and _fewest_rows(steps, batch_last) == MIN_ROWS
    if dots and segment_rows(steps, batch_last) >= 2 * MIN_ROWS:
        return FMA_DOT_WARPS
    return FUSED_WARPS


def _fewest_rows(steps: tuple[FactorStep, ...], batch_last: bool) -> int:
    """:data:`MIN_ROWS` for a segment with tensor-core factors (``tl.dot``), else 1."""
    return MIN_ROWS if any(is_dot(s, batch_last) for s in steps) else 1


def segment_rows(steps: tuple[FactorStep, ...], batch_last: bool) -> int:
    """Batch rows of a segment's program at a large batch (fewer where the batch is smaller)."""
    width = max(on_chip_widths(steps, batch_last), default=1)
    return clamp_pow2(TILE_ELEMENTS // width, _fewest_rows(steps, batch_last), 64)


def first_rows_from_memory(steps: tuple[FactorStep, ...], batch_last: bool, itemsize: int, warps: int) -> int:
    """:func:`segment_rows` if the first factor reads its γ tiles from memory, else 0."""
    return 0 if reads_input_whole(steps, batch_last, itemsize, warps) else segment_rows(steps, batch_last)


@dataclass(frozen=True)
class BackwardPlan:
    """The backward of a plan as chains of steps that fuse like the forward's.

    All three use the plan with every permutation between factors moved onto the next
    factor's loads (:func:`on_chip_steps`: the same product), so that every intermediate
    is a step's raw output, which a fused segment can store (``taps``) as it goes:

    * ``recompute``: steps ``0 .. L-2``; their outputs are the inputs of steps ``1 .. L-1``,
      recomputed in the backward instead of saved by the forward (no activation memory
      per chain beyond its input);
    * ``transposed``: ``dx``'s chain, the transposed steps from ``L-1`` down (to ``0`` when
      ``dx`` is needed, else ``1``); the raw output of the one for step ``k`` is the
      gradient at step ``k``'s loads;
    * ``grads[k]``: the step whose weight-gradient kernel reads that gradient: step ``k``
      with the next step's load permutation as its store.

    ``transposed_steps``: the plan's index of each step of ``transposed`` (whose values it
    reads, transposed).
    """

    recompute: tuple[FactorStep, ...]
    transposed: tuple[FactorStep, ...]
    grads: tuple[FactorStep, ...]
    transposed_steps: tuple[int, ...]


def backward_plan(plan: list[FactorStep] | tuple[FactorStep, ...], need_x: bool) -> BackwardPlan:
    moved = on_chip_steps(plan)
    last = len(moved) - 1
    order = tuple(range(last, -1 if need_x else 0, -1))
    transposed = list(on_chip_steps([moved[k].transpose() for k in order]))
    if transposed and not need_x:  # the gradient at step 1's loads, not at step 0's output
        transposed[-1] = FactorStep(transposed[-1].pattern, transposed[-1].in_perm, None)
    grads = tuple(
        moved[k] if k == last else FactorStep(moved[k].pattern, moved[k].in_perm, moved[k + 1].in_perm)
        for k in range(len(moved))
    )
    return BackwardPlan(moved[:-1], tuple(transposed), grads, order)
