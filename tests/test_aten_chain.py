"""The chain as aten ops (what the backend inlines on a CPU) vs dense products, and inside a compiled graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ksfx
from ksfx.backend import KsfxCompiler, lowerings
from ksfx.ops.aten_chain import SMALL_BLOCK, as_buffer, chain_as_aten
from ksfx.pattern import Chain, DigitPerm, IndexPerm, KSPattern
from tests.test_ks_matmul import CHAINS, dense_of, random_factors, rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _chain(patterns) -> Chain:
    return Chain(tuple(KSPattern(*p) for p in patterns))


@pytest.mark.parametrize("chain", CHAINS + [[(1, 8, 8, 2), (2, 8, 8, 1)]], ids=str)  # 64-entry blocks: bmm
@pytest.mark.parametrize("batch_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dense(chain, batch_last, dtype):
    factors = random_factors(chain, dtype)
    dense = dense_of(factors)
    bias = torch.randn(dense.shape[0], dtype=dtype)
    x = torch.randn(7, dense.shape[1], dtype=dtype)
    xin = x.T.contiguous() if batch_last else x
    y = chain_as_aten(xin, factors, _chain(chain).to_spec(), batch_last, bias, 0)
    assert rel_err(y.T if batch_last else y, x @ dense.T + bias) < TOL[dtype]


def test_both_formulations_are_covered():
    sizes = [p[1] * p[2] for chain in CHAINS for p in chain]
    assert min(sizes) <= SMALL_BLOCK < 64


@pytest.mark.parametrize("batch_last", [False, True])
def test_permutations_and_nonfinite_inputs_as_the_op(batch_last):
    perm_mid = IndexPerm(tuple(torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()))
    chain = Chain(
        (DigitPerm((2, 3), (1, 0)), KSPattern(2, 3, 4, 1), perm_mid, KSPattern(1, 4, 2, 2), DigitPerm((2, 2), (1, 0)))
    )
    factors = random_factors([(2, 3, 4, 1), (1, 4, 2, 2)], torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    x[0, 1], x[2, 2] = float("inf"), float("nan")
    xin = x.T.contiguous() if batch_last else x
    for dense in (0, 1, 3):
        want = torch.ops.ksfx.ks_chain(xin, factors, chain.to_spec(), batch_last, None, dense)
        got = chain_as_aten(xin, factors, chain.to_spec(), batch_last, None, dense)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert want.isnan().any() and not want.isnan().all()
    finite = torch.randn(4, 5, dtype=torch.float64) if batch_last else torch.randn(5, 4, dtype=torch.float64)
    y_ref = torch.ops.ksfx.ks_chain(finite, factors, chain.to_spec(), batch_last, None, 0)
    torch.testing.assert_close(chain_as_aten(finite, factors, chain.to_spec(), batch_last, None, 0), y_ref)


class MonarchMLP(nn.Module):
    """LayerNorm, a Monarch bmm layer, GELU and a residual: the ops Inductor fuses around the chain."""

    def __init__(self, m: int = 8):  # 8x8 blocks: above SMALL_BLOCK, batched matmuls
        super().__init__()
        self.m, self.ln = m, nn.LayerNorm(m * m)
        self.w1 = nn.Parameter(torch.randn(m, m, m) / m**0.5)
        self.w2 = nn.Parameter(torch.randn(m, m, m) / m**0.5)

    def forward(self, x):
        m, lead = self.m, x.shape[:-1]
        h = torch.bmm(self.ln(x).reshape(-1, m, m).transpose(0, 1), self.w1.transpose(-1, -2))
        h = h.transpose(0, 1).reshape(-1, m, m).permute(2, 0, 1)
        y = torch.bmm(h, self.w2.transpose(-1, -2)).permute(1, 2, 0).reshape(*lead, m * m)
        return x + torch.nn.functional.gelu(y)


@pytest.mark.parametrize("cpu", ["aten", "op"])
def test_compiled_graph_holds_the_chain_as_aten_ops(cpu):
    torch.manual_seed(0)
    model, graphs = MonarchMLP(), []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=KsfxCompiler(rewrite="always", inner=inner, cpu=cpu))
    x = torch.randn(2, 3, 64, requires_grad=True)
    ksfx.stats(reset=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.ksfx.ks_chain.default]
    assert len(calls) == (1 if cpu == "op" else 0)
    assert (sum(ksfx.stats().values()) > 0) == (cpu == "op")
    if cpu == "aten":
        assert sum(n.target is torch.ops.aten.bmm.default for n in graph.graph.nodes) == 2


def test_training_through_inductor_matches_eager():
    torch.manual_seed(0)
    model = MonarchMLP()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ksfx.backend(rewrite="always"))
    x = torch.randn(6, 64)
    grads = []
    for run in (model, compiled):
        xi = x.clone().requires_grad_()
        y = run(xi)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append([xi.grad.clone(), *(p.grad.clone() for p in model.parameters())])
        model.zero_grad()
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_as_buffer_is_a_copy_with_an_identity_gradient():
    t = torch.randn(4, 6, dtype=torch.float64).t().requires_grad_()
    stored = as_buffer(t)
    assert torch.equal(stored, t) and stored.data_ptr() != t.data_ptr()
    probe = torch.randn(6, 4, dtype=torch.float64)
    (stored * probe).sum().backward()
    assert torch.equal(t.grad, probe)


def test_inductor_lowers_as_buffer_to_a_stored_buffer():
    """The layout move after a d = 2 factor, batch-first, then GELU: the op is lowered
    (no call to it is left in the generated code) and forward and backward equal eager."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    chain = _chain([(1, 8, 4, 2), (2, 4, 8, 1)])
    factors = [f.requires_grad_() for f in random_factors([(1, 8, 4, 2), (2, 4, 8, 1)], torch.float32)]
    x = torch.randn(33, chain.in_features, requires_grad=True)

    def block(x, f0, f1):
        return torch.nn.functional.gelu(chain_as_aten(x, [f0, f1], chain.to_spec(), False, None, 0)) + x

    lowerings.register()  # as the backend does before it runs Inductor
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="inductor")
    y, code = run_and_get_code(compiled, x, *factors)
    assert not any("as_buffer.default" in c for c in code)
    want = block(x, *factors)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), [x, *factors])
    expected = torch.autograd.grad(want.square().sum(), [x, *factors])
    for got, ref in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_bad_cpu_option():
    with pytest.raises(ValueError, match="cpu must be one of"):
        ksfx.backend(cpu="mkl")
