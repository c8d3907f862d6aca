"""Monarch inside an ``autograd.Function`` with ``bmm(..., out=<transposed view>)``.

Made traceable with ``make_traceable`` (see test_graph_breaks.py), the Function's forward
reaches the pass: the out= products into fresh scratch are plain products. Its custom
backward would be replaced by autograd of the forward ops, so the pass rewrites such
graphs for inference only and says why in training.
"""

from __future__ import annotations

import torch
from ksfx_checks import compile_ks

import ksfx
from ksfx.backend import KsfxCompiler
from ksfx.passes.graph_breaks import make_traceable
from tests.realworld import layers
from tests.realworld.zoo import ZOO_BY_NAME


class _Apply(torch.nn.Module):
    def __init__(self, fn_cls, monarch):
        super().__init__()
        self.fn_cls, self.monarch = fn_cls, monarch

    def forward(self, x):
        return self.fn_cls.apply(x, self.monarch.blkdiag1, self.monarch.blkdiag2) + self.monarch.bias


def _model():
    fn_cls = type("MonarchOutFnForPass", (layers.BlockdiagButterflyOutFn,), {})
    make_traceable(fn_cls)
    monarch, x = ZOO_BY_NAME["monarch_autograd_out"].make()
    return _Apply(fn_cls, monarch), x, ZOO_BY_NAME["monarch_autograd_out"].expected_patterns


def test_inference_is_rewritten_and_matches_eager():
    model, x, expected = _model()
    assert [c.patterns for c in ksfx.explain(model, x, rewrite="always").chains if c.rewritten] == expected
    compiled = compile_ks(model)
    with torch.no_grad():
        ksfx.stats(reset=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert ksfx.stats().get("cpu.forward", 0) == 2


def test_training_keeps_the_custom_backward():
    model, x, _ = _model()
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=KsfxCompiler(rewrite="always", inner="aot_eager", reports=reports))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa), model(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    (chain,) = [c for r in reports for c in r.chains]
    assert not chain.rewritten and "custom backward" in chain.reason
