"""Triton source of a fused segment: several factor steps in one launch (see :mod:`~ksfx.codegen.fusion`).

``forward_chain``: program = one batch tile, runtime strides (both layouts, strided
inputs, like the per-factor kernels). The previous factor's output ``h`` stays in
registers, and each factor reads its input ``x'[col]`` as ``h[:, position(col)]``
(``tl.gather`` along the features), ``col`` being the index map of the per-factor
kernels (permutations included) and ``position`` where the previous factor left that
feature on chip. Per factor:

* small blocks: output row ``(α, β, δ)`` is ``Σ_γ values[α, β, γ, δ] · h[col]`` for every
  row at once, accumulated in fp32; ``h`` keeps natural order;
* tensor-core blocks: one ``(group, β tile)`` tile at a time (:class:`~ksfx.codegen.fusion.DotTiles`),
  ``tl.dot`` over γ tiles, rounded to the input dtype like a per-factor launch's output.
  Inside the segment the tiles are unrolled and joined into the next ``h``; the last
  factor loops over its tiles and stores each.

A tensor-core first factor reads its γ tiles from memory (unless
:func:`~ksfx.codegen.fusion.reads_input_whole`); otherwise the input tile is loaded
whole. Widths are padded to powers of two; padded features are zero and never read.
With ``taps`` every step's output is stored as well (the backward's intermediates).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

import sympy

from ksfx.codegen import index_maps as im
from ksfx.codegen.fusion import (
    DotTiles,
    dot_tiles,
    first_rows_from_memory,
    fma_dots,
    fused_warps,
    is_dot,
    reads_input_whole,
    table_position,
    value_strides,
)
from ksfx.codegen.source import FORWARD_EPILOGUE, GROUP, HEADER, dot_code, gamma_loop
from ksfx.codegen.tiling import next_pow2
from ksfx.pattern import ROW, FactorStep, J, to_code
from ksfx.pattern.ks import mixed_radix_digits

#: The feature a factor reads, as a variable of the generated source.
COL = sympy.Symbol("col", integer=True, nonnegative=True)

CHAIN_KERNEL = '''
@triton.jit
def forward_chain(
    x_ptr, y_ptr, bias_ptr, {value_ptrs}, {table_ptrs}, out_table_ptr,{tap_ptrs}
    n, stride_xm, stride_xf, stride_ym, stride_yf,{tap_strides}
    HAS_BIAS: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """{count} factor steps, program = batch tile, the feature vector on chip between them:
{listing}
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    if INT64:
        offs_m = offs_m.to(tl.int64)
{load}{factors}'''

LOAD_WHOLE = """    feature = tl.arange(0, {width_in})
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + feature[None, :] * stride_xf
    h = tl.load(x_ptrs, mask={x_mask}, other=0.0)
"""

FMA_FACTOR = """    # step {k}: {step}
    row = tl.arange(0, {width})
    mask_r = row < {rows}
    alpha = {alpha}
    beta = {beta}
    delta = {delta}
    acc = tl.full((BLOCK_M, {width}), 0.0, tl.float32)
    for gamma in {gamma_range}:
        col = {col}
{position}        w = tl.load(v{k}_ptr + {v_offset}{w_mask}).to(tl.float32)
        acc += tl.gather(h, tl.broadcast_to(col[None, :], (BLOCK_M, {width})), 1).to(tl.float32) * w[None, :]
"""

DOT_TILE = """acc = tl.full((BLOCK_M, {block_n}), 0.0, tl.float32)
beta = {beta0} + tl.arange(0, {block_n})
mask_b = beta < {b}
beta_tile = beta[None, :]
for k0 in {k_range}:
    gamma = k0 + tl.arange(0, {block_k})
    mask_k = gamma < {c}
    gamma_tile = gamma[:, None]
{read}    w_tile = tl.load(v{k}_ptr + {v_offset}{w_mask})
    acc = {dot}
"""

READ_MEMORY = """    x_feature = {x_feature}
    if INT64:
        x_feature = x_feature.to(tl.int64)
    a_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + x_feature[None, :] * stride_xf, mask={mask}, other=0.0)
"""

READ_ON_CHIP = """    col = {col}
{position}    a_tile = tl.gather(h, tl.broadcast_to(col[None, :], (BLOCK_M, {block_k})), 1)
    a_tile = a_tile.to(v{k}_ptr.dtype.element_ty)
{zero}"""

#: A step's output stored as well (``taps``): natural feature order, the input dtype.
TAP = """    tap_feature = {feature}
    if INT64:
        tap_feature = tap_feature.to(tl.int64)
    tap_ptrs = tap{k}_ptr + offs_m[:, None] * stride_t{k}m + tap_feature[None, :] * stride_t{k}f
    tl.store(tap_ptrs, acc.to(tap{k}_ptr.dtype.element_ty), mask=mask_m[:, None] & {mask}[None, :])
"""

LAST_DOT_FACTOR = """    # step {k}: {step}, one ({block_n}-row β tile, group) tile at a time
    for tile in range({tiles}):
        group = tile // {beta_tiles}
        alpha = {alpha}
        delta = {delta}
{tile}{epilogue}"""


@dataclass(frozen=True)
class _Options:
    """What shapes the source besides the steps (see :func:`chain_forward_source`)."""

    batch_last: bool
    dtype: str
    interpret: bool
    precision: str
    taps: bool
    rows_from_memory: int = 0  # see fusion.first_rows_from_memory
    warps: int = 8  # of the launch (fusion.fused_warps)

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def fma_dots(self) -> bool:
        """Whether the tensor-core factors' ``tl.dot`` runs as FMAs (fp32 under IEEE)."""
        return fma_dots(self.dtype, self.precision)


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _position(previous, feature: str) -> str:
    """Source line mapping feature ``col`` to its column of ``h`` (empty in natural order)."""
    if previous is None:
        return ""
    return f"{feature}col = {to_code(previous.subs(J, COL))}\n"


def _joined_position(step: FactorStep, tiles: DotTiles) -> sympy.Expr:
    """Column of ``h`` holding output feature ``J`` of a tensor-core factor (see :class:`DotTiles`)."""
    p = step.pattern
    alpha, beta, delta = mixed_radix_digits(J, (p.a, p.b, p.d))
    tile = (alpha * p.d + delta) * tiles.beta_tiles + sympy.floor(beta / tiles.block_n)
    return sympy.Mod(beta, tiles.block_n) * tiles.padded + tile


def _fma(k: int, step: FactorStep, position, opts: _Options) -> str:
    p = step.pattern
    width = next_pow2(p.out_features)
    full = width == p.out_features
    alpha, beta, delta = im.row_digits(step)
    col = im.code(im.through(step.in_perm, p.col_expr, f"in_table{k}_ptr"), mask=None if full else "mask_r")
    return FMA_FACTOR.format(
        k=k,
        step=step,
        width=width,
        rows=p.out_features,
        alpha=im.code(alpha),
        beta=im.code(beta),
        delta=im.code(delta),
        gamma_range=gamma_loop(p.c),
        # Padded rows read feature 0: any in-range index, their weight is masked to zero.
        col=col if full else f"tl.where(mask_r, {col}, 0)",
        position=_position(position, "        "),
        v_offset=im.code(im.value_offset_of_row(step, value_strides(step, opts.batch_last))),
        w_mask="" if full else ", mask=mask_r, other=0.0",
    )


def _dot_tile(k: int, step: FactorStep, tiles: DotTiles, beta0: str, position, on_chip: bool, opts: _Options):
    """Source of one output tile: ``acc`` (fp32), ``beta`` and ``mask_b`` bound, ``alpha``/``delta`` given."""
    p = step.pattern
    bk = tiles.block_k
    whole_k = p.c % bk == 0
    feature = im.through(step.in_perm, table_position(step, opts.batch_last), f"in_table{k}_ptr")
    if on_chip:
        col = im.code(feature, mask=None if whole_k else "mask_k")
        read = READ_ON_CHIP.format(
            col=col if whole_k else f"tl.where(mask_k, {col}, 0)",
            position=_position(position, "    "),
            block_k=bk,
            k=k,
            # h may hold non-finite values: γ beyond c must add zero, not 0 * h
            zero="" if whole_k else "    a_tile = tl.where(mask_k[None, :], a_tile, 0.0)\n",
        )
    else:
        read = READ_MEMORY.format(
            x_feature=im.code(feature, mask="mask_k"),
            mask="mask_m[:, None]" if whole_k else "mask_m[:, None] & mask_k[None, :]",
        )
    masks = ([] if whole_k else ["mask_k[:, None]"]) + ([] if p.b % tiles.block_n == 0 else ["mask_b[None, :]"])
    steps = p.c // bk if whole_k else -(-p.c // bk)
    return DOT_TILE.format(
        block_n=tiles.block_n,
        beta0=beta0,
        b=p.b,
        c=p.c,
        block_k=bk,
        k_range=f"tl.static_range(0, {p.c}, {bk})" if steps <= 4 else f"range(0, {p.c}, {bk})",
        read=read,
        k=k,
        v_offset=im.code(im.value_offset(step, strides=value_strides(step, opts.batch_last), tile=True)),
        w_mask=f", mask={' & '.join(masks)}, other=0.0" if masks else "",
        dot=dot_code("a_tile", "w_tile", "acc", opts.dtype, opts.interpret, opts.precision),
    )


def _join(names: list[str], lines: list[str], block_n: int, prefix: str) -> str:
    """Source joining equal tiles into one vector, tile ``t`` column ``j`` at ``j * len(names) + t``."""
    if len(names) == 1:
        return names[0]
    even = _join(names[0::2], lines, block_n, prefix + "e")
    odd = _join(names[1::2], lines, block_n, prefix + "o")
    lines.append(f"    {prefix} = tl.reshape(tl.join({even}, {odd}), (BLOCK_M, {len(names) * block_n}))\n")
    return prefix


def _inner_dot(k: int, step: FactorStep, position, on_chip: bool, opts: _Options) -> tuple[str, sympy.Expr]:
    """A tensor-core factor inside the segment: its tiles unrolled and joined into ``h``."""
    p = step.pattern
    tiles = dot_tiles(p, opts.itemsize, 0 if on_chip else opts.rows_from_memory, opts.warps, opts.fma_dots)
    lines = [f"    # step {k}: {step}, {tiles.tiles} tiles of {tiles.block_n} rows joined on chip\n"]
    names = []
    for t in range(tiles.tiles):
        group, beta_tile = divmod(t, tiles.beta_tiles)
        alpha, delta = divmod(group, p.d)
        body = _dot_tile(k, step, tiles, str(beta_tile * tiles.block_n), position, on_chip, opts)
        lines.append(f"    alpha = {alpha}\n    delta = {delta}\n")
        lines.append(textwrap.indent(body, "    "))
        if opts.taps:
            lines.append(TAP.format(feature=to_code(p.row_expr), k=k, mask="mask_b"))
        lines.append(f"    h{k}_{t} = acc.to(x_ptr.dtype.element_ty)\n")
        names.append(f"h{k}_{t}")
    for t in range(tiles.tiles, tiles.padded):
        lines.append(f"    h{k}_{t} = tl.full((BLOCK_M, {tiles.block_n}), 0.0, x_ptr.dtype.element_ty)\n")
        names.append(f"h{k}_{t}")
    lines.append(f"    h = {_join(names, lines, tiles.block_n, f'j{k}_')}\n")
    return "".join(lines), _joined_position(step, tiles)


def _last_dot(k: int, step: FactorStep, position, on_chip: bool, opts: _Options) -> str:
    p = step.pattern
    tiles = dot_tiles(p, opts.itemsize, 0 if on_chip else opts.rows_from_memory, opts.warps, opts.fma_dots)
    alpha, delta = im.group_digits(step, GROUP)
    body = _dot_tile(k, step, tiles, f"(tile % {tiles.beta_tiles}) * {tiles.block_n}", position, on_chip, opts)
    epilogue = FORWARD_EPILOGUE.format(
        y_feature=im.code(im.y_feature(step), mask="mask_b"), mask="mask_b", full=str(p.b % tiles.block_n == 0)
    )
    return LAST_DOT_FACTOR.format(
        k=k,
        step=step,
        block_n=tiles.block_n,
        tiles=tiles.tiles,
        beta_tiles=tiles.beta_tiles,
        alpha=im.code(alpha),
        delta=im.code(delta),
        tile=textwrap.indent(body, "        "),
        epilogue=textwrap.indent(epilogue, "    "),
    )


def _check(steps: tuple[FactorStep, ...]) -> None:
    if len(steps) < 2 or any(s.out_perm is not None for s in steps[:-1]):
        raise ValueError("a fused segment takes two or more steps, with permutations moved to the loads")
    for before, after in zip(steps, steps[1:], strict=False):
        if before.pattern.out_features != after.pattern.in_features:
            raise ValueError(f"{before} gives {before.pattern.out_features} features, {after} takes another count")


def chain_forward_source(
    steps: tuple[FactorStep, ...],
    batch_last: bool = False,
    dtype: str = "float32",
    interpret: bool = False,
    precision: str = "ieee",
    taps: bool = False,
) -> str:
    """Module source of ``forward_chain`` for ``steps`` (application order, from
    :func:`~ksfx.codegen.fusion.on_chip_steps`: only the last step has an ``out_perm``).

    ``dtype`` / ``interpret`` / ``precision`` shape the tensor-core factors' ``tl.dot``
    (:func:`~ksfx.codegen.source.dot_code`); small-block factors compute in fp32.
    ``taps``: every step but the last also stores its output (``tap{k}_ptr``, the backward's
    recomputed intermediates), in natural feature order, before any permutation.
    """
    _check(steps)
    itemsize = _itemsize(dtype)
    warps = fused_warps(steps, batch_last, dtype, precision)
    rows_from_memory = first_rows_from_memory(steps, batch_last, itemsize, warps)
    opts = _Options(batch_last, dtype, interpret, precision, taps, rows_from_memory, warps)
    first = steps[0].pattern
    load = ""
    if reads_input_whole(steps, batch_last, itemsize, warps):
        width_in = next_pow2(first.in_features)
        x_mask = "mask_m[:, None]"
        if width_in != first.in_features:
            x_mask += f" & (feature < {first.in_features})[None, :]"
        load = LOAD_WHOLE.format(width_in=width_in, x_mask=x_mask)
    factors, position, on_chip = [], None, bool(load)
    for k, step in enumerate(steps):
        last = k == len(steps) - 1
        if not is_dot(step, batch_last):
            code = _fma(k, step, position, opts)
            if not last and opts.taps:
                code += TAP.format(feature="row", k=k, mask="mask_r")
            code += "    h = acc\n" if not last else _fma_epilogue(step)
            position = None
        elif last:
            code = _last_dot(k, step, position, on_chip, opts)
        else:
            code, position = _inner_dot(k, step, position, on_chip, opts)
        factors.append(_scoped(code, k))
        on_chip = True
    body = CHAIN_KERNEL.format(
        value_ptrs=", ".join(f"v{k}_ptr" for k in range(len(steps))),
        table_ptrs=", ".join(f"in_table{k}_ptr" for k in range(len(steps))),
        tap_ptrs="".join(f" tap{k}_ptr," for k in range(len(steps) - 1)) if taps else "",
        tap_strides="".join(f" stride_t{k}m, stride_t{k}f," for k in range(len(steps) - 1)) if taps else "",
        count=len(steps),
        listing="\n".join(f"    {k}: {s}" for k, s in enumerate(steps)),
        load=load,
        factors="".join(factors),
    )
    return HEADER.format(step=f"a fused segment of {len(steps)} steps") + body


#: Names a factor's code assigns: suffixed per factor, since Triton requires a variable that a
#: loop reassigns to keep the type it had before the loop (another factor's tile shapes).
_LOCAL = re.compile(
    r"\b(acc|alpha|beta|gamma|delta|group|tile|row|col|w|mask_[bkr]|beta_tile|gamma_tile|k0|"
    r"x_feature|y_feature|y_ptrs|mask_y|tap_feature|tap_ptrs|a_tile|w_tile)\b"
)


def _scoped(code: str, k: int) -> str:
    """``code`` with its local names suffixed by ``_k``; comment lines are left as written."""
    lines = code.splitlines(keepends=True)
    return "".join(
        line if line.lstrip().startswith("#") else _LOCAL.sub(lambda m: f"{m.group(1)}_{k}", line) for line in lines
    )


def _fma_epilogue(step: FactorStep) -> str:
    rows = step.pattern.out_features
    full = next_pow2(rows) == rows
    return FORWARD_EPILOGUE.format(
        y_feature=im.code(im.through(im.store_perm(step), ROW, "out_table_ptr"), mask=None if full else "mask_r"),
        mask="mask_r",
        full=str(full),
    )
