"""Masked dense weights (``F.linear(x, w * mask)``) and frozen dense weights with a KS support.

The support is read from the mask's (or frozen weight's) values at compile time, so it is
guarded: a later change that keeps zeros zero is honoured by the rewritten graph, a change
that adds nonzeros outside the support falls back to the original graph with a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from ksfx_checks import assert_compiled_matches_eager, compile_ks, rewritten_patterns
from torch import nn

import ksfx
from ksfx.pattern import KSPattern


class Masked(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.linear(x, self.linear.weight * self.mask, self.linear.bias)


@pytest.mark.parametrize("pattern", [(2, 3, 4, 2), (4, 2, 2, 1), (1, 3, 4, 3)], ids=str)
def test_ks_mask_found_with_identity_permutations(pattern):
    torch.manual_seed(0)
    model = Masked(KSPattern(*pattern).support().float())
    x = torch.randn(3, 5, model.mask.shape[1])
    assert rewritten_patterns(model, x) == [[pattern]]
    assert_compiled_matches_eager(model, x)


def test_permuted_ks_mask_found_with_permutations():
    torch.manual_seed(0)
    pattern = KSPattern(3, 2, 4, 2)
    rows, cols = torch.randperm(pattern.shape[0]), torch.randperm(pattern.shape[1])
    model = Masked(pattern.support()[rows][:, cols].float())
    x = torch.randn(7, pattern.shape[1])
    report = ksfx.explain(model, x, rewrite="always")
    (chain,) = report.chains
    assert chain.rewritten and len(chain.patterns) == 1
    a, b, c, d = chain.patterns[0]
    assert (a * d, b, c) == (6, 2, 4) and chain.permutations
    assert_compiled_matches_eager(model, x)


def test_non_ks_mask_is_left_alone():
    model = Masked(torch.ones(8, 8).triu())
    x = torch.randn(3, 8)
    report = ksfx.explain(model, x, rewrite="always")
    assert not any(c.rewritten for c in report.chains)
    assert any("not Kronecker-sparse" in c.reason for c in report.chains)


def test_mask_change_inside_support_is_honoured_and_outside_falls_back():
    torch.manual_seed(0)
    model = Masked(KSPattern(2, 3, 4, 2).support().float())
    x = torch.randn(4, 16)
    compiled = compile_ks(model)
    torch.testing.assert_close(compiled(x), model(x))
    with torch.no_grad():
        model.mask[0, 0] = 0.0  # shrink: still within the compiled support
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(compiled(x), model(x))
    with torch.no_grad():
        model.mask.fill_(1.0)  # grow: the compiled chain would be wrong
    with pytest.warns(RuntimeWarning, match="invalidates a rewritten KS chain"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))


def test_frozen_dense_weight_with_ks_zeros():
    torch.manual_seed(0)
    pattern = KSPattern(2, 4, 3, 2)
    linear = nn.Linear(pattern.in_features, pattern.out_features, bias=False)
    with torch.no_grad():
        linear.weight.mul_(pattern.support())
    linear.weight.requires_grad_(False)
    x = torch.randn(5, pattern.in_features)
    assert rewritten_patterns(linear, x) == [[pattern.as_tuple()]]
    compiled = compile_ks(linear)
    torch.testing.assert_close(compiled(x), linear(x))
    with torch.no_grad():
        linear.weight.fill_(0.5)  # no longer KS: must not be computed with the old support
    with pytest.warns(RuntimeWarning):
        torch.testing.assert_close(compiled(x), linear(x))


def test_trainable_dense_weight_is_dense():
    linear = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        linear.weight.mul_(KSPattern(2, 4, 4, 1).support())
    assert rewritten_patterns(linear, torch.randn(3, 8)) == []


class _MaskParametrization(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight):
        return weight * self.mask


@pytest.mark.parametrize("api", ["parametrize", "prune"])
def test_masks_applied_by_torch_utilities(api):
    """The two library ways to mask an ``nn.Linear``: a parametrization, and ``torch.nn.utils.prune``
    (``weight = weight_orig * weight_mask`` recomputed by a forward pre-hook)."""
    torch.manual_seed(0)
    support = KSPattern(4, 2, 4, 2).support()
    layer = nn.Linear(32, 16)
    if api == "parametrize":
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", _MaskParametrization(support.float()))
    else:
        torch.nn.utils.prune.custom_from_mask(layer, "weight", support)
    x = torch.randn(5, 32)
    assert rewritten_patterns(layer, x, rewrite="auto") == [[(4, 2, 4, 2)]]
    assert_compiled_matches_eager(layer, x)
