"""The Kronecker-sparse factor descriptor: the single source of truth for KS index maps.

A factor with pattern ``(a, b, c, d)`` is the ``(a*b*d, a*c*d)`` matrix whose support is
``I_a ⊗ 1_{b×c} ⊗ I_d``. Row ``(α, β, δ)`` (mixed radix ``(a, b, d)``) and column
``(α, γ, δ)`` (mixed radix ``(a, c, d)``) hold ``values[α, β, γ, δ]``.

Everything else in ksfx (kernels, the CPU path, the dense reference, the byte model)
derives its index arithmetic from the sympy expressions defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import sympy
import torch

from ksfx.pattern.printer import evaluate

# Digit symbols shared by every expression ksfx generates. They are nonnegative integers.
ALPHA, BETA, GAMMA, DELTA = sympy.symbols("alpha beta gamma delta", integer=True, nonnegative=True)
ROW, COL = sympy.symbols("row col", integer=True, nonnegative=True)


def mixed_radix_compose(digits: tuple, radices: tuple[int, ...]) -> sympy.Expr:
    """Flat index of ``digits`` in mixed radix ``radices`` (most significant first)."""
    index = sympy.Integer(0)
    for digit, radix in zip(digits, radices, strict=True):
        index = index * radix + digit
    return sympy.expand(index)


def mixed_radix_digits(index: sympy.Expr, radices: tuple[int, ...]) -> tuple[sympy.Expr, ...]:
    """Digits of a flat ``index`` in mixed radix ``radices`` as floor/mod expressions.

    The most significant digit carries no modulo: the index is assumed in range.
    """
    digits = []
    for position, radix in enumerate(radices):
        stride = math.prod(radices[position + 1 :])
        quotient = sympy.floor(index / stride) if stride > 1 else index
        digits.append(quotient if position == 0 else sympy.Mod(quotient, radix))
    return tuple(digits)


@dataclass(frozen=True)
class KSPattern:
    """Kronecker-sparse pattern ``(a, b, c, d)``; values are stored with shape ``(a, b, c, d)``."""

    a: int
    b: int
    c: int
    d: int

    def __post_init__(self) -> None:
        for name in "abcd":
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"KSPattern.{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"KSPattern.{name} must be >= 1, got {value} in {self.as_tuple()}")

    # ---------------------------------------------------------------- sizes
    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.a, self.b, self.c, self.d)

    @property
    def out_features(self) -> int:
        return self.a * self.b * self.d

    @property
    def in_features(self) -> int:
        return self.a * self.c * self.d

    @property
    def shape(self) -> tuple[int, int]:
        """Matrix shape ``(a*b*d, a*c*d)``."""
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return self.a * self.b * self.c * self.d

    @property
    def groups(self) -> int:
        """Number of independent ``b×c`` blocks, one per ``(α, δ)``."""
        return self.a * self.d

    def __str__(self) -> str:
        return f"KS{self.as_tuple()}"

    # ---------------------------------------------------------------- symbolic index maps
    @cached_property
    def row_expr(self) -> sympy.Expr:
        """Row index of ``(α, β, δ)`` in mixed radix ``(a, b, d)``."""
        return mixed_radix_compose((ALPHA, BETA, DELTA), (self.a, self.b, self.d))

    @cached_property
    def col_expr(self) -> sympy.Expr:
        """Column index of ``(α, γ, δ)`` in mixed radix ``(a, c, d)``."""
        return mixed_radix_compose((ALPHA, GAMMA, DELTA), (self.a, self.c, self.d))

    @cached_property
    def row_digits(self) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
        """``(α, β, δ)`` of row ``ROW`` as floor/mod expressions."""
        return mixed_radix_digits(ROW, (self.a, self.b, self.d))

    @cached_property
    def col_digits(self) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
        """``(α, γ, δ)`` of column ``COL`` as floor/mod expressions."""
        return mixed_radix_digits(COL, (self.a, self.c, self.d))

    def value_offset_expr(self, strides: tuple = None) -> sympy.Expr:
        """Offset of ``values[α, β, γ, δ]`` for the given (possibly symbolic) strides."""
        if strides is None:
            strides = (self.b * self.c * self.d, self.c * self.d, self.d, 1)
        return sum(s * g for s, g in zip(strides, (ALPHA, BETA, GAMMA, DELTA), strict=True))

    # ---------------------------------------------------------------- transformations
    def transpose(self) -> KSPattern:
        """Pattern of the transposed factor; its values are ``values.permute(0, 2, 1, 3)``."""
        return KSPattern(self.a, self.c, self.b, self.d)

    def flops(self, batch: int = 1) -> int:
        """Multiply-adds counted as 2 FLOPs, for ``batch`` input vectors."""
        return 2 * self.nnz * batch

    def min_bytes(self, batch: int, itemsize: int) -> int:
        """Lower bound on global traffic: read ``X`` and ``W`` once, write ``Y`` once."""
        return itemsize * (batch * (self.in_features + self.out_features) + self.nnz)

    # ---------------------------------------------------------------- concrete index tensors
    def index_grids(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column index of every stored value, each of shape ``(a, b, c, d)``.

        Evaluated from :attr:`row_expr` / :attr:`col_expr` so the dense reference shares
        its definition with the generated kernels.
        """
        shape = self.as_tuple()
        grids = torch.meshgrid(*(torch.arange(n, device=device) for n in shape), indexing="ij")
        env = dict(zip((ALPHA, BETA, GAMMA, DELTA), grids, strict=True))
        rows = evaluate(self.row_expr, env).expand(shape)
        cols = evaluate(self.col_expr, env).expand(shape)
        return rows, cols

    def support(self, device=None) -> torch.Tensor:
        """Boolean ``(a*b*d, a*c*d)`` mask of the support."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=device)
        rows, cols = self.index_grids(device)
        mask[rows.reshape(-1), cols.reshape(-1)] = True
        return mask

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Dense matrix of a factor with these ``values`` (differentiable)."""
        self.check_values(values)
        dense = values.new_zeros(self.shape)
        rows, cols = self.index_grids(values.device)
        return dense.index_put((rows.reshape(-1), cols.reshape(-1)), values.reshape(-1))

    def values_from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """Gather the ``(a, b, c, d)`` values of a dense matrix at this pattern's support."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"{self}: dense matrix must have shape {self.shape}, got {tuple(dense.shape)}")
        rows, cols = self.index_grids(dense.device)
        return dense[rows, cols]

    def check_values(self, values: torch.Tensor, name: str = "values") -> None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{name} for {self} must be a torch.Tensor, got {type(values).__name__}")
        if tuple(values.shape) != self.as_tuple():
            raise ValueError(f"{name} for {self} must have shape {self.as_tuple()}, got {tuple(values.shape)}")

    @staticmethod
    def from_support(mask: torch.Tensor) -> KSPattern | None:
        """The pattern whose support is exactly ``mask``, or None.

        Reads ``c, d`` off the first row and ``b`` off the first column, then verifies
        the whole mask. A diagonal support is ambiguous (every ``(a,1,1,d)`` with
        ``a*d = n`` matches); it is reported as ``(n, 1, 1, 1)``.
        """
        if mask.ndim != 2:
            raise ValueError(f"support mask must be 2-D, got shape {tuple(mask.shape)}")
        mask = mask.detach().to(torch.bool).cpu()
        rows_n, cols_n = mask.shape
        first_row = torch.nonzero(mask[0]).flatten().tolist()
        first_col = torch.nonzero(mask[:, 0]).flatten().tolist()
        if not first_row or first_row[0] != 0 or not first_col:
            return None
        c = len(first_row)
        b = len(first_col)
        steps = {j - i for i, j in zip(first_row, first_row[1:])} | {j - i for i, j in zip(first_col, first_col[1:])}
        if len(steps) > 1:
            return None
        if steps:
            d = steps.pop()
        else:  # b == c == 1: diagonal, canonical (n, 1, 1, 1)
            d = 1
        if rows_n % (b * d) or cols_n % (c * d) or rows_n // (b * d) != cols_n // (c * d):
            return None
        candidate = KSPattern(rows_n // (b * d), b, c, d)
        return candidate if torch.equal(candidate.support(), mask) else None
