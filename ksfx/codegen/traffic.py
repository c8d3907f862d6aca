"""Analytic global-memory traffic of a forward launch, next to the lower bound.

Two levels, because the re-reads of a tiling are served by L2, not device memory:

* **from L2** (:attr:`Traffic.total`): for every program of the grid, the distinct
  elements it loads or stores (a program that reads the same address twice is assumed
  to hit in L1), summed over programs, so re-reads by *different* programs count again.
  It sees what the tiling costs: ``x`` re-read once per β tile, the values re-read once
  per batch tile, index tables read per program, ``y`` written once, and the copy of the
  values into the order the kernel loads (:func:`~ksfx.codegen.tiling.values_order`).
* **from device memory** (:attr:`Traffic.dram`): each operand's distinct bytes once.
  That holds where the re-read data stays in L2 between its readers: the values, read
  by every batch tile, while they fit :data:`L2_RESIDENT_BYTES` (else they count per
  batch tile, as from L2); ``x``, whose re-readers (the β tiles and groups of one batch
  tile) are consecutive programs of the grid.

The lower bound is ``|X| + |W| + |Y|`` (:meth:`KSPattern.min_bytes`).

With ``sector=32`` the count is in 32-byte sectors along the contiguous axis, which is
where the layout matters: batch-first reads of ``x'[:, col(α, γ, δ)]`` with ``d > 1``
are strided and waste most of each sector; batch-last reads run along the batch.

Feature sets are evaluated from the same index maps the kernels print
(:mod:`ksfx.codegen.index_maps`), permutations included.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from ksfx.codegen import index_maps as im
from ksfx.codegen.fusion import FUSED_WARPS, dot_tiles, first_rows_from_memory
from ksfx.codegen.tiling import (
    TileConfig,
    cdiv,
    delta_tile,
    fma_beta_inner,
    kernel_mode,
    next_pow2,
    uses_tensor_cores,
    values_copied,
    values_laid_out_size,
    window_alphas,
)
from ksfx.pattern import ALPHA, BETA, DELTA, GAMMA, ROW, FactorStep, IndexPerm, evaluate

TABLE_ITEMSIZE = 4  # int32 index tables
#: Values that stay in L2 between the batch tiles that re-read them: half the 50 MB L2 of an
#: H100 SXM (NVIDIA, "NVIDIA Hopper Architecture In-Depth"), leaving the other half to the
#: streamed ``x`` and ``y`` tiles. An assumption until a GPU run measures where reuse ends.
L2_RESIDENT_BYTES = 25 * 2**20


@dataclass(frozen=True)
class Traffic:
    """Bytes moved by one forward launch: per operand from L2, and in all from device memory."""

    x: int
    values: int
    y: int
    tables: int
    lower_bound: int
    dram: int  # from device memory, in all (see module doc)
    relayout: int = 0  # values copied into the order the kernel loads (|W| read, the laid-out copy written)

    @property
    def total(self) -> int:
        """Bytes the programs fetch from L2 and store, re-reads included."""
        return self.x + self.values + self.y + self.tables + self.relayout

    @property
    def ratio(self) -> float:
        """``total / lower_bound`` (1.0 is optimal)."""
        return self.total / self.lower_bound

    @property
    def dram_ratio(self) -> float:
        """``dram / lower_bound``."""
        return self.dram / self.lower_bound


def _features(expr: im.FeatureExpr, step: FactorStep, env: dict) -> torch.Tensor:
    """Evaluate a feature expression (table lookups through the permutation's table)."""
    if isinstance(expr, im.TableLookup):
        perm = step.in_perm if expr.pointer == "in_table_ptr" else im.store_perm(step)
        return perm.indices()[evaluate(expr.index, env)]
    return evaluate(expr, env)


def _window_features(expr, position, step: FactorStep, a: int, alphas: int, run: int):
    """Features (and validity) each ``window`` program moves: ``alphas`` blocks' runs of ``run``."""
    windows = cdiv(a, alphas)
    positions = torch.arange(windows)[:, None] * (alphas * run) + torch.arange(alphas * run)[None, :]
    valid = positions < a * run
    return _features(expr, step, {position: torch.where(valid, positions, 0)}), valid


def _distinct(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Number of distinct valid entries in each row of ``keys``."""
    keys = torch.where(valid, keys, keys[:, :1])
    ordered = keys.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)


def _units(features: torch.Tensor, valid: torch.Tensor, itemsize: int, sector: int, batch_last: bool) -> torch.Tensor:
    """Per program: distinct features (batch-last or element count) or sectors (batch-first)."""
    if sector and not batch_last:
        return _distinct((features * itemsize) // sector, valid)
    return _distinct(features, valid)


def _all_units(features: int, itemsize: int, sector: int, batch_last: bool) -> int:
    """Units (features or sectors) of a whole feature vector, each feature once."""
    every = torch.arange(features)[None, :]
    return int(_units(every, torch.ones_like(every, dtype=torch.bool), itemsize, sector, batch_last).sum())


def _resident_values(nnz: int, itemsize: int, re_read: int) -> int:
    """Device-memory bytes of values re-read by every batch tile (``re_read`` bytes from L2)."""
    return nnz * itemsize if nnz * itemsize <= L2_RESIDENT_BYTES else re_read


def _batch_bytes(n: int, block_m: int, itemsize: int, sector: int, batch_last: bool) -> int:
    """Bytes one feature-unit costs over all batch tiles."""
    if not sector:
        return n * itemsize
    if not batch_last:
        return n * sector  # one sector per row per unit
    full, rest = divmod(n, block_m)
    per_tile = cdiv(block_m * itemsize, sector) * sector
    return full * per_tile + (cdiv(rest * itemsize, sector) * sector if rest else 0)


def bytes_moved(
    step: FactorStep, n: int, batch_last: bool, cfg: TileConfig, itemsize: int, sector: int = 0, mode: str | None = None
) -> Traffic:
    """Global bytes the forward kernel moves with tile config ``cfg`` (see module doc).

    ``mode`` defaults to the kernel the step gets (:func:`~ksfx.codegen.tiling.kernel_mode`).
    """
    p = step.pattern
    mode = mode or kernel_mode(p, batch_last)
    tiles_m = cdiv(n, cfg.block_m)
    if mode in ("dot", "dot3"):
        # A program owns (α, a tile of `width` δ), a β tile and a batch tile; dot: width 1.
        width = delta_tile(p) if mode == "dot3" else 1
        tiles_d, tiles_b = cdiv(p.d, width), cdiv(p.b, cfg.block_n)
        groups = p.a * tiles_d
        alpha = (torch.arange(groups) // tiles_d)[:, None, None]
        delta = (torch.arange(groups) % tiles_d)[:, None, None] * width + torch.arange(width)
        d_valid = delta < p.d
        delta = torch.where(d_valid, delta, 0)
        gamma = torch.arange(p.c)[None, :, None]
        x_feat = _features(im.x_feature(step), step, {ALPHA: alpha, GAMMA: gamma, DELTA: delta})
        x_feat = x_feat.expand(groups, p.c, width).reshape(groups, -1)
        x_valid = d_valid.expand(groups, p.c, width).reshape(groups, -1)
        x_units = _units(x_feat, x_valid, itemsize, sector, batch_last).repeat_interleave(tiles_b)
        beta = torch.arange(tiles_b * cfg.block_n)[None, :, None]
        y_feat = _features(im.y_feature(step), step, {ALPHA: alpha, BETA: beta % p.b, DELTA: delta})
        y_valid = (beta < p.b) & d_valid

        def per_program(t: torch.Tensor) -> torch.Tensor:  # [group, β, δ] -> [program, β tile x δ]
            t = t.expand(groups, tiles_b * cfg.block_n, width)
            return t.reshape(groups, tiles_b, cfg.block_n, width).reshape(groups * tiles_b, -1)

        y_feat, y_valid = per_program(y_feat), per_program(y_valid)
        # the values as laid out, their padding read too: rows padded to 16 (dot), δ to the tile (gathered)
        per_program_values = p.c * y_valid.sum(dim=1) * values_laid_out_size(p, batch_last) // p.nnz
        x_lookups = p.c * int(d_valid.sum()) * tiles_b
    elif mode == "window":
        # A program owns whole blocks: every input and output feature once per batch tile.
        alphas = window_alphas(p, cfg)
        x_expr = im.through(step.in_perm, im.X_INDEX, "in_table_ptr")
        x_feat, x_valid = _window_features(x_expr, im.X_INDEX, step, p.a, alphas, p.c * p.d)
        x_units = _units(x_feat, x_valid, itemsize, sector, batch_last)
        y_feat, y_valid = _window_features(im.y_feature(step, ROW), ROW, step, p.a, alphas, p.b * p.d)
        per_program_values = p.c * y_valid.sum(dim=1)
        x_lookups = p.in_features
    else:
        tiles_r = cdiv(p.out_features, cfg.block_n)
        rows = torch.arange(tiles_r * cfg.block_n)
        valid = rows < p.out_features
        safe = torch.where(valid, rows, 0)
        # A digit of radix 1 evaluates to a 0-dim constant: broadcast it over the rows.
        beta_inner = fma_beta_inner(p, batch_last)
        alpha, beta, delta = (evaluate(e, {ROW: safe}).expand_as(safe) for e in im.row_digits(step, beta_inner))
        gamma = torch.arange(p.c)[:, None]
        env = {ALPHA: alpha[None, :], BETA: beta[None, :], GAMMA: gamma, DELTA: delta[None, :]}
        x_feat = _features(im.x_feature(step), step, env).expand(p.c, -1)
        x_feat = x_feat.reshape(p.c, tiles_r, cfg.block_n).permute(1, 0, 2).reshape(tiles_r, -1)
        x_valid = valid.reshape(tiles_r, 1, cfg.block_n).expand(-1, p.c, -1).reshape(tiles_r, -1)
        x_units = _units(x_feat, x_valid, itemsize, sector, batch_last)
        # the output row from its digits: the kernel's row itself unless β is its fastest digit
        y_feat = _features(im.y_feature(step), step, {ALPHA: alpha, BETA: beta, DELTA: delta})
        y_feat = y_feat.reshape(tiles_r, cfg.block_n)
        y_valid = valid.reshape(tiles_r, cfg.block_n)
        # a row's values as laid out: batch-last rows padded to whole groups of γ
        per_program_values = values_laid_out_size(p, batch_last) // p.out_features * y_valid.sum(dim=1)
        x_lookups = p.c * int(valid.sum())
    y_units = _units(y_feat, y_valid, itemsize, sector, batch_last)
    batch = _batch_bytes(n, cfg.block_m, itemsize, sector, batch_last)
    tables = table_once = 0
    if step.in_perm is not None and not isinstance(im.x_feature(step), sympy.Expr):
        tables += tiles_m * x_lookups * TABLE_ITEMSIZE
        table_once += p.in_features * TABLE_ITEMSIZE
    if step.out_perm is not None and not isinstance(im.y_feature(step), sympy.Expr):
        tables += tiles_m * int(y_valid.sum()) * TABLE_ITEMSIZE
        table_once += p.out_features * TABLE_ITEMSIZE
    values = tiles_m * int(per_program_values.sum()) * itemsize
    laid_out = values_laid_out_size(p, batch_last)
    relayout = (p.nnz + laid_out) * itemsize if values_copied(p, batch_last) else 0
    x_once = _all_units(p.in_features, itemsize, sector, batch_last) * batch
    y_once = _all_units(p.out_features, itemsize, sector, batch_last) * batch
    return Traffic(
        x=int(x_units.sum()) * batch,
        values=values,
        y=int(y_units.sum()) * batch,
        tables=tables,
        lower_bound=p.min_bytes(n, itemsize),
        relayout=relayout,
        dram=x_once + _resident_values(laid_out, itemsize, values) + y_once + table_once + relayout,
    )


def segment_min_bytes(steps, n: int, itemsize: int) -> int:
    """``|X| + |W| + |Y|`` of a run of steps: its input, every value, its output."""
    first, last = steps[0].pattern, steps[-1].pattern
    return (n * (first.in_features + last.out_features) + sum(s.pattern.nnz for s in steps)) * itemsize


def segment_bytes(steps: tuple[FactorStep, ...], n: int, batch_last: bool, block_m: int, itemsize: int,
                  sector: int = 0, warps: int = FUSED_WARPS, fma_dots: bool = False) -> Traffic:  # fmt: skip
    """Global bytes of a fused segment's launch (:mod:`~ksfx.codegen.chain_source`).

    One program per batch tile reads each input feature and writes each output feature
    once, and reads every value of the segment once: from L2 the values count once per
    batch tile, from device memory once (while they fit in L2); the intermediates not at
    all. Index tables are read per gathered element.
    """
    first, last = steps[0].pattern, steps[-1].pattern
    tiles_m = cdiv(n, block_m)
    batch = _batch_bytes(n, block_m, itemsize, sector, batch_last)
    lookups = table_once = 0
    for k, step in enumerate(steps):
        if isinstance(step.in_perm, IndexPerm):
            p = step.pattern
            table_once += p.in_features * TABLE_ITEMSIZE
            if not uses_tensor_cores(p, batch_last):
                lookups += p.c * next_pow2(p.out_features)
            else:
                rows = first_rows_from_memory(steps, batch_last, itemsize, warps) if k == 0 else 0
                tiles = dot_tiles(p, itemsize, rows, warps, fma_dots)
                lookups += tiles.tiles * cdiv(p.c, tiles.block_k) * tiles.block_k
    if isinstance(steps[-1].out_perm, IndexPerm):
        lookups += last.out_features
        table_once += last.out_features * TABLE_ITEMSIZE
    nnz = sum(s.pattern.nnz for s in steps)
    x = _all_units(first.in_features, itemsize, sector, batch_last) * batch
    y = _all_units(last.out_features, itemsize, sector, batch_last) * batch
    values = tiles_m * nnz * itemsize
    return Traffic(
        x=x,
        values=values,
        y=y,
        tables=tiles_m * lookups * TABLE_ITEMSIZE,
        lower_bound=segment_min_bytes(steps, n, itemsize),
        dram=x + _resident_values(nnz, itemsize, values) + y + table_once,
    )
