"""Permutations by constant index tables (bit reversal, random tables) around KS factors."""

from __future__ import annotations

import torch
from ksfx_checks import assert_compiled_matches_eager
from torch import nn

import ksfx
from ksfx.pattern import DigitPerm, IndexPerm


class PermThenBlocks(nn.Module):
    """``x[..., perm]`` then a block-diagonal einsum: the table becomes a chain step."""

    def __init__(self, perm: torch.Tensor, blocks=4, size=3):
        super().__init__()
        self.register_buffer("perm", perm)
        self.w = nn.Parameter(torch.randn(blocks, size, size))

    def forward(self, x):
        x = x[..., self.perm]
        return torch.einsum("...kp,kqp->...kq", x.unflatten(-1, self.w.shape[::2]), self.w).flatten(-2)


def _steps(report):
    (chain,) = report.chains
    return chain.plan.chain.steps


def test_random_table_is_an_index_permutation():
    torch.manual_seed(0)
    model = PermThenBlocks(torch.randperm(12))
    x = torch.randn(2, 5, 12)
    report = ksfx.explain(model, x, rewrite="always")
    steps = _steps(report)
    assert [s.as_tuple() for s in report.chains[0].plan.chain.patterns] == [(4, 3, 3, 1)]
    assert isinstance(steps[-1], IndexPerm) and torch.equal(steps[-1].indices(), model.perm)
    assert_compiled_matches_eager(model, x)


def test_bit_reversal_becomes_digit_arithmetic():
    n = 8
    bitrev = torch.tensor([int(f"{k:03b}"[::-1], 2) for k in range(n)])
    model = PermThenBlocks(bitrev, blocks=4, size=2)
    x = torch.randn(3, n)
    steps = _steps(ksfx.explain(model, x, rewrite="always"))
    assert isinstance(steps[-1], DigitPerm)
    assert_compiled_matches_eager(model, x)


def test_table_that_is_not_a_permutation_stays_outside():
    torch.manual_seed(0)
    table = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # repeats an entry
    model = PermThenBlocks(table)
    x = torch.randn(3, 12)
    report = ksfx.explain(model, x, rewrite="always")
    (chain,) = [c for c in report.chains if c.rewritten]
    assert chain.patterns == [(4, 3, 3, 1)] and not chain.permutations
    assert_compiled_matches_eager(model, x)
