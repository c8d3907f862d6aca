"""Sums of branches of one tensor: ``w1 * x + w2 * x[..., perm]`` as one KS factor.

Each branch is a single factor between permutations (a diagonal, a partner gather); the
sum is one factor when the union of their supports is KS, with values gathered from both
weights. Butterflies written this way (``tests/realworld``: ``ButterflyBranches``) are one
chain of ``log2(n)`` factors. A sum whose support is not KS, or a branch that is more than
one factor, is not merged: the branches stay chains of their own and the sum is an add.
"""

from __future__ import annotations

import pytest
import torch
from ksfx_checks import assert_compiled_matches_eager, compile_ks
from torch import nn

import ksfx
from ksfx.pattern import IndexPerm
from tests.realworld.layers import BlockdiagLinear, ButterflyBranches, MonarchLinear, PairedBranches

BUTTERFLY_8 = [(1, 2, 2, 4), (2, 2, 2, 2), (4, 2, 2, 1)]


def _rewritten(report):
    return [c for c in report.chains if c.rewritten]


def test_index_select_partner_and_dynamic_batch():
    torch.manual_seed(0)
    model = ButterflyBranches(8, partner="index_select")
    report = ksfx.explain(model, torch.randn(3, 8), rewrite="always", dynamic=True)
    (chain,) = _rewritten(report)
    assert chain.patterns == BUTTERFLY_8 and not chain.permutations
    assert len(chain.plan.guards) == 3  # the three partner tables shape the support: guarded
    assert_compiled_matches_eager(model, torch.randn(5, 8), min_launches=3)


def test_changed_partner_table_falls_back_to_the_original():
    torch.manual_seed(0)
    model, x = ButterflyBranches(8), torch.randn(4, 8)
    compiled = compile_ks(model)
    torch.testing.assert_close(compiled(x), model(x))
    model.partner_0.copy_(torch.tensor([1, 2, 0, 3, 4, 5, 6, 7]))  # no butterfly pairing any more
    with pytest.warns(RuntimeWarning, match="index table"):
        actual = compiled(x)
    torch.testing.assert_close(actual, model(x))


class OneTwiddle(nn.Module):
    """Both branch weights read from one tensor ``(2, n)``: the factor's values are one gather."""

    def __init__(self, n=8, stride=2):
        super().__init__()
        self.twiddle = nn.Parameter(torch.randn(2, n))
        self.register_buffer("partner", torch.arange(n) ^ stride)

    def forward(self, x):
        return self.twiddle[0] * x + self.twiddle[1] * x[..., self.partner]


def test_branches_of_one_weight_tensor():
    torch.manual_seed(0)
    model, x = OneTwiddle(), torch.randn(2, 5, 8)
    report = ksfx.explain(model, x, rewrite="always")
    (chain,) = _rewritten(report)
    assert chain.patterns == [(2, 2, 2, 2)] and not chain.plan.values[0].plus
    assert report.graphs[0].code.count("aten.index.Tensor") == 1
    assert_compiled_matches_eager(model, x)


def test_any_pairing_is_ks_up_to_permutations():
    """A fixed-point-free pairing that is no butterfly: 2x2 blocks after index permutations."""
    perm = torch.tensor([5, 3, 6, 1, 7, 0, 2, 4])
    torch.manual_seed(0)
    model, x = PairedBranches(perm), torch.randn(3, 8)
    (chain,) = _rewritten(ksfx.explain(model, x, rewrite="always"))
    assert chain.patterns == [(4, 2, 2, 1)] and all(isinstance(p, IndexPerm) for p in chain.plan.chain.permutations)
    dense = chain.plan.chain.to_dense([torch.ones(4, 2, 2, 1)])
    expected = torch.eye(8)
    expected[torch.arange(8), perm] = 1
    torch.testing.assert_close(dense, expected)  # the chain's support is the sum's
    assert_compiled_matches_eager(model, x)


class TwoBlockdiag(nn.Module):
    """Two block-diagonal layers of one input with the same blocks, added: one factor, summed values."""

    def __init__(self):
        super().__init__()
        self.left, self.right = BlockdiagLinear(12, 12, 3, bias=False), BlockdiagLinear(12, 12, 3, bias=False)

    def forward(self, x):
        return self.left(x) + self.right(x)


