"""A bias in the middle of a chain: the chain is split there, each segment a KS op with its bias.

``K2 (K1 x + b1)`` is two ops: the first takes ``b1`` as its epilogue, the second starts
at the bias ``add`` (the views between them belong to the second segment, read from its
own root, so a symbolic batch never becomes a feature digit). A tensor added in the middle
that depends on the batch digits is no bias: it stays an op of its own between the chains.
"""

from __future__ import annotations

import torch
from ksfx_checks import assert_compiled_matches_eager, compile_ks
from torch import nn

import ksfx
from ksfx.backend import KsfxCompiler
from ksfx.pattern import IndexPerm
from tests.realworld.layers import BlockdiagLinear, MonarchLinear

STACK = [[(1, 8, 4, 4), (4, 4, 4, 1)], [(1, 4, 4, 4), (4, 4, 8, 1)]]


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(MonarchLinear(16, 32, 4), MonarchLinear(32, 16, 4))


def _rewritten(report):
    return [c for c in report.chains if c.rewritten]


def test_each_segment_takes_its_bias():
    model = _stack()
    report = ksfx.explain(model, torch.randn(3, 16), rewrite="always")
    first, second = _rewritten(report)
    assert [first.patterns, second.patterns] == STACK
    assert first.plan.bias is not None and second.plan.bias is not None
    assert second.root == first.end  # the second segment starts at the first bias add
    assert "aten.add" not in report.graphs[0].code


def test_bias_between_chains_with_a_dynamic_batch():
    """Read from its bmm layout, the second chain would tie the symbolic batch as a feature."""
    model = _stack()
    report = ksfx.explain(model, torch.randn(3, 5, 16), rewrite="always", dynamic=True)
    assert [c.patterns for c in _rewritten(report)] == STACK
    reports = []
    torch._dynamo.reset()
    backend = KsfxCompiler(rewrite="always", inner="aot_eager", reports=reports, cpu="op")
    compiled = torch.compile(model, backend=backend)
    for batch in (3, 5, 2):
        x = torch.randn(batch, 7, 16)
        ksfx.stats(reset=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert ksfx.stats().get("cpu.forward", 0) >= 2
    assert all(c.rewritten for r in reports for c in r.chains)


class BiasThenTable(nn.Module):
    """Block-diagonal linear with bias, a constant index permutation, another block-diagonal linear."""

    def __init__(self):
        super().__init__()
        self.first = BlockdiagLinear(12, 12, 3)
        self.register_buffer("perm", torch.randperm(12))
        self.second = BlockdiagLinear(12, 8, 2, bias=False)

    def forward(self, x):
        return self.second(self.first(x)[..., self.perm])


def test_permutation_after_a_bias_starts_the_next_segment():
    torch.manual_seed(0)
    model, x = BiasThenTable(), torch.randn(2, 5, 12)
    report = ksfx.explain(model, x, rewrite="always")
    first, second = _rewritten(report)
    assert first.patterns == [(3, 4, 4, 1)] and first.plan.bias is not None
    assert second.patterns == [(2, 4, 6, 1)] and second.plan.bias is None
    assert torch.equal(second.plan.chain.steps[-1].indices(), model.perm)
    assert isinstance(second.plan.chain.steps[-1], IndexPerm)
    assert_compiled_matches_eager(model, x, min_launches=2)


class PositionalBetween(nn.Module):
    """ViT-style: a per-token embedding ``(tokens, dim)`` added between two KS layers."""

    def __init__(self, tokens=5, dim=16):
        super().__init__()
        self.proj = BlockdiagLinear(dim, dim, 4, bias=False)
        self.pos = nn.Parameter(torch.randn(tokens, dim))
        self.mix = MonarchLinear(dim, dim, 4)

    def forward(self, x):
        return self.mix(self.proj(x) + self.pos)


def test_per_token_tensor_is_no_bias():
    torch.manual_seed(0)
    model, x = PositionalBetween(), torch.randn(2, 5, 16)
    report = ksfx.explain(model, x, rewrite="always")
    first, second = _rewritten(report)
    assert first.patterns == [(4, 4, 4, 1)] and first.plan.bias is None
    assert first.stopped.endswith("bias depends on batch digits")
    assert second.patterns == [(1, 4, 4, 4), (4, 4, 4, 1)] and second.root == "add"
    assert "aten.add.Tensor(reshape" in report.graphs[0].code  # the embedding add stays between the ops
    assert_compiled_matches_eager(model, x, min_launches=2)


class ShiftedByInput(nn.Module):
    """A per-row shift computed from the input itself: an activation, never a bias."""

    def __init__(self):
        super().__init__()
        self.first = BlockdiagLinear(16, 16, 4, bias=False)
        self.second = BlockdiagLinear(16, 16, 2, bias=False)

    def forward(self, x):
        return self.second(self.first(x) + x.mean(-1, keepdim=True))


def test_activation_shift_is_no_bias():
    torch.manual_seed(0)
    model, x = ShiftedByInput(), torch.randn(6, 16)
    report = ksfx.explain(model, x, rewrite="always")
    assert [(c.patterns, c.plan.bias) for c in _rewritten(report)] == [([(4, 4, 4, 1)], None), ([(2, 8, 8, 1)], None)]
    compiled = compile_ks(model)
    assert_compiled_matches_eager(model, x, compiled=compiled, min_launches=2)
