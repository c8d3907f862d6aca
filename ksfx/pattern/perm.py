"""Permutations of a feature index, as gathers: ``y[..., j] = x[..., source(j)]``.

Two kinds, because they compile differently:

* :class:`DigitPerm` — what ``reshape(radices) → permute(order) → reshape(-1)`` does:
  a permutation of the digits of a mixed-radix index. Kernels fold it in as div/mod
  arithmetic, no memory access.
* :class:`IndexPerm` — any permutation, given as an index table (``x[..., perm]`` with a
  constant tensor). Kernels fold it in as one extra load per index.

As a matrix, a permutation ``P`` has ``P[j, source(j)] = 1``, so ``P @ v == v[source]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import sympy
import torch

from ksfx.pattern.ks import mixed_radix_compose, mixed_radix_digits
from ksfx.pattern.printer import evaluate

# The output feature index a permutation's source expression is written in.
J = sympy.Symbol("j", integer=True, nonnegative=True)


@dataclass(frozen=True)
class DigitPerm:
    """``y = x.reshape(*radices).permute(*order).reshape(-1)`` on the feature index."""

    radices: tuple[int, ...]
    order: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "radices", tuple(int(r) for r in self.radices))
        object.__setattr__(self, "order", tuple(int(o) for o in self.order))
        if any(r < 1 for r in self.radices):
            raise ValueError(f"DigitPerm radices must be >= 1, got {self.radices}")
        if sorted(self.order) != list(range(len(self.radices))):
            raise ValueError(f"DigitPerm order {self.order} is not a permutation of range({len(self.radices)})")

    @property
    def size(self) -> int:
        return math.prod(self.radices)

    @property
    def out_radices(self) -> tuple[int, ...]:
        return tuple(self.radices[o] for o in self.order)

    @cached_property
    def source_expr(self) -> sympy.Expr:
        """Input index read by output index ``J``: div/mod arithmetic from the digits."""
        out_digits = mixed_radix_digits(J, self.out_radices)
        in_digits = [None] * len(self.radices)
        for position, source_axis in enumerate(self.order):
            in_digits[source_axis] = out_digits[position]
        return mixed_radix_compose(tuple(in_digits), self.radices)

    def indices(self) -> torch.Tensor:
        return evaluate(self.source_expr, {J: torch.arange(self.size)})

    def inverse(self) -> DigitPerm:
        inverse_order = tuple(sorted(range(len(self.order)), key=lambda k: self.order[k]))
        return DigitPerm(self.out_radices, inverse_order).simplified()

    def simplified(self) -> DigitPerm:
        """Drop radix-1 digits and merge digits that stay adjacent and in order."""
        keep = [axis for axis, r in enumerate(self.radices) if r > 1]
        order = [o for o in self.order if self.radices[o] > 1]
        rank = {axis: k for k, axis in enumerate(keep)}
        radices = [self.radices[axis] for axis in keep]
        order = [rank[o] for o in order]
        merged = True
        while merged and len(order) > 1:
            merged = False
            for k in range(len(order) - 1):
                if order[k + 1] == order[k] + 1:
                    head = order[k]
                    radices[head] *= radices[head + 1]
                    del radices[head + 1]
                    del order[k + 1]
                    order = [o - 1 if o > head else o for o in order]
                    merged = True
                    break
        if not radices:
            radices, order = [1], [0]
        return DigitPerm(tuple(radices), tuple(order))

    @property
    def is_identity(self) -> bool:
        return len(self.simplified().order) == 1

    def __str__(self) -> str:
        return f"DigitPerm(radices={self.radices}, order={self.order})"


@dataclass(frozen=True)
class IndexPerm:
    """``y = x[..., indices]`` for a constant permutation table."""

    indices_: tuple[int, ...]

    def __post_init__(self) -> None:
        table = tuple(int(i) for i in self.indices_)
        object.__setattr__(self, "indices_", table)
        if sorted(table) != list(range(len(table))):
            raise ValueError(f"IndexPerm table of length {len(table)} is not a permutation of range({len(table)})")
        object.__setattr__(self, "_hash", hash(table))

    def __hash__(self) -> int:
        # Tables can be long and the op hashes its launch steps on every call.
        return self._hash

    @property
    def size(self) -> int:
        return len(self.indices_)

    def indices(self) -> torch.Tensor:
        return torch.tensor(self.indices_, dtype=torch.long)

    def inverse(self) -> IndexPerm:
        # plain Python: a plan is built inside traced op bodies too, where torch ops are traced
        inverse = [0] * self.size
        for position, source in enumerate(self.indices_):
            inverse[source] = position
        return IndexPerm(tuple(inverse))

    @property
    def is_identity(self) -> bool:
        return self.indices_ == tuple(range(self.size))

    def __str__(self) -> str:
        head = ", ".join(map(str, self.indices_[:8]))
        return f"IndexPerm([{head}{', …' if self.size > 8 else ''}], n={self.size})"


Perm = DigitPerm | IndexPerm


def compose(first: Perm, then: Perm) -> Perm:
    """The permutation applying ``first`` then ``then`` (as gathers on a vector).

    ``then(first(x))[j] = x[first.source(then.source(j))]``. Two digit permutations over
    compatible radices stay a digit permutation; anything else becomes an index table,
    which :func:`as_digit_perm` turns back into digits when it can.
    """
    if first.size != then.size:
        raise ValueError(f"cannot compose permutations of sizes {first.size} and {then.size}")
    if isinstance(first, DigitPerm) and isinstance(then, DigitPerm) and then.radices == first.out_radices:
        order = tuple(first.order[o] for o in then.order)
        return DigitPerm(first.radices, order).simplified()
    table = first.indices()[then.indices()]
    return simplify(IndexPerm(tuple(table.tolist())))


def simplify(perm: Perm) -> Perm:
    """Canonical, cheapest form: digit arithmetic when the table is a digit permutation."""
    if isinstance(perm, IndexPerm):
        digits = as_digit_perm(perm)
        return digits if digits is not None else perm
    return perm.simplified()


def as_digit_perm(perm: IndexPerm) -> DigitPerm | None:
    """Recognise an index table that is a digit permutation (e.g. bit reversal).

    Reads the output digits from the least significant up: at output stride ``o`` the
    table must step by a constant input stride ``s`` for as long as the digit runs
    (``table[m*o] == m*s``). The maximal runs are the digits of the simplified
    permutation; sorting their input strides gives the input radices. The candidate is
    then checked against the whole table, so a wrong guess can never pass.
    """
    n = perm.size
    table = perm.indices()
    if n < 2 or int(table[0]) != 0:
        return None
    digits = []  # (radix, input stride), least significant output digit first
    out_stride = 1
    while out_stride < n:
        step = int(table[out_stride])
        radix = 1
        while radix * out_stride < n and int(table[radix * out_stride]) == radix * step:
            radix += 1
        if radix < 2 or n % (out_stride * radix):
            return None
        digits.append((radix, step))
        out_stride *= radix
    by_input_stride = sorted(range(len(digits)), key=lambda k: digits[k][1], reverse=True)
    radices = tuple(digits[k][0] for k in by_input_stride)
    expected_stride = 1
    for k in reversed(by_input_stride):
        if digits[k][1] != expected_stride:
            return None
        expected_stride *= digits[k][0]
    axis_of_digit = {k: axis for axis, k in enumerate(by_input_stride)}
    order = tuple(axis_of_digit[k] for k in reversed(range(len(digits))))
    candidate = DigitPerm(radices, order)
    return candidate.simplified() if torch.equal(candidate.indices(), table) else None
