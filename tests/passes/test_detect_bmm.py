"""reshape/permute/bmm formulations of general ``(a, b, c, d)`` factors, written by hand.

ksmm-style: the input is read as ``(n, a, c, d)``, ``(a, d)`` moved to the front, one bmm
with ``(a*d, c, b)`` weights, and the inverse shuffle back to ``(n, a*b*d)``; batch-first
with any number of leading dims, and batch-last on ``(in, n)``.
"""

from __future__ import annotations

import pytest
import torch
from ksfx_checks import assert_compiled_matches_eager, rewritten_patterns
from torch import nn

import ksfx

PATTERNS = [(2, 3, 4, 2), (1, 5, 3, 4), (3, 2, 2, 1), (4, 1, 3, 2), (2, 6, 6, 3)]


class BmmFactor(nn.Module):
    """One factor ``(a, b, c, d)`` by bmm; weights stored as ``(a*d, c, b)``."""

    def __init__(self, pattern, batch_last=False):
        super().__init__()
        self.pattern, self.batch_last = pattern, batch_last
        a, b, c, d = pattern
        self.weight = nn.Parameter(torch.randn(a * d, c, b) / c**0.5)

    def forward(self, x):
        a, b, c, d = self.pattern
        if self.batch_last:  # x: (a*c*d, n)
            n = x.shape[-1]
            xs = x.reshape(a, c, d, n).permute(0, 2, 3, 1).reshape(a * d, n, c)
            y = torch.bmm(xs, self.weight)  # (a*d, n, b)
            return y.reshape(a, d, n, b).permute(0, 3, 1, 2).reshape(a * b * d, n)
        lead = x.shape[:-1]
        xs = x.reshape(-1, a, c, d).permute(1, 3, 0, 2).reshape(a * d, -1, c)
        y = torch.bmm(xs, self.weight)  # (a*d, n, b)
        return y.reshape(a, d, -1, b).permute(2, 0, 3, 1).reshape(*lead, a * b * d)


def _values(factor: BmmFactor) -> torch.Tensor:
    a, b, c, d = factor.pattern
    return factor.weight.reshape(a, d, c, b).permute(0, 3, 2, 1)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=str)
def test_single_factor_batch_first(pattern, lead):
    torch.manual_seed(0)
    model = BmmFactor(pattern)
    a, _, c, d = pattern
    x = torch.randn(*lead, a * c * d)
    assert rewritten_patterns(model, x) == [[pattern]]
    assert_compiled_matches_eager(model, x)


@pytest.mark.parametrize("pattern", PATTERNS[:3], ids=str)
def test_single_factor_batch_last(pattern):
    torch.manual_seed(0)
    model = BmmFactor(pattern, batch_last=True)
    a, _, c, d = pattern
    x = torch.randn(a * c * d, 7)
    report = ksfx.explain(model, x, rewrite="always")
    (chain,) = report.chains
    assert chain.rewritten and chain.batch_last and chain.patterns == [pattern]
    assert_compiled_matches_eager(model, x)


def test_chain_of_three_is_one_op_with_exact_values():
    torch.manual_seed(0)
    patterns = [(2, 4, 3, 2), (1, 3, 4, 4), (3, 2, 4, 1)]  # application order: 12 -> 16 -> 12 -> 6
    factors = nn.Sequential(*(BmmFactor(p) for p in patterns))
    x = torch.randn(4, 12)
    (found,) = rewritten_patterns(factors, x)
    assert found == list(reversed(patterns))
    dense = ksfx.Chain.of_factors(found).to_dense([_values(f) for f in reversed(factors)])
    torch.testing.assert_close(factors(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    assert_compiled_matches_eager(factors, x, min_launches=3)


def test_monarch_with_output_shuffle_keeps_one_permutation():
    """Monarch whose result is read back in the other digit order: one permutation stays."""

    class Shuffled(nn.Module):
        def __init__(self, m=4):
            super().__init__()
            self.m = m
            self.w1, self.w2 = nn.Parameter(torch.randn(m, m, m)), nn.Parameter(torch.randn(m, m, m))

        def forward(self, x):
            m = self.m
            h = torch.bmm(x.reshape(-1, m, m).transpose(0, 1), self.w1)  # (m, n, m)
            h = h.transpose(0, 1).transpose(1, 2).reshape(-1, m, m).transpose(0, 1).contiguous()
            return torch.bmm(h, self.w2).transpose(0, 1).reshape(-1, m * m)

    torch.manual_seed(0)
    model, x = Shuffled(), torch.randn(6, 16)
    report = ksfx.explain(model, x, rewrite="always")
    (chain,) = report.chains
    assert chain.rewritten and len(chain.permutations) == 1
    assert_compiled_matches_eager(model, x)


class BlocksFirst(nn.Module):
    """A block-diagonal bmm on an input already laid out as ``(blocks, n, c)``."""

    def __init__(self, blocks: int, b: int, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(blocks, c, b) / c**0.5)

    def forward(self, xs):
        return torch.bmm(xs, self.weight).transpose(0, 1).reshape(xs.shape[1], -1)


def test_transposed_view_input_is_read_in_storage_order():
    """An input ``(blocks, n, c)`` that is a transposed view of batch-first ``(n, blocks, c)``
    storage (what a graph cut between two factors passes on, e.g. at a DDP bucket boundary)
    has its batch digit in the middle: read in storage order it stays a batch digit instead
    of being tied into a pattern that grows with the batch."""
    torch.manual_seed(0)
    model = BlocksFirst(blocks=3, b=2, c=4)
    xs = torch.randn(5, 3, 4).transpose(0, 1)
    assert rewritten_patterns(model, xs) == [[(3, 2, 4, 1)]]
    assert_compiled_matches_eager(model, xs)
    contiguous = xs.contiguous()  # the same values stored blocks-first: the batch sits in the middle
    assert rewritten_patterns(model, contiguous) == [[(15, 2, 4, 1)]]
