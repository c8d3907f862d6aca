"""Chains of KS factors and permutations: ``W = S_1 @ S_2 @ … @ S_L``, leftmost first.

A batch-first layer computes ``y = x @ W.T`` (``S_L`` is applied to ``x`` first);
a batch-last layer computes ``y = W @ x``. Permutation steps act as gathers on the
feature index (see :mod:`ksfx.pattern.perm`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ksfx.pattern.ks import KSPattern
from ksfx.pattern.perm import DigitPerm, IndexPerm, Perm, compose

Step = KSPattern | DigitPerm | IndexPerm


def step_shape(step: Step) -> tuple[int, int]:
    """``(out_features, in_features)`` of one step."""
    return step.shape if isinstance(step, KSPattern) else (step.size, step.size)


def fuse(left: KSPattern, right: KSPattern) -> KSPattern | None:
    """Pattern of ``left @ right`` when the product (for generic values) is KS, else None.

    Structural rule (derived by refining the middle index): with ``q = a2/a1`` and
    ``r = d1/d2``, if ``a1 | a2``, ``d2 | d1``, ``q | c1`` and ``b2 == (c1/q)*r``, the
    middle index reads ``(α1, q, s, r, δ2)`` with ``s = c1/q`` summed over, and the product
    has pattern ``(a1, b1*r, q*c2, d2)``. Example: the first two factors of a size-8
    butterfly, ``(1,2,2,4) @ (2,2,2,2) = (1,4,4,2)``.

    Outside that rule a product can still be KS by saturation (e.g.
    ``(2,3,4,1) @ (1,4,2,2)`` is dense, ``(1,6,4,1)``); those are found by checking the
    product's support, built from which ``(α1, δ1)`` row groups reach which ``(α2, δ2)``
    column groups.
    """
    if left.in_features != right.out_features:
        raise ValueError(
            f"cannot multiply {left} (in_features={left.in_features}) by {right} (out_features={right.out_features})"
        )
    structural = _structural_fuse(left, right)
    if structural is not None:
        return structural
    return KSPattern.from_support(product_support(left, right))


def _structural_fuse(left: KSPattern, right: KSPattern) -> KSPattern | None:
    a1, b1, c1, d1 = left.as_tuple()
    a2, b2, c2, d2 = right.as_tuple()
    if a2 % a1 or d1 % d2:
        return None
    q, r = a2 // a1, d1 // d2
    if c1 % q or b2 != (c1 // q) * r:
        return None
    return KSPattern(a1, b1 * r, q * c2, d2)


def product_support(left: KSPattern, right: KSPattern) -> torch.Tensor:
    """Support of ``left @ right`` for generic values (a boolean matrix product)."""
    return (left.support().to(torch.float32) @ right.support().to(torch.float32)) > 0


def fuse_values(left: KSPattern, right: KSPattern, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Values of ``left @ right`` in the pattern :func:`fuse` returns."""
    fused = fuse(left, right)
    if fused is None:
        raise ValueError(f"{left} @ {right} is not a KS factor")
    if _structural_fuse(left, right) is None:
        return fused.values_from_dense(left.to_dense(v1) @ right.to_dense(v2))
    a1, b1, c1, d1 = left.as_tuple()
    a2, b2, c2, d2 = right.as_tuple()
    q, r = a2 // a1, d1 // d2
    s = c1 // q
    # v1[α1, β1, (q_, s_), (r_, δ2)] and v2[(α1, q_), (s_, r_), γ2, δ2]
    x1 = v1.reshape(a1, b1, q, s, r, d2)
    x2 = v2.reshape(a1, q, s, r, c2, d2)
    out = torch.einsum("abqsre,aqsrce->abrqce", x1, x2)
    return out.reshape(fused.as_tuple())


