"""Symbolic index maps of one factor step, derived from :mod:`ksfx.pattern` descriptors.

Every address a generated kernel computes is one of the expressions below, printed with
:func:`ksfx.pattern.to_code`. Nothing here is written per pattern: the maps are
substitutions into ``KSPattern.row_expr`` / ``col_expr`` / ``row_digits`` /
``value_offset_expr`` and the permutations' ``source_expr``.

Conventions (``x' = in_perm(x)``, ``y = out_perm(y')``, both gathers on the feature index):

* the kernel reads ``x'[m, col]`` at feature ``in_perm.source(col)`` of ``x``;
* it computes ``y'[m, row]`` and stores it at the feature ``j`` of ``y`` with
  ``out_perm.source(j) == row``, i.e. at ``out_perm.inverse().source(row)``;
* an :class:`~ksfx.pattern.IndexPerm` is a table lookup, printed as a load from the
  int32 table pointer (``in_table_ptr`` / ``out_table_ptr``); a
  :class:`~ksfx.pattern.DigitPerm` is pure div/mod arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ksfx.pattern import BETA, DELTA, GAMMA, ROW, DigitPerm, FactorStep, IndexPerm, J, Perm, to_code
from ksfx.pattern.ks import mixed_radix_digits

#: Runtime strides of the values tensor (it may be a strided view, e.g. a transpose).
VALUE_STRIDES = sympy.symbols("stride_v0 stride_v1 stride_v2 stride_v3", integer=True, nonnegative=True)
#: Flat index of one stored value in radix (a, b, c, d) (the FMA weight-gradient kernel).
FLAT = sympy.Symbol("flat", integer=True, nonnegative=True)
#: The input position a ``window`` kernel loads: its window's start plus a lane.
X_INDEX = sympy.Symbol("x_index", integer=True, nonnegative=True)
#: 2-D views of the β / γ vectors, broadcast to a ``[γ, β]`` tile of the values.
BETA_TILE, GAMMA_TILE = sympy.symbols("beta_tile gamma_tile", integer=True, nonnegative=True)
#: δ-tiled kernels: first γ, β and δ of the tile, and the offsets into a tile flattened
#: over ``(γ, δ)`` / ``(β, δ)`` (runs along the contiguous axis of the ``(α, γ, δ)`` radix).
K0, B0, D0 = sympy.symbols("k0 b0 d0", integer=True, nonnegative=True)
FLAT_K, FLAT_N = sympy.symbols("flat_k flat_n", integer=True, nonnegative=True)


@dataclass(frozen=True)
class TableLookup:
    """A feature index read from an int32 table: ``tl.load(pointer + index)``."""

    pointer: str
    index: sympy.Expr


FeatureExpr = sympy.Expr | TableLookup


def through(perm: Perm | None, index: sympy.Expr, table_pointer: str) -> FeatureExpr:
    """Feature read by ``perm`` (a gather) at position ``index``."""
    if perm is None:
        return index
    if isinstance(perm, DigitPerm):
        return perm.source_expr.subs(J, index)
    if isinstance(perm, IndexPerm):
        return TableLookup(table_pointer, index)
    raise TypeError(f"unsupported permutation {type(perm).__name__}")


def store_perm(step: FactorStep) -> Perm | None:
    """The gather taking ``y'`` positions to ``y`` positions (inverse of ``out_perm``)."""
    return None if step.out_perm is None else step.out_perm.inverse()


def x_feature(step: FactorStep) -> FeatureExpr:
    """Feature of ``x`` holding ``x'[col(α, γ, δ)]``."""
    return through(step.in_perm, step.pattern.col_expr, "in_table_ptr")


def y_feature(step: FactorStep, row: sympy.Expr | None = None) -> FeatureExpr:
    """Feature of ``y`` receiving ``y'[row]`` (also where ``dy'`` is read).

    ``row`` defaults to ``row(α, β, δ)``; kernels that tile flat rows pass ``ROW``.
    """
    return through(store_perm(step), step.pattern.row_expr if row is None else row, "out_table_ptr")


def value_offset(step: FactorStep, strided: bool = True, tile: bool = False, strides=None) -> sympy.Expr:
    """Offset of ``values[α, β, γ, δ]``: runtime strides, or contiguous when not ``strided``,
    or the given ``strides``.

    ``tile`` renames β, γ to ``beta_tile`` / ``gamma_tile``, which the kernel binds to
    2-D broadcasts of the β and γ vectors so that the offset is a whole tile.
    """
    if strides is None:
        strides = VALUE_STRIDES if strided else None
    expr = step.pattern.value_offset_expr(strides)
    return expr.subs({BETA: BETA_TILE, GAMMA: GAMMA_TILE}) if tile else expr


