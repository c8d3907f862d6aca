"""Tile configurations and the no-tuning heuristic (the tuning space is in :mod:`.tuning`).

Meaning of the block sizes per kernel (see :mod:`ksfx.codegen.source`):

========== =========== ======================= ==================
kernel     ``block_m`` ``block_n``             ``block_k``
========== =========== ======================= ==================
fwd dot    batch       β (output block rows)   γ (reduction)
fwd fma    batch       flat output rows        unused (1)
grad dot   batch step  β                       γ
grad fma   batch step  flat values             unused (1)
========== =========== ======================= ==================

``splits`` (weight gradient only) cuts the batch into chunks reduced separately, so a
large batch over few values still fills the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ksfx.pattern import KSPattern

#: ``tl.dot`` needs every tile dimension >= 16.
MIN_DOT = 16


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


def kernel_mode(pattern: KSPattern) -> str:
    """``dot`` (tensor cores) when a ``b×c`` block fills a 16×16 tile, else ``fma``."""
    return "dot" if pattern.b >= MIN_DOT and pattern.c >= MIN_DOT else "fma"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward_programs(pattern: KSPattern, n: int, cfg: TileConfig, mode: str) -> int:
    """Grid size of the forward kernel."""
    if mode == "dot":
        return cdiv(n, cfg.block_m) * pattern.groups * cdiv(pattern.b, cfg.block_n)
    return cdiv(n, cfg.block_m) * cdiv(pattern.out_features, cfg.block_n)


def grad_programs_per_split(pattern: KSPattern, cfg: TileConfig, mode: str) -> int:
    if mode == "dot":
        return pattern.groups * cdiv(pattern.b, cfg.block_n) * cdiv(pattern.c, cfg.block_k)
    return cdiv(pattern.nnz, cfg.block_n)


def forward_heuristic(pattern: KSPattern, n: int, itemsize: int, batch_last: bool, num_sms: int) -> TileConfig:
    """A good forward config without tuning, from the block shape, batch and dtype.

    dot: the β tile covers the whole block when it can (x is then read once per group),
    the γ tile is as deep as shared memory allows, and the batch tile shrinks until the
    grid gives every SM a few programs. fma: tiles of flat output rows wide along the
    contiguous feature axis (batch-first) or deep along the batch (batch-last).
    """
    mode = kernel_mode(pattern)
    if mode == "dot":
        block_n = clamp_pow2(pattern.b, MIN_DOT, 128)
        block_k = clamp_pow2(pattern.c, MIN_DOT, 64 if itemsize <= 2 else 32)
        block_m = 128 if block_n <= 64 else 64
        block_m = min(block_m, clamp_pow2(n, MIN_DOT, 128))
        while block_m > 32 and forward_programs(pattern, n, TileConfig(block_m, block_n, block_k), mode) < 2 * num_sms:
            block_m //= 2
        num_warps = 8 if block_m * block_n >= 128 * 128 else 4
        return TileConfig(block_m, block_n, block_k, num_warps=num_warps, num_stages=3)
    rows = pattern.out_features
    if batch_last:
        block_m, block_n = 64, clamp_pow2(rows, 1, 32)
    else:
        block_m, block_n = 32, clamp_pow2(rows, 1, 128)
    block_m = min(block_m, clamp_pow2(n, 1, block_m))
    return TileConfig(block_m, block_n, 1, num_warps=4, num_stages=1)


def grad_heuristic(pattern: KSPattern, n: int, itemsize: int, batch_last: bool, num_sms: int) -> TileConfig:
    """Weight-gradient config: whole blocks per program and enough batch splits to fill the GPU."""
    mode = kernel_mode(pattern)
    if mode == "dot":
        cfg = TileConfig(
            block_m=32 if itemsize > 2 else 64,
            block_n=clamp_pow2(pattern.b, MIN_DOT, 64),
            block_k=clamp_pow2(pattern.c, MIN_DOT, 64),
            num_warps=4,
            num_stages=3,
        )
    else:
        cfg = TileConfig(block_m=32 if not batch_last else 64, block_n=clamp_pow2(pattern.nnz, 1, 128), num_warps=4)
    per_split = grad_programs_per_split(pattern, cfg, mode)
    # Each split should still loop over several batch tiles, or partials dominate.
    splits = max(1, min(cdiv(4 * num_sms, per_split), cdiv(n, 4 * cfg.block_m)))
    return TileConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, splits)