@dataclass(frozen=True)
class Chain:
    """A validated sequence of KS factors and permutations, leftmost first."""

    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps:
            raise ValueError("a chain needs at least one step")
        for k, step in enumerate(self.steps):
            if not isinstance(step, KSPattern | DigitPerm | IndexPerm):
                raise TypeError(f"chain step {k} must be a KSPattern or a permutation, got {type(step).__name__}")
        for k in range(len(self.steps) - 1):
            left, right = self.steps[k], self.steps[k + 1]
            if step_shape(left)[1] != step_shape(right)[0]:
                raise ValueError(
                    f"chain steps {k} and {k + 1} do not chain: {left} takes {step_shape(left)[1]} features "
                    f"but {right} produces {step_shape(right)[0]}"
                )

        # Serialised once: the op takes it as a string, and Dynamo cannot trace json.dumps.
        object.__setattr__(self, "_spec", json.dumps([_step_to_json(s) for s in self.steps], separators=(",", ":")))

    # ------------------------------------------------------------------ sizes
    @property
    def out_features(self) -> int:
        return step_shape(self.steps[0])[0]

    @property
    def in_features(self) -> int:
        return step_shape(self.steps[-1])[1]

    @property
    def patterns(self) -> tuple[KSPattern, ...]:
        return tuple(s for s in self.steps if isinstance(s, KSPattern))

    @property
    def permutations(self) -> tuple[Perm, ...]:
        return tuple(s for s in self.steps if not isinstance(s, KSPattern))

    def flops(self, batch: int = 1) -> int:
        return sum(p.flops(batch) for p in self.patterns)

    def dense_flops(self, batch: int = 1) -> int:
        return 2 * self.out_features * self.in_features * batch

    def min_bytes(self, batch: int, itemsize: int) -> int:
        """Lower bound for the whole chain: read ``x`` and the weights, write ``y``."""
        weights = sum(p.nnz for p in self.patterns)
        return itemsize * (batch * (self.in_features + self.out_features) + weights)

    # ------------------------------------------------------------------ transformations
    def simplified(self) -> Chain:
        """Compose adjacent permutations and drop identities (factors untouched)."""
        steps: list[Step] = []
        for step in self.steps:
            if not isinstance(step, KSPattern) and steps and not isinstance(steps[-1], KSPattern):
                # W = ... P_left @ P_right ...: P_right acts first.
                step = compose(step, steps.pop())
            steps.append(step)
        steps = [s for s in steps if isinstance(s, KSPattern) or not s.is_identity]
        if not steps:
            return Chain((DigitPerm((self.in_features,), (0,)),))
        return Chain(tuple(steps))

    def transpose(self) -> Chain:
        """``W.T``: reversed steps, transposed patterns, inverse permutations."""
        return Chain(tuple(s.transpose() if isinstance(s, KSPattern) else s.inverse() for s in reversed(self.steps)))

    def to_dense(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Dense ``W`` from the factors' values (in order of :attr:`patterns`)."""
        if len(values) != len(self.patterns):
            raise ValueError(f"chain has {len(self.patterns)} factors but {len(values)} value tensors were given")
        it = iter(values)
        dense = None
        for step in self.steps:
            if isinstance(step, KSPattern):
                matrix = step.to_dense(next(it))
            else:
                ref = values[0]
                matrix = permutation_matrix(step, dtype=ref.dtype, device=ref.device)
            dense = matrix if dense is None else dense @ matrix
        return dense

    # ------------------------------------------------------------------ serialisation
    def to_spec(self) -> str:
        """Compact JSON, the non-tensor argument of the ``ksfx`` torch op."""
        return self._spec

    @staticmethod
    def from_spec(spec: str) -> Chain:
        return _chain_from_spec(spec)

    @staticmethod
    def of_factors(patterns: list[KSPattern | tuple[int, int, int, int]]) -> Chain:
        return Chain(tuple(p if isinstance(p, KSPattern) else KSPattern(*p) for p in patterns))

    def __str__(self) -> str:
        return " @ ".join(str(s) for s in self.steps)


def permutation_matrix(perm: Perm, dtype=torch.float32, device=None) -> torch.Tensor:
    """``P`` with ``P[j, source(j)] = 1`` so that ``P @ v == v[source]``."""
    n = perm.size
    matrix = torch.zeros(n, n, dtype=dtype, device=device)
    matrix[torch.arange(n, device=device), perm.indices().to(device)] = 1
    return matrix


def _step_to_json(step: Step) -> list:
    if isinstance(step, KSPattern):
        return ["ks", *step.as_tuple()]
    if isinstance(step, DigitPerm):
        return ["digits", list(step.radices), list(step.order)]
    return ["index", list(step.indices_)]


_SPEC_CACHE: dict[str, Chain] = {}


def _chain_from_spec(spec: str) -> Chain:
    chain = _SPEC_CACHE.get(spec)
    if chain is None:
        steps = []
        for item in json.loads(spec):
            kind = item[0]
            if kind == "ks":
                steps.append(KSPattern(*item[1:]))
            elif kind == "digits":
                steps.append(DigitPerm(tuple(item[1]), tuple(item[2])))
            elif kind == "index":
                steps.append(IndexPerm(tuple(item[1])))
            else:
                raise ValueError(f"unknown chain step kind {kind!r} in spec")
        chain = _SPEC_CACHE.setdefault(spec, Chain(tuple(steps)))
    return chain
