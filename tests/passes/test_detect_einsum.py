"""einsum formulations (torch.einsum and einops, batch-first and batch-last) written by hand."""

from __future__ import annotations

import pytest
import torch
from einops import einsum, rearrange
from ksfx_checks import assert_compiled_matches_eager, rewritten_patterns
from torch import nn


class EinsumChain(nn.Module):
    """``y = K_1 ⋯ K_L x``; ``patterns`` leftmost first, factors stored as ``(a, b, c, d)``."""

    def __init__(self, patterns, style="torch", batch_last=False):
        super().__init__()
        self.patterns, self.style, self.batch_last = patterns, style, batch_last
        self.values = nn.ParameterList(nn.Parameter(torch.randn(*p) / p[2] ** 0.5) for p in patterns)

    def forward(self, x):
        for w in reversed(self.values):
            a, b, c, d = w.shape
            if self.style == "einops" and not self.batch_last:
                x = rearrange(x, "... (a c d) -> ... a c d", a=a, c=c)
                x = rearrange(einsum(x, w, "... a c d, a b c d -> ... a b d"), "... a b d -> ... (a b d)")
            elif self.style == "einops":
                x = rearrange(x, "(a c d) n -> a c d n", a=a, c=c)
                x = rearrange(einsum(x, w, "a c d n, a b c d -> a b d n"), "a b d n -> (a b d) n")
            elif self.batch_last:
                x = torch.einsum("acdn,abcd->abdn", x.reshape(a, c, d, -1), w).reshape(a * b * d, -1)
            else:
                x = torch.einsum("...acd,abcd->...abd", x.unflatten(-1, (a, c, d)), w).flatten(-3)
        return x


CHAINS = [[(2, 3, 4, 2)], [(1, 4, 3, 4), (2, 3, 4, 2)], [(3, 2, 2, 1), (1, 2, 3, 3), (3, 3, 1, 1)]]


@pytest.mark.parametrize("patterns", CHAINS, ids=str)
@pytest.mark.parametrize("style", ["torch", "einops"])
def test_batch_first(patterns, style):
    torch.manual_seed(0)
    model = EinsumChain(patterns, style)
    x = torch.randn(2, 3, model.values[-1].shape[0] * model.values[-1].shape[2] * model.values[-1].shape[3])
    assert rewritten_patterns(model, x) == [patterns]
    assert_compiled_matches_eager(model, x)


@pytest.mark.parametrize("style", ["torch", "einops"])
def test_batch_last(style):
    torch.manual_seed(0)
    patterns = [(2, 4, 4, 2), (4, 2, 2, 2)]
    model = EinsumChain(patterns, style, batch_last=True)
    x = torch.randn(16, 5)
    assert rewritten_patterns(model, x) == [patterns]
    assert_compiled_matches_eager(model, x)


def test_three_operand_einsum_two_factors():
    """One einsum holding both Monarch factors (``'nkp,kqp,lsk->nsl'`` style)."""

    class ThreeOperand(nn.Module):
        def __init__(self, m=3):
            super().__init__()
            self.m = m
            self.w1 = nn.Parameter(torch.randn(m, m, m))  # (k, q, p): block k maps p -> q
            self.w2 = nn.Parameter(torch.randn(m, m, m))  # (q, l, k): block q maps k -> l

        def forward(self, x):
            y = torch.einsum("nkp,kqp,qlk->nlq", x.unflatten(-1, (self.m, self.m)), self.w1, self.w2)
            return y.flatten(-2)

    torch.manual_seed(0)
    model, x = ThreeOperand(), torch.randn(4, 9)
    (found,) = rewritten_patterns(model, x)
    assert len(found) == 2 and all(a * d == 3 for a, _, _, d in found)
    assert_compiled_matches_eager(model, x)
