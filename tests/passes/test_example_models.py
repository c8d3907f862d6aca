"""The example models (KS-ViT with the paper's patterns, GPT-2 with KS MLPs), one block each.

Every KS projection is found as its 2-factor chain and rewritten with
``rewrite="always"``; the dense projections (attention out-projection, classifier, LM
head, GPT-2's QKV) are dense factors left to the inner compiler; the compiled model
equals eager, forward and backward.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from ksfx_checks import TOL, compile_ks

import ksfx
from examples import ks_models

VIT = replace(ks_models.VIT_SMALL, image_size=32, depth=1)  # 5 tokens
GPT2 = replace(ks_models.GPT2_SMALL, vocab_size=64, seq_len=8, depth=1)
MODELS = {"vit": lambda: ks_models.small_vit(VIT, batch=2), "gpt2": lambda: ks_models.small_gpt2(GPT2, batch=2)}


def ks_chains(model: torch.nn.Module) -> list[list[tuple[int, int, int, int]]]:
    """The patterns of each KS layer, leftmost first, in the order the forward applies the layers."""
    return [list(m.patterns) for m in model.modules() if isinstance(m, ks_models.BmmKSLinear)]


@pytest.mark.parametrize("name", MODELS)
def test_ks_chains_found_dense_left_alone(name):
    model, (x,) = MODELS[name]()
    report = ksfx.explain(model, x, rewrite="always")
    assert not any(graph.note for graph in report.graphs)
    assert [chain.patterns for chain in report.chains if chain.rewritten] == ks_chains(model)
    for chain in report.chains:
        if not chain.rewritten:
            assert len(chain.patterns) == 1 and chain.patterns[0][0] == chain.patterns[0][3] == 1, chain
            assert "dense" in chain.reason


@pytest.mark.parametrize("name", MODELS)
def test_compiled_matches_eager_forward_backward(name):
    model, (x,) = MODELS[name]()
    compiled = compile_ks(model)
    ksfx.stats(reset=True)
    actual, reference = compiled(x), model(x)
    launches = sum(v for k, v in ksfx.stats().items() if k.endswith(".forward"))
    assert launches == sum(len(chain) for chain in ks_chains(model))
    torch.testing.assert_close(actual, reference, **TOL[torch.float32])
    weights = torch.linspace(-1, 1, actual.numel()).reshape(actual.shape)
    params = list(model.parameters())
    got = torch.autograd.grad((actual * weights).sum(), params)
    want = torch.autograd.grad((reference * weights).sum(), params)
    for (pname, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m, n=pname: f"{n}: {m}")
