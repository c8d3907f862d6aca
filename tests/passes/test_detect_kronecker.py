"""Kronecker-product weights: ``x @ torch.kron(A, B).T`` is two KS factors, not a dense product.

``torch.kron(A, B)`` with ``A`` of shape ``(m1, n1)`` and ``B`` of shape ``(m2, n2)`` is
``(A ⊗ I_m2)(I_n1 ⊗ B)``: ``KS(m1, m2, n2, 1) @ KS(1, m1, n1, n2)`` with each factor's
values tied along its block index. Traced, it is a broadcast product of two weights on
disjoint dimensions, which the pass splits into one product per operand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ksfx_checks import assert_compiled_matches_eager, rewritten_patterns
from torch import nn

import ksfx


class KronLinear(nn.Module):
    """KronA/LoKr-style layer: the weight is rebuilt as a Kronecker product at every call."""

    def __init__(self, a_shape, b_shape, bias=False, batch_last=False, form="matmul"):
        super().__init__()
        self.A = nn.Parameter(torch.randn(*a_shape) / a_shape[1] ** 0.5)
        self.B = nn.Parameter(torch.randn(*b_shape) / b_shape[1] ** 0.5)
        out = a_shape[0] * b_shape[0]
        self.bias = nn.Parameter(torch.randn(out)) if bias else None
        self.batch_last, self.form = batch_last, form

    def forward(self, x):
        w = torch.kron(self.A, self.B)
        if self.batch_last:
            return w @ x
        if self.form == "linear":
            return F.linear(x, w, self.bias)
        return x @ w.T


def kron_patterns(a_shape, b_shape):
    (m1, n1), (m2, n2) = a_shape, b_shape
    return [(m1, m2, n2, 1), (1, m1, n1, n2)]


@pytest.mark.parametrize(
    "a_shape, b_shape, lead",
    [((4, 3), (5, 2), (7,)), ((2, 2), (3, 3), (2, 3)), ((6, 2), (1, 4), (5,)), ((3, 5), (4, 1), (4,))],
    ids=str,
)
def test_kron_weight_is_two_factors(a_shape, b_shape, lead):
    torch.manual_seed(0)
    model = KronLinear(a_shape, b_shape)
    x = torch.randn(*lead, a_shape[1] * b_shape[1])
    assert rewritten_patterns(model, x) == [kron_patterns(a_shape, b_shape)]
    assert_compiled_matches_eager(model, x, min_launches=2)


@pytest.mark.parametrize("form", ["linear", "batch_last"])
def test_kron_weight_with_bias_or_batch_last(form):
    torch.manual_seed(0)
    model = KronLinear((4, 3), (2, 4), bias=form == "linear", batch_last=form == "batch_last", form=form)
    x = torch.randn(12, 5) if form == "batch_last" else torch.randn(5, 12)
    assert rewritten_patterns(model, x) == [kron_patterns((4, 3), (2, 4))]
    assert_compiled_matches_eager(model, x, min_launches=2)


def test_kron_saves_flops_so_auto_rewrites_it():
    model, x = KronLinear((16, 16), (16, 16)), torch.randn(3, 256)
    (chain,) = ksfx.explain(model, x).chains
    assert chain.rewritten and chain.estimate.source_flops == 2 * 256 * 256
    assert chain.estimate.chain_flops == 2 * 2 * 256 * 16


def test_kron_of_three_factors_matches_eager():
    """``kron(kron(A, B), C)``: the inner product is one dense operand of the outer one."""

    class Kron3(nn.Module):
        def __init__(self):
            super().__init__()
            self.A, self.B, self.C = (nn.Parameter(torch.randn(2, 2)) for _ in range(3))

        def forward(self, x):
            return x @ torch.kron(torch.kron(self.A, self.B), self.C).T

    torch.manual_seed(0)
    model, x = Kron3(), torch.randn(3, 8)
    assert rewritten_patterns(model, x) == [[(4, 2, 2, 1), (1, 4, 4, 2)]]
    assert_compiled_matches_eager(model, x, min_launches=2)


def test_elementwise_scaled_weight_is_not_split():
    """``w * s`` with ``s`` a per-row scale shares the row digit with ``w``: one dense factor."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.s = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 1))

        def forward(self, x):
            return x @ (self.w * self.s).T

    (chain,) = ksfx.explain(Scaled(), torch.randn(3, 4), rewrite="always").chains
    assert chain.patterns == [(1, 6, 4, 1)] and not chain.rewritten
