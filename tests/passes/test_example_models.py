"""The example models (KS-ViT, GPT-2 with KS MLPs), in small configurations.

Every KS projection is found as its 2-factor chain and rewritten with
``rewrite="always"``; the dense projections (attention out-projection, classifier, LM
head, GPT-2's QKV) are dense factors left to the inner compiler; the compiled model
equals eager, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from ksfx_checks import TOL, compile_ks

import ksfx
from examples.ks_models import KSGPT2, GPT2Config, KSViT, ViTConfig, gpt2_inputs, monarch_patterns, vit_inputs

VIT = ViTConfig(
    image_size=32,
    patch_size=16,
    dim=32,
    depth=1,
    heads=2,
    num_classes=10,
    qkv=((1, 16, 8, 2), (2, 8, 16, 1)),
    mlp_up=((1, 64, 16, 2), (2, 16, 16, 1)),
    mlp_down=((1, 16, 16, 2), (2, 16, 64, 1)),
)
GPT2 = GPT2Config(
    vocab_size=64,
    seq_len=8,
    dim=32,
    depth=1,
    heads=2,
    mlp_up=monarch_patterns(32, 128, 4),
    mlp_down=monarch_patterns(128, 32, 4),
)


def _vit():
    return KSViT(VIT), vit_inputs(VIT, batch=2)[0], [list(VIT.qkv)] * 3 + [list(VIT.mlp_up), list(VIT.mlp_down)]


def _gpt2():
    return KSGPT2(GPT2), gpt2_inputs(GPT2, batch=2)[0], [list(GPT2.mlp_up), list(GPT2.mlp_down)]


MODELS = {"vit": _vit, "gpt2": _gpt2}


@pytest.mark.parametrize("name", MODELS)
def test_ks_chains_found_dense_left_alone(name):
    torch.manual_seed(0)
    model, x, expected = MODELS[name]()
    report = ksfx.explain(model, x, rewrite="always")
    assert not any(graph.note for graph in report.graphs)
    assert [chain.patterns for chain in report.chains if chain.rewritten] == expected
    for chain in report.chains:
        if not chain.rewritten:
            assert len(chain.patterns) == 1 and chain.patterns[0][0] == chain.patterns[0][3] == 1, chain
            assert "dense" in chain.reason


@pytest.mark.parametrize("name", MODELS)
def test_compiled_matches_eager_forward_backward(name):
    torch.manual_seed(0)
    model, x, expected = MODELS[name]()
    compiled = compile_ks(model)
    ksfx.stats(reset=True)
    actual, reference = compiled(x), model(x)
    launches = sum(v for k, v in ksfx.stats().items() if k.endswith(".forward"))
    assert launches == sum(len(chain) for chain in expected)
    torch.testing.assert_close(actual, reference, **TOL[torch.float32])
    weights = torch.linspace(-1, 1, actual.numel()).reshape(actual.shape)
    params = list(model.parameters())
    got = torch.autograd.grad((actual * weights).sum(), params)
    want = torch.autograd.grad((reference * weights).sum(), params)
    for (pname, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m, n=pname: f"{n}: {m}")
