"""Tile configurations and the no-tuning heuristic (the tuning space is in :mod:`.tuning`).

Meaning of the block sizes per kernel (see :mod:`ksfx.codegen.source`):

=========== =========== ======================= ====================
kernel      ``block_m`` ``block_n``             ``block_k``
=========== =========== ======================= ====================
fwd dot     batch       β (output block rows)   γ (reduction)
fwd fma     batch       flat output rows        unused (1)
fwd window  batch       output run (rows)       input run (features)
grad dot    batch step  β                       γ
grad fma    batch step  flat values             unused (1)
grad window batch step  output run (rows)       input run (features)
=========== =========== ======================= ====================

``splits`` (weight gradient only) cuts the batch into chunks reduced separately, so a
large batch over few values still fills the GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ksfx.pattern import KSPattern

#: ``tl.dot`` needs every tile dimension >= 16.
MIN_DOT = 16
#: Accumulator rows of one wgmma (a warp group); a shorter tile compiles to mma.sync.
WGMMA_ROWS = 64


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two, got {value}")
        if self.splits < 1:
            raise ValueError(f"TileConfig.splits must be >= 1, got {self.splits}")

    def meta(self) -> dict[str, int]:
        """The constexpr block sizes as kernel keyword arguments."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


def next_pow2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


def clamp_pow2(value: int, low: int, high: int) -> int:
    return max(low, min(high, next_pow2(value)))


#: Most δ one program of the ``dot3`` kernel covers: 8 contiguous values are a 16-byte
#: (16-bit) or 32-byte (fp32) run, and a wider δ tile would shrink the batch and β tiles.
MAX_DELTA_TILE = 8
#: Accumulator elements per program of the ``dot3`` kernel (64 fp32 registers a thread at 8 warps).
DOT3_ACC = 128 * 128


def kernel_mode(pattern: KSPattern, batch_last: bool = False) -> str:
    """Which forward/grad kernel a pattern gets.

    ``dot`` (tensor cores, one δ per program) when a ``b×c`` block fills a 16×16 tile;
    ``dot3`` for such blocks with ``d > 1`` batch-first, where one δ per program would
    gather ``x`` and ``y`` with stride ``d`` along the contiguous axis: a program owns a δ
    tile and moves contiguous ``(γ, δ)`` runs instead; ``fma`` for smaller blocks.
    """
    if pattern.b < MIN_DOT or pattern.c < MIN_DOT:
        return "window" if is_windowed(pattern, batch_last) else "fma"
    return "dot3" if pattern.d > 1 and not batch_last else "dot"


def uses_tensor_cores(pattern: KSPattern, batch_last: bool = False) -> bool:
    """Whether the pattern's kernel multiplies with ``tl.dot`` (``dot``, ``dot3``), not FMA loops."""
    return kernel_mode(pattern, batch_last) in ("dot", "dot3")


#: Widest input or output run (elements) of one ``window`` program.
WINDOW_WIDTH = 128
#: Largest ``δ`` whose batch-first ``fma`` x loads the ``window`` kernel replaces.
WINDOW_MAX_D = 2


def is_windowed(pattern: KSPattern, batch_last: bool) -> bool:
    """Small blocks batch-first with ``d <= 2``: the ``fma`` kernel reads, per γ, x features
    ``α·c·d + γ·d + δ`` over its rows, runs of ``d`` elements (compiled for sm_90: 0/66
    global loads wide for KS(512, 2, 2, 1) bf16). ``window`` loads whole blocks' input runs
    instead, when one block's run fits :data:`WINDOW_WIDTH`. Not for ``d = 3``: runs of
    ``3·k`` elements, windows starting unaligned, and digits divided by 3 spilled 194-1922
    instructions (KS(341, 2, 2, 3), KS(85, 2, 8, 3) bf16, triton 3.6). Nor where neither a
    block's input nor its output run is a power of two: KS(512, 3, 7, 1) and KS(512, 7, 3, 1)
    bf16 spilled 1581 and 522 (``fma``: 196 and fewer).
    """
    p = pattern
    some_run_pow2 = next_pow2(p.b * p.d) == p.b * p.d or next_pow2(p.c * p.d) == p.c * p.d
    return not batch_last and p.d <= WINDOW_MAX_D and widest_run(p) <= WINDOW_WIDTH and some_run_pow2