def test_branches_with_the_same_support_add_their_values():
    torch.manual_seed(0)
    model, x = TwoBlockdiag(), torch.randn(2, 3, 12)
    (chain,) = _rewritten(ksfx.explain(model, x, rewrite="always"))
    assert chain.patterns == [(3, 4, 4, 1)] and len(chain.plan.values[0].plus) == 1
    assert_compiled_matches_eager(model, x)


def test_sum_that_is_not_ks_is_left_alone():
    """A 3-cycle: rows {0, 1}, {1, 2}, {2, 0} overlap, no block structure."""
    torch.manual_seed(0)
    model, x = PairedBranches(torch.tensor([1, 2, 0, 3, 5, 4, 7, 6])), torch.randn(3, 8)
    report = ksfx.explain(model, x, rewrite="always")
    (refused,) = [c for c in report.chains if not c.rewritten]
    assert refused.reason == "not a KS chain: add: the sum add of the branches mul, mul_1 is not Kronecker-sparse"
    # each branch is still a (diagonal) chain of its own; the add stays between them
    assert [c.patterns for c in _rewritten(report)] == [[(8, 1, 1, 1)], [(8, 1, 1, 1)]]
    assert "aten.add.Tensor" in report.graphs[0].code
    assert_compiled_matches_eager(model, x, min_launches=2)


class ParallelLayers(nn.Module):
    """``monarch(x) + blockdiag(x)``: a branch of two factors is no single factor."""

    def __init__(self):
        super().__init__()
        self.monarch = MonarchLinear(16, 16, 4, bias=False)
        self.blocks = BlockdiagLinear(16, 16, 4, bias=False)

    def forward(self, x):
        return self.monarch(x) + self.blocks(x)


def test_branch_of_several_factors_is_not_merged():
    torch.manual_seed(0)
    model, x = ParallelLayers(), torch.randn(3, 16)
    report = ksfx.explain(model, x, rewrite="always")
    (refused,) = [c for c in report.chains if not c.rewritten]
    assert "the branch _unsafe_view of the sum add is not a single plain factor" in refused.reason
    assert [c.patterns for c in _rewritten(report)] == [[(1, 4, 4, 4), (4, 4, 4, 1)], [(4, 4, 4, 1)]]
    assert_compiled_matches_eager(model, x, min_launches=3)


class ResidualOf(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return x + self.layer(x)


def test_residual_is_not_a_branch_sum():
    """``x + K(x)``: the identity branch has no weight; the chain is ``K`` alone."""
    torch.manual_seed(0)
    model, x = ResidualOf(MonarchLinear(16, 16, 4, bias=False)), torch.randn(3, 16)
    report = ksfx.explain(model, x, rewrite="always")
    assert [c.patterns for c in report.chains] == [[(1, 4, 4, 4), (4, 4, 4, 1)]]
    assert "aten.add.Tensor" in report.graphs[0].code
    assert_compiled_matches_eager(model, x, min_launches=2)


class ComplementaryBlocks(nn.Module):
    """Block-diagonal plus the complementary off-diagonal blocks: the sum is a dense matrix."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Parameter(torch.randn(2, 4, 4))
        self.off = nn.Parameter(torch.randn(2, 4, 4))
        self.register_buffer("swap", torch.arange(8).reshape(2, 4).flip(0).reshape(-1))

    def forward(self, x):
        xb = x.unflatten(-1, (2, 4))
        diag = torch.einsum("...kp,kqp->...kq", xb, self.blocks).flatten(-2)
        swapped = x[..., self.swap].unflatten(-1, (2, 4))
        return diag + torch.einsum("...kp,kqp->...kq", swapped, self.off).flatten(-2)


def test_sum_that_is_dense_keeps_the_structured_branches():
    torch.manual_seed(0)
    model, x = ComplementaryBlocks(), torch.randn(3, 8)
    report = ksfx.explain(model, x, rewrite="always")
    (refused,) = [c for c in report.chains if not c.rewritten]
    assert refused.reason.endswith("is a dense matrix")
    assert [c.patterns for c in _rewritten(report)] == [[(2, 4, 4, 1)], [(2, 4, 4, 1)]]
    assert_compiled_matches_eager(model, x, min_launches=2)
