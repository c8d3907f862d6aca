"""Digits no weight depends on are batch digits: dense layers stay dense.

``nn.Linear`` applied to an activation of shape ``(B, T, D)`` mixes only ``D``. When the
activation is a transposed view (an attention output ``(B, H, T, hd)`` read as
``(B, T, H*hd)``), the token digit sits between feature digits of the untransposed
tensor; it must still be recognised as a batch digit, so the layer is the dense factor
``(1, out, in, 1)`` and is left to the inner compiler in every mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ksfx_checks import TOL, compile_ks
from torch import nn

import ksfx
from examples.ks_models import BmmKSLinear, monarch_patterns

DIM, HEADS, HIDDEN = 32, 2, 64
UP, DOWN = monarch_patterns(DIM, HIDDEN, 4), monarch_patterns(HIDDEN, DIM, 4)


class DenseAttentionKSMLP(nn.Module):
    """A ViT block: dense QKV and out-projection around attention, then a KS (Monarch) MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.up, self.down = BmmKSLinear(UP), BmmKSLinear(DOWN)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd), stored as (B, T, H, hd)
        x = x + self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.down(F.gelu(self.up(x)))


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_dense_projections_are_dense_only_ks_chains_rewritten(mode):
    torch.manual_seed(0)
    model, x = DenseAttentionKSMLP(), torch.randn(2, 5, DIM)
    report = ksfx.explain(model, x, rewrite=mode)
    found = [chain.patterns for chain in report.chains if chain.plan is not None]
    assert found == [[(1, 3 * DIM, DIM, 1)], [(1, DIM, DIM, 1)], list(UP), list(DOWN)]
    dense = [chain for chain in report.chains if len(chain.patterns) == 1]
    assert all(not chain.rewritten and "dense" in chain.reason for chain in dense)
    # the out-projection reads the transposed view: its rows are (B, T), nothing is tied
    assert dense[1].root.startswith("transpose") and dense[1].permutations == []
    rewritten = [chain.patterns for chain in report.chains if chain.rewritten]
    # auto on CPU rewrites the KS chains: they are inlined as aten ops for Inductor
    assert rewritten == ([] if mode == "never" else [list(UP), list(DOWN)])
    if mode == "auto":
        assert all("inlined as aten ops" in chain.reason for chain in report.chains if len(chain.patterns) == 2)


def test_dense_block_compiled_matches_eager():
    torch.manual_seed(0)
    model, x = DenseAttentionKSMLP(), torch.randn(2, 5, DIM)
    compiled = compile_ks(model)
    ksfx.stats(reset=True)
    x_comp = x.clone().requires_grad_()
    x_eager = x.clone().requires_grad_()
    actual, expected = compiled(x_comp), model(x_eager)
    assert sum(v for k, v in ksfx.stats().items() if k.endswith(".forward")) == 4  # two 2-factor chains
    torch.testing.assert_close(actual, expected, **TOL[torch.float32])
    params = list(model.parameters())
    got = torch.autograd.grad(actual.square().sum(), [x_comp, *params])
    want = torch.autograd.grad(expected.square().sum(), [x_eager, *params])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


class KSOutProjection(nn.Module):
    """Dense QKV, attention, then a KS (Monarch) out-projection on the transposed output."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = BmmKSLinear(monarch_patterns(DIM, DIM, 4))

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, HEADS, dim // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def test_ks_out_projection_with_symbolic_tokens():
    """From the attention output the token digit would be a symbolic feature digit (not
    plannable); from the transposed view it is a batch digit and the KS chain is found."""
    torch.manual_seed(0)
    model = KSOutProjection()
    report = ksfx.explain(model, torch.randn(2, 5, DIM), rewrite="always", dynamic=True)
    chains = [(chain.patterns, chain.rewritten) for chain in report.chains]
    assert chains == [([(1, 3 * DIM, DIM, 1)], False), (list(monarch_patterns(DIM, DIM, 4)), True)]
    assert report.chains[1].root.startswith("transpose")
    compiled = torch.compile(model, backend=ksfx.backend(rewrite="always", inner="aot_eager", cpu="op"), dynamic=True)
    torch._dynamo.reset()
    for shape in ((2, 5, DIM), (3, 7, DIM)):
        x = torch.randn(shape)
        ksfx.stats(reset=True)
        actual = compiled(x)
        assert sum(v for k, v in ksfx.stats().items() if k.endswith(".forward")) == 2
        torch.testing.assert_close(actual, model(x), **TOL[torch.float32])