def widest_run(pattern: KSPattern) -> int:
    """One block's longer run, input ``c·d`` or output ``b·d``, padded to a power of two."""
    return next_pow2(max(pattern.b, pattern.c) * pattern.d)


#: Most γ of a ``grad_window`` program: it keeps one accumulator tile per γ (unrolled).
WINDOW_GRAD_MAX_C = 16


def grad_mode(pattern: KSPattern, batch_last: bool = False) -> str:
    """The weight-gradient kernel: as :func:`kernel_mode`, but ``window`` only for ``c <=``
    :data:`WINDOW_GRAD_MAX_C` (else the flat-value ``fma`` kernel)."""
    mode = kernel_mode(pattern, batch_last)
    return "fma" if mode == "window" and pattern.c > WINDOW_GRAD_MAX_C else mode


def window_alphas(pattern: KSPattern, cfg: TileConfig) -> int:
    """Blocks per ``window`` program: as many as both runs hold (the kernel's ``ALPHAS``)."""
    alphas = min(cfg.block_n // (pattern.b * pattern.d), cfg.block_k // (pattern.c * pattern.d))
    if alphas < 1:
        raise ValueError(
            f"{pattern}: a window kernel's tile holds whole blocks, at least block_n = {pattern.b * pattern.d} "
            f"and block_k = {pattern.c * pattern.d}; got {cfg.block_n} and {cfg.block_k}"
        )
    return alphas


def window_tile(pattern: KSPattern, alphas: int) -> tuple[int, int]:
    """``(block_n, block_k)``: the output and input runs of ``alphas`` blocks, padded to powers of two."""
    return next_pow2(alphas * pattern.b * pattern.d), next_pow2(alphas * pattern.c * pattern.d)


def _window_fitting(pattern: KSPattern, elements: int) -> tuple[int, int]:
    """:func:`window_tile` of the most blocks (a power of two, at most the pattern's) whose
    longer run fits ``elements``; one block at least."""
    return window_tile(pattern, min(next_pow2(pattern.a), max(1, elements // widest_run(pattern))))


def window_value_strides(pattern: KSPattern) -> tuple[int, int, int, int]:
    """Strides of ``values[α, β, γ, δ]`` in the ``window`` kernel's γ-major order (:func:`values_order`)."""
    a, b, c, d = pattern.as_tuple()
    return (b * d, d, a * b * d, 1)


def values_order(pattern: KSPattern, batch_last: bool) -> tuple[int, int, int, int]:
    """The order of the values' ``(α, β, γ, δ)`` dimensions in memory (outermost first) that
    the forward kernel loads contiguously; the launcher re-lays values out to it (|W| copied).

    ``dot3`` reads ``(γ, δ)`` runs: the stored ``(a, b, c, d)`` order. ``dot`` with ``d > 1``
    reads a ``[γ, β]`` tile at one δ, strided by ``d`` in the stored order: β innermost
    instead. ``window`` reads, per γ, one value per output row ``(α, β, δ)``: γ outermost
    makes that a run. Batch-last ``fma`` reads :func:`fma_gammas` γ of each output row at
    once: γ innermost (the stored order where ``d = 1``). Other kernels take the values as
    they are stored.
    """
    mode = kernel_mode(pattern, batch_last)
    if mode == "dot" and pattern.d > 1:
        return (0, 3, 2, 1)
    if mode == "window":
        return (2, 0, 1, 3)
    if mode == "fma" and batch_last:
        return (0, 3, 1, 2) if fma_beta_inner(pattern, batch_last) else (0, 1, 3, 2)
    return (0, 1, 2, 3)


#: Row length (elements) the ``dot`` kernel's values are padded to, with zeros, by the launcher:
#: Triton hints an int argument's divisibility by 16 only, and the kernel masks a values row
#: at its padded length, so that a row of any length loads in aligned 16-element runs.
VALUE_ROW_ALIGN = 16


def padded_row(size: int) -> int:
    return cdiv(size, VALUE_ROW_ALIGN) * VALUE_ROW_ALIGN


def dot_values_rows(pattern: KSPattern) -> int:
    """The dimension of ``(α, β, γ, δ)`` whose rows the ``dot`` kernel reads padded to
    :func:`padded_row`: β with ``d > 1``, else γ (the innermost in :func:`values_order`)."""
    return 1 if pattern.d > 1 else 2


def values_rows(pattern: KSPattern, batch_last: bool) -> tuple[int, int] | None:
    """``(dimension, padded length)`` of the innermost values dimension the forward kernel
    reads padded with zeros: :func:`dot_values_rows` to :func:`padded_row` (``dot``), δ to
    :func:`delta_tile` (``dot3`` where :func:`delta_gathered`), γ to :func:`fma_values_row`
    (batch-last ``fma``); None for the others."""
    mode = kernel_mode(pattern, batch_last)
    if mode == "dot":
        dim = dot_values_rows(pattern)
        return dim, padded_row(pattern.as_tuple()[dim])
    if mode == "dot3" and delta_gathered(pattern):
        return 3, delta_tile(pattern)
    if mode == "fma" and batch_last:
        return 2, fma_values_row(pattern)
    return None


def fma_beta_inner(pattern: KSPattern, batch_last: bool) -> bool:
    """Whether a batch-last ``fma`` program's flat rows enumerate ``(α, δ, β)``, β fastest
    (its values laid out so, :func:`values_order`), rather than the output order ``(α, β, δ)``.

    A tile of rows in output order holds one β of many δ where ``d`` is large: each of the
    ``b`` programs of an ``(α, δ)`` range reads the same ``x`` features, ``b`` reads from L2
    (the traffic model gave 9.81x ``|X| + |W| + |Y|`` for KS(1, 14, 28, 1024)). β fastest, a
    tile covers every β of its δ and reads them once. Batch-last only: each row is then its
    own contiguous batch run, in ``x`` and ``y``, whatever the order of the rows.
    """
    return batch_last and kernel_mode(pattern, batch_last) == "fma" and pattern.b > 1 and pattern.d > 1


#: Most γ whose values a batch-last ``fma`` program loads per output row at once (16 bytes in fp32).
FMA_GAMMAS = 4


def fma_gammas(pattern: KSPattern) -> int:
    """γ per values load of the batch-last ``fma`` kernel: ``c`` up to :data:`FMA_GAMMAS`,
    padded to a power of two. Rows whose values are under 8 bytes (``c = 1``, or ``c = 2`` in
    16-bit) still load narrow: a thread's rows are 8 apart (``docs/kernels.md``).

    Its x tile is ``[batch, rows]`` with the batch contiguous: a thread holds one batch run
    of each of a few rows 8 apart, so values loaded one γ at a time are one 4- or 2-byte
    element a row; compiled for sm_90 (triton 3.6) all 20 batch-last ``fma`` forward kernels
    of the paper grid loaded half their global loads so.
    """
    return min(FMA_GAMMAS, next_pow2(pattern.c))


def fma_values_row(pattern: KSPattern) -> int:
    """Length of a batch-last ``fma`` values row: ``c`` padded to whole :func:`fma_gammas` groups."""
    gammas = fma_gammas(pattern)
    return cdiv(pattern.c, gammas) * gammas


def values_copied(pattern: KSPattern, batch_last: bool) -> bool:
    """Whether the launcher copies stored ``(a, b, c, d)`` values: into another
    :func:`values_order` (dimensions of size 1 move for free) or into padded rows."""
    shape = pattern.as_tuple()
    moved = [dim for dim in values_order(pattern, batch_last) if shape[dim] > 1]
    return moved != sorted(moved) or values_padded(pattern, batch_last)


def values_laid_out_size(pattern: KSPattern, batch_last: bool) -> int:
    """Elements of the values as the forward kernel reads them: ``nnz``, or more where padded."""
    rows = values_rows(pattern, batch_last)
    if rows is None:
        return pattern.nnz
    return pattern.nnz // pattern.as_tuple()[rows[0]] * rows[1]


def values_padded(pattern: KSPattern, batch_last: bool) -> bool:
    """Whether the forward kernel's values rows are padded, which copies the values."""
    rows = values_rows(pattern, batch_last)
    return rows is not None and pattern.as_tuple()[rows[0]] != rows[1]


def delta_gathered(pattern: KSPattern) -> bool:
    """Whether a ``dot3`` program owns every δ of a ``d`` that is not a power of two (at most
    :data:`MAX_DELTA_TILE` padded): it loads the flat ``(γ, δ)`` run of its γ tile whole and
    regroups it on chip into a ``[γ, δ]`` tile padded to :func:`delta_tile`.

    Tiles of fewer δ would read runs of 1 or 2 elements in every ``d``: compiled for sm_90
    (triton 3.6) the δ tiles of 4 masked to 3 (``d = 3``) and of 2 (``d = 6``) loaded no
    global load wide in 66 forward kernels of the paper grid.
    """
    d = pattern.d
    return d & (d - 1) != 0 and next_pow2(d) <= MAX_DELTA_TILE


def delta_tile(pattern: KSPattern) -> int:
    """δ per ``dot3`` program: all of them padded to a power of two where
    :func:`delta_gathered`; else the largest power of two dividing ``d`` (so tiles never
    straddle a γ run), at most :data:`MAX_DELTA_TILE`, or a masked tile for a larger odd ``d``."""
    if delta_gathered(pattern):
        return next_pow2(pattern.d)
    low = pattern.d & -pattern.d
    return min(low if low > 1 else next_pow2(pattern.d), MAX_DELTA_TILE)


def delta_tiles(pattern: KSPattern) -> int:
    return cdiv(pattern.d, delta_tile(pattern))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward_programs(pattern: KSPattern, n: int, cfg: TileConfig, mode: str) -> int:
    """Grid size of the forward kernel."""
    if mode == "dot":
        return cdiv(n, cfg.block_m) * pattern.groups * cdiv(pattern.b, cfg.block_n)
    if mode == "dot3":
        return cdiv(n, cfg.block_m) * pattern.a * delta_tiles(pattern) * cdiv(pattern.b, cfg.block_n)
    if mode == "window":
        return cdiv(n, cfg.block_m) * cdiv(pattern.a, window_alphas(pattern, cfg))
    return cdiv(n, cfg.block_m) * cdiv(pattern.out_features, cfg.block_n)


def grad_programs_per_split(pattern: KSPattern, cfg: TileConfig, mode: str) -> int:
    if mode == "dot":
        return pattern.groups * cdiv(pattern.b, cfg.block_n) * cdiv(pattern.c, cfg.block_k)
    if mode == "dot3":
        return pattern.a * delta_tiles(pattern) * cdiv(pattern.b, cfg.block_n) * cdiv(pattern.c, cfg.block_k)
    if mode == "window":
        return cdiv(pattern.a, window_alphas(pattern, cfg))
    return cdiv(pattern.nnz, cfg.block_n)


def forward_heuristic(pattern: KSPattern, n: int, itemsize: int, batch_last: bool, num_sms: int) -> TileConfig:
    """A good forward config without tuning, from the block shape, batch and dtype.

    dot: the β tile covers the whole block when it can (x is then read once per group),
    the γ tile is as deep as shared memory allows, and the batch tile shrinks until the
    grid gives every SM a few programs. fma: tiles of flat output rows wide along the
    contiguous feature axis (batch-first) or deep along the batch (batch-last).
    """
    mode = kernel_mode(pattern, batch_last)
    if mode == "dot3":
        return _dot3_heuristic(pattern, n, itemsize, num_sms)
    if mode == "dot":
        block_n = clamp_pow2(pattern.b, MIN_DOT, 128)
        block_k = clamp_pow2(pattern.c, MIN_DOT, 64 if itemsize <= 2 else 32)
        block_m = 128 if block_n <= 64 else 64
        block_m = min(block_m, clamp_pow2(n, MIN_DOT, 128))
        while (
            block_m > _min_batch_tile(itemsize)
            and forward_programs(pattern, n, TileConfig(block_m, block_n, block_k), mode) < 2 * num_sms
        ):
            block_m //= 2
        # fp32 dots on the FMA path hold their operand tiles in registers: 4 warps spill at 64 x 128.
        # So do x tiles loaded element by element (batch-first γ runs not 16-byte multiples).
        narrow = not batch_last and pattern.c * itemsize % 16 != 0
        wide_tile = 64 * 128 if itemsize > 2 or narrow else 128 * 128
        num_warps = 8 if block_m * block_n >= wide_tile else 4
        return TileConfig(block_m, block_n, block_k, num_warps=num_warps, num_stages=3)
    if mode == "window":
        return _window_heuristic(pattern, n, itemsize)
    rows = pattern.out_features
    if batch_last:
        block_m, block_n = 64, clamp_pow2(rows, 1, 32)
    else:
        block_m, block_n = 32, clamp_pow2(rows, 1, 128)
    block_m = min(block_m, clamp_pow2(n, 1, block_m))
    return TileConfig(block_m, block_n, 1, num_warps=4, num_stages=1)


#: Bytes of one γ's values each thread of a ``window`` program loads: the narrowest wide load.
WINDOW_VALUE_BYTES = 8


def _window_heuristic(pattern: KSPattern, n: int, itemsize: int) -> TileConfig:
    """window: an output run of 8 bytes of values a thread per γ (512 rows in 16-bit, 256 in
    fp32, at 4 warps; fewer warps for a shorter run), over 16 batch rows (a 64-register
    fp32 accumulator in 16-bit).

    Compiled for sm_90 (triton 3.6), KS(512, 2, 2, 1) bf16: with runs of 128 rows over 32
    batch rows each γ's values were one 2-byte load a thread (4/6 global loads wide). With
    ``c > b`` the input run is the longer and sets the blocks: sized by the output run
    (input runs of 1024), KS(128, 2, 16, 1) and KS(682, 2, 3, 1) bf16 spilled 193 and 17,630.
    """
    per_thread = WINDOW_VALUE_BYTES // itemsize
    block_n, block_k = _window_fitting(pattern, per_thread * 32 * 4)
    warps = max(1, min(4, max(block_n, block_k) // (per_thread * 32)))  # fewer for a pattern's shorter runs
    # The values run is the output run: with c > b, fewer warps over fewer batch rows keep 8 bytes
    # of it a thread and the elements a thread holds (KS(512, 2, 4, 1) bf16: 12/12 loads wide, was
    # 8/12). Not where even one warp would hold less (KS(128, 2, 16, 1): 40/40 on 4 warps, 8/24 on 1).
    by_values = min(warps, block_n // (per_thread * 32)) or warps
    return TileConfig(clamp_pow2(n, 1, 16 * by_values // warps), block_n, block_k, num_warps=by_values, num_stages=1)


#: Batch rows a ``grad_window`` program takes per step.
WINDOW_GRAD_ROWS = 8
#: fp32 accumulator values of a ``grad_window`` program (64 registers a thread at 4 warps).
WINDOW_GRAD_ACC = 8192


#: Shared memory a config may use (bytes); conservative for sm_80 and later.
SMEM_BUDGET = 160 * 1024


def _min_batch_tile(itemsize: int) -> int:
    """Smallest batch tile the grid-filling loop may cut to: 64 rows for 16-bit operands
    (a wgmma tile; fewer fall back to mma.sync), 32 otherwise."""
    return 64 if itemsize <= 2 else 32


def _dividing_pow2(size: int, cap: int) -> int:
    """A tile along ``size``: the largest power of two <= ``cap`` dividing it when that is at
    least :data:`MIN_DOT` (no mask, so loads and stores stay wide), else the smallest covering one."""
    low = min(size & -size, cap)
    return low if low >= MIN_DOT else clamp_pow2(size, MIN_DOT, cap)


def _dot3_heuristic(pattern: KSPattern, n: int, itemsize: int, num_sms: int) -> TileConfig:
    """dot3: the accumulator ``[δ tile, batch, β]`` within :data:`DOT3_ACC`, a batch tile of at
    least 64 where the block allows (values are re-read once per batch tile), and the
    deepest γ tile whose three pipeline stages fit in shared memory."""
    width = delta_tile(pattern)
    budget = DOT3_ACC if itemsize <= 2 else DOT3_ACC // 2  # fp32 dots hold their operands in registers too
    # A δ tile wider than d: 16 γ. Masked (a larger odd d), it loads element by element and its
    # pointers fill registers; gathered, a γ tile of 32 took 193 registers for 141 (KS(1, 128, 128, 3) bf16).
    masked = pattern.d % width != 0
    block_n = _dividing_pow2(pattern.b, max(MIN_DOT, budget // (64 * width)))
    block_m = min(128 if itemsize <= 2 else 64, max(MIN_DOT, budget // (width * block_n)), clamp_pow2(n, MIN_DOT, 128))
    while (
        block_m > _min_batch_tile(itemsize)
        and forward_programs(pattern, n, TileConfig(block_m, block_n), "dot3") < 2 * num_sms
    ):
        block_m //= 2
    block_k = MIN_DOT if masked else _dividing_pow2(pattern.c, 64 if itemsize <= 2 else 16)
    while block_k > MIN_DOT and 3 * width * (block_m + block_n) * block_k * itemsize > SMEM_BUDGET:
        block_k //= 2
    num_warps = 8 if width * block_m * block_n >= 64 * 128 else 4
    # fp32 gathered δ: with 3 stages ptxas kept 80 registers and spilled one in the loop (IEEE,
    # all 22 KS(1, b, c, 3) of the paper grid, triton 3.6); with 2, 118 and none.
    num_stages = 2 if itemsize > 2 and delta_gathered(pattern) else 3
    return TileConfig(block_m, block_n, block_k, num_warps=num_warps, num_stages=num_stages)


def grad_pipeline_bytes(cfg: TileConfig, width: int, itemsize: int) -> int:
    """Shared memory of a ``grad_dot`` / ``grad_dot3`` pipeline: a ``dy`` and an ``x`` tile of
    ``width`` δ per stage (exact for fp32 ``grad_dot3``, an upper bound elsewhere, sm_90, triton 3.6)."""
    return cfg.num_stages * width * cfg.block_m * (cfg.block_n + cfg.block_k) * itemsize


def _within_shared_memory(cfg: TileConfig, width: int, itemsize: int) -> TileConfig:
    """``cfg`` with fewer stages, then a shorter batch step, until its pipeline fits
    :data:`SMEM_BUDGET`: fp32 ``grad_dot3`` tiles of 8 δ took 240 KiB at 3 stages, over the
    227 KiB a block may have on sm_90 (66 kernels of the backward sample would not launch)."""
    while grad_pipeline_bytes(cfg, width, itemsize) > SMEM_BUDGET:
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_m > MIN_DOT:
            cfg = dataclasses.replace(cfg, block_m=cfg.block_m // 2)
        else:
            break
    return cfg


def grad_heuristic(pattern: KSPattern, n: int, itemsize: int, batch_last: bool, num_sms: int) -> TileConfig:
    """Weight-gradient config: whole blocks per program and enough batch splits to fill the GPU."""
    mode = grad_mode(pattern, batch_last)
    if mode == "window":
        # c accumulator tiles of BLOCK_M x (blocks x b·d) fp32 within WINDOW_GRAD_ACC values: on
        # 1 warp KS(128, 8, 8, 1) bf16 spilled 139 instructions, on 4 none (sm_90, triton 3.6)
        block_n, block_k = _window_fitting(pattern, WINDOW_GRAD_ACC // (WINDOW_GRAD_ROWS * pattern.c))
        warps = max(1, min(4, WINDOW_GRAD_ROWS * max(block_n, block_k) // 256))
        cfg = TileConfig(WINDOW_GRAD_ROWS, block_n, block_k, num_warps=warps, num_stages=2)
    elif mode == "dot3":
        width = delta_tile(pattern)
        budget = (DOT3_ACC if itemsize <= 2 else DOT3_ACC // 2) // width
        # Each δ's accumulator is [β, γ]: 64 β rows make one wgmma tile (fewer fall back to
        # mma.sync), so the γ tile gives way first; a deep δ tile takes a shorter batch step.
        # 16-bit: a masked 64-row β tile rather than a dividing one of 16 or 32 rows (at most
        # 3/4 of its rows idle, for b >= 16), as the mask leaves the (β, δ) runs wide. A weight
        # gradient is memory-bound (b·c / (b + c) FLOPs a byte, under 32 for b < 32: four
        # times that stays under an H100's ridge of about 260): the idle rows cost no time,
        # and on mma.sync with 32 rows it spilled 317 instructions (triton 3.6).
        block_n = _dividing_pow2(pattern.b, 64)
        if itemsize <= 2 and pattern.b >= WGMMA_ROWS // 4:
            block_n = max(block_n, WGMMA_ROWS)
        block_k = max(MIN_DOT, min(_dividing_pow2(pattern.c, 64), budget // block_n))
        if itemsize <= 2 and block_n < WGMMA_ROWS:
            # mma.sync holds every δ's operands in registers: KS(1, 32, 32, d >= 8) bf16 on 32-row
            # β tiles at 32 γ spilled 297-323 instructions, 97-108 in the loop (triton 3.6 and
            # 3.9); at 16, none. Kept for b < 16.
            block_k = MIN_DOT
        block_m = 32 if itemsize > 2 or pattern.d % width or width > 2 else 64
        warps = 8 if width * block_n * block_k >= 8192 else 4
        if delta_gathered(pattern) and width == MAX_DELTA_TILE:
            # dy and x regrouped on chip, 8 δ wide: KS(1, 128, 128, 7) spilled 19 (bf16) and 31
            # (fp32) instructions, 8-11 in the loop (triton 3.6). None on 16 batch rows in 16-bit,
            # or on 32-row β tiles over 8 warps in fp32 (no wgmma tile to fill; on 16 batch rows
            # KS(1, 64, 64, 6) fp32 kept 128 registers and spilled 6, on 4 warps KS(1, 64, 64, 5) 9).
            if itemsize <= 2:
                block_m = MIN_DOT
            else:
                block_n, warps = min(block_n, 32), 8
        cfg = TileConfig(block_m, block_n, block_k, num_warps=warps, num_stages=3)
    elif mode == "dot":
        block_n = clamp_pow2(pattern.b, MIN_DOT, 64)
        if itemsize <= 2 and pattern.b >= WGMMA_ROWS // 4:
            block_n = WGMMA_ROWS  # as dot3: a masked wgmma tile (KS(32, 32, 32, 1) bf16 ran on mma.sync)
        cfg = TileConfig(
            block_m=32 if itemsize > 2 else 64,
            block_n=block_n,
            block_k=clamp_pow2(pattern.c, MIN_DOT, 64),
            num_warps=4,
            num_stages=3,
        )
    else:
        cfg = TileConfig(block_m=32 if not batch_last else 64, block_n=clamp_pow2(pattern.nnz, 1, 128), num_warps=4)
    if mode in ("dot", "dot3"):
        cfg = _within_shared_memory(cfg, delta_tile(pattern) if mode == "dot3" else 1, itemsize)
    per_split = grad_programs_per_split(pattern, cfg, mode)
    # Each split should still loop over several batch tiles, or partials dominate.
    splits = max(1, min(cdiv(4 * num_sms, per_split), cdiv(n, 4 * cfg.block_m)))
    return TileConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, splits)
