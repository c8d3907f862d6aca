"""Mixed precision: under ``torch.autocast`` the bmm operands are cast right before the product.

The activation's cast (``_to_copy(x, dtype=bf16)``) sits after the reshape/permute into the
bmm layout. The pass follows it as part of the chain (the op then runs on the cast input,
as the original products did); before, the cast cut the chain and the batch digits ended
up between feature digits, folded into huge tied factors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ksfx_checks import compile_ks
from torch import nn

import ksfx
from examples.ks_models import BmmKSLinear, monarch_patterns

PATTERNS = monarch_patterns(16, 32, 4)  # 16 -> 32, leftmost first
BF16 = {"rtol": 2e-2, "atol": 2e-2}


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_autocast_chain_keeps_its_batch_digits():
    torch.manual_seed(0)
    model, x = BmmKSLinear(PATTERNS), torch.randn(2, 8, 16)
    with autocast():
        (chain,) = ksfx.explain(model, x, rewrite="always").chains
    assert chain.rewritten and chain.patterns == list(PATTERNS), chain.reason
    assert "reproduces" in chain.verification


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_autocast_compiled_matches_eager(train):
    torch.manual_seed(0)
    model = BmmKSLinear(PATTERNS)
    compiled = compile_ks(model)
    x = torch.randn(2, 8, 16, requires_grad=train)
    with autocast():
        expected = model(x)
        ksfx.stats(reset=True)
        actual = compiled(x)
    assert ksfx.stats().get("cpu.forward", 0) == 2, ksfx.stats()
    assert actual.dtype == expected.dtype  # bf16 products, fp32 bias add: promoted as in eager
    torch.testing.assert_close(actual.float(), expected.float(), **BF16)
    if train:
        params = [x, *model.parameters()]
        got = torch.autograd.grad(actual.float().square().sum(), params)
        want = torch.autograd.grad(expected.float().square().sum(), params)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **BF16)


class CastBetweenFactors(nn.Module):
    """User code that computes the second factor in fp32 again: two chains, one dtype each."""

    def __init__(self):
        super().__init__()
        self.first, self.second = BmmKSLinear([PATTERNS[1]], bias=False), BmmKSLinear([PATTERNS[0]], bias=False)

    def forward(self, x):
        return self.second(self.first(x.bfloat16()).float())


def test_cast_between_factors_splits_the_chain():
    torch.manual_seed(0)
    model, x = CastBetweenFactors(), torch.randn(3, 16)
    model.first.bfloat16()
    reports = ksfx.explain(model, x, rewrite="always").chains
    assert sorted(c.patterns for c in reports if c.rewritten) == sorted([[PATTERNS[1]], [PATTERNS[0]]])
    torch.testing.assert_close(compile_ks(model)(x), model(x), **BF16)


def test_autocast_masked_linear():
    torch.manual_seed(0)
    mask = ksfx.KSPattern(4, 2, 4, 2).support().float()
    weight = nn.Parameter(torch.randn(16, 32))
    x = torch.randn(5, 32)

    def fn(x):
        return F.linear(x, weight * mask)

    compiled = compile_ks(fn)
    with autocast():
        ksfx.stats(reset=True)
        actual, expected = compiled(x), fn(x)
    assert ksfx.stats().get("cpu.forward", 0) == 1, ksfx.stats()
    torch.testing.assert_close(actual.float(), expected.float(), **BF16)