def value_offset_of_row(step: FactorStep, strides: tuple[int, int, int, int]) -> sympy.Expr:
    """Offset of ``values[α, β, γ, δ]`` at the digits ``(α, β, δ)`` of output row ``ROW``.

    Where the strides of ``(α, β, δ)`` are the row's radix weights ``(b·d, d, 1)`` (a
    γ-major layout) the three digits recompose to ``ROW`` itself. Written so, the offset is
    visibly contiguous along the rows; as ``2·(ROW // 2) + ROW % 2`` Triton's alignment
    analysis sees runs of 2 only. Otherwise the offset is in the digits (the kernel binds them).
    """
    p = step.pattern
    s_alpha, s_beta, s_gamma, s_delta = strides
    if (s_alpha, s_beta, s_delta) == (p.b * p.d, p.d, 1):
        return s_gamma * GAMMA + ROW
    return p.value_offset_expr(strides)


def _tile(expr: sympy.Expr, digit: sympy.Symbol, start: sympy.Symbol, flat: sympy.Symbol, width: int):
    """``expr`` over a tile flattened as ``digit = start + flat // width``, ``δ = d0 + flat % width``.

    Where ``digit`` and δ are the two least significant digits of ``expr`` with radix
    ``width`` (coefficients ``width`` and 1) the tile covers every δ and folds to
    ``start * width + flat``: one contiguous run.
    """
    if expr.coeff(DELTA) == 1 and expr.coeff(digit) == width:
        return expr.subs({digit: start, DELTA: flat})
    return expr.subs({digit: start + sympy.floor(flat / width), DELTA: D0 + sympy.Mod(flat, width)})


def x_feature_tile(step: FactorStep, width: int) -> FeatureExpr:
    """Feature of ``x`` at flat offset ``flat_k`` of a δ-tiled kernel's ``(γ, δ)`` tile
    (``width = d``: of its flat ``(γ, δ)`` run, which a gathered kernel regroups on chip)."""
    p = step.pattern
    return through(step.in_perm, _tile(p.col_expr, GAMMA, K0, FLAT_K, width), "in_table_ptr")


def y_feature_tile(step: FactorStep, width: int) -> FeatureExpr:
    """Feature of ``y`` at flat offset ``flat_n`` of a δ-tiled kernel's ``(β, δ)`` tile
    (``width = d``: of its flat ``(β, δ)`` run)."""
    p = step.pattern
    return through(store_perm(step), _tile(p.row_expr, BETA, B0, FLAT_N, width), "out_table_ptr")


def value_offset_tile(step: FactorStep, width: int, strided: bool = True, inner: int | None = None) -> sympy.Expr:
    """Offset of a δ-tiled kernel's ``[β, (γ, δ)]`` values tile (β as ``beta_tile``).

    The last two dimensions are taken contiguous, δ padded to ``inner`` (default ``d``):
    strides ``inner`` and 1 (the launcher lays the values out so,
    :func:`~ksfx.codegen.tiling.values_order`); the outer two are the runtime strides, or
    contiguous when not ``strided`` (the weight gradient's partials).
    """
    p = step.pattern
    inner = p.d if inner is None else inner
    outer = VALUE_STRIDES[:2] if strided else (p.b * p.c * inner, p.c * inner)
    expr = p.value_offset_expr((*outer, inner, 1)).subs(BETA, BETA_TILE)
    return _tile(expr, GAMMA, K0, FLAT_K, width)


def group_digits(step: FactorStep, group: sympy.Symbol) -> tuple[sympy.Expr, sympy.Expr]:
    """``(α, δ)`` of a group index in radix ``(a, d)`` (one ``b×c`` block per group)."""
    return mixed_radix_digits(group, (step.pattern.a, step.pattern.d))


def row_digits(step: FactorStep, beta_inner: bool = False) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """``(α, β, δ)`` of output row ``ROW``; with ``beta_inner``, of a kernel's flat row
    ``ROW`` enumerating ``(α, δ, β)``, β fastest (:func:`~ksfx.codegen.tiling.fma_beta_inner`)."""
    if not beta_inner:
        return step.pattern.row_digits
    p = step.pattern
    alpha, delta, beta = mixed_radix_digits(ROW, (p.a, p.d, p.b))
    return alpha, beta, delta


def flat_value_digits(step: FactorStep) -> tuple[sympy.Expr, ...]:
    """``(α, β, γ, δ)`` of the flat value index ``FLAT``."""
    return mixed_radix_digits(FLAT, step.pattern.as_tuple())


def code(expr: FeatureExpr, mask: str | None = None) -> str:
    """Triton source for an index expression (a masked table load for lookups)."""
    if isinstance(expr, TableLookup):
        masked = f", mask={mask}, other=0" if mask else ""
        return f"tl.load({expr.pointer} + {code(expr.index)}{masked})"
    return to_code(expr)
