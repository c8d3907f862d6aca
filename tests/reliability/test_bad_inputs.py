"""Bad inputs and odd graphs through ``torch.compile(backend=ksfx.backend(rewrite="always"))``.

The reference is always eager PyTorch on the same module: the compiled model computes
what eager computes, raises where eager raises, or (where the pass cannot prove a
rewrite safe) keeps the original ops and says why in the report ``explain`` prints.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ksfx
from tests.reliability.compare import TOL, assert_same, compile_ks
from tests.reliability.models import Factor, ModelSpec, RandomKSModel, ks_support

#: (2,3,4,2) then (3,2,4,1): 16 -> 12 -> 6, einsum then bmm.
TWO_FACTORS = ModelSpec((Factor((2, 3, 4, 2), "einsum"), Factor((3, 2, 4, 1), "bmm")), 16, False)
#: F.linear(x, w * mask, b) with a (2,3,4,2) mask: 16 -> 12.
MASKED = ModelSpec((Factor((2, 3, 4, 2), "masked", bias=True),), 16, False)


def model_of(spec: ModelSpec, dtype=torch.float32) -> RandomKSModel:
    return RandomKSModel(spec, torch.Generator().manual_seed(0), dtype)


def launches() -> int:
    return sum(v for k, v in ksfx.stats().items() if k.endswith(".forward"))


def chains_of(reports):
    return [chain for graph in reports for chain in graph.chains]


# ----------------------------------------------------------------------------- wrong inputs
@pytest.mark.parametrize("width", [12, 32])
def test_wrong_width_after_compiling_raises_like_eager(width):
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), model(x), **TOL[torch.float32])
    bad = torch.randn(3, width)
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        model(bad)
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        compiled(bad)
    torch.testing.assert_close(compiled(x), model(x), **TOL[torch.float32])  # still right afterwards


class FlexibleRows(nn.Module):
    """User code that reshapes with ``-1``: a wider input is read as more rows, not an error."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3, 4, 2))

    def forward(self, x):
        return torch.einsum("nacd,abcd->nabd", x.reshape(-1, 2, 4, 2), self.w).reshape(-1, 12)


def test_width_that_eager_reads_as_more_rows_recompiles_to_eager_semantics():
    model = FlexibleRows()
    compiled = compile_ks(model)
    ksfx.stats(reset=True)
    assert_same(model, compiled, torch.randn(3, 16))
    assert launches() >= 1
    for x in (torch.randn(3, 32), torch.randn(5, 48)):  # a symbolic width after the first recompile
        assert_same(model, compiled, x)


def test_symbolic_width_graph_explains_itself():
    model = FlexibleRows()
    reports = []
    compiled = compile_ks(model, reports)
    compiled(torch.randn(3, 16))
    seen = len(reports)
    compiled(torch.randn(3, 32))
    graphs = reports[seen:]
    assert graphs, "Dynamo did not recompile"
    reasons = [c.reason for c in chains_of(graphs)]
    assert any("symbolic size" in r for r in reasons) or any(c.rewritten for c in chains_of(graphs)), reasons


def test_wrong_dtype_after_compiling_raises_like_eager():
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    compiled(torch.randn(3, 16))
    bad = torch.randn(3, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="expected scalar type|same dtype"):
        model(bad)
    with pytest.raises(RuntimeError, match="expected scalar type|same dtype"):
        compiled(bad)


def _with_nan_and_inf(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 3], x[1, 5], x[2, 0] = float("inf"), float("nan"), float("-inf")
    return x


def test_nan_and_inf_propagate_as_in_eager():
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    x = _with_nan_and_inf(torch.randn(4, 16))
    ksfx.stats(reset=True)
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
    assert launches() >= 1
    assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOL[torch.float32])


def test_nan_and_inf_through_a_masked_dense_weight_propagate_as_in_eager():
    model = model_of(MASKED)
    compiled = compile_ks(model)
    x = _with_nan_and_inf(torch.randn(4, 16))
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
    assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(16, 5).T, id="transposed"),
        pytest.param(lambda: torch.randn(5, 32)[:, ::2], id="step-slice"),
        pytest.param(lambda: torch.randn(2, 16, 3, 5).permute(0, 2, 3, 1), id="channels-last-permute"),
        pytest.param(lambda: torch.randn(2, 5, 3, 16).to(memory_format=torch.channels_last), id="channels-last"),
        pytest.param(lambda: torch.randn(1, 16).expand(4, 16), id="expanded"),
    ],
)
def test_non_contiguous_inputs(make):
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    x = make()
    assert not x.is_contiguous()
    ksfx.stats(reset=True)
    assert_same(model, compiled, x)
    assert launches() >= 1, "rewrite='always' did not rewrite the chain for a strided input"


# ----------------------------------------------------------------------------- odd graphs
class SharedWeights(nn.Module):
    """The same KS weight applied twice, and a second layer holding the same Parameter object."""

    def __init__(self):
        super().__init__()
        self.first = nn.Parameter(torch.randn(2, 3, 3, 2) / 2)
        self.second = nn.Module()
        self.second.w = self.first

    def forward(self, x):
        n = x.shape[0]
        h = torch.einsum("nacd,abcd->nabd", x.reshape(n, 2, 3, 2), self.first).reshape(n, 12)
        h = torch.relu(h)
        h = torch.einsum("nacd,abcd->nabd", h.reshape(n, 2, 3, 2), self.first).reshape(n, 12)
        return torch.einsum("nacd,abcd->nabd", h.reshape(n, 2, 3, 2), self.second.w).reshape(n, 12)


def test_parameters_shared_between_layers():
    model = SharedWeights()
    assert len(list(model.parameters())) == 1
    compiled = compile_ks(model)
    ksfx.stats(reset=True)
    assert_same(model, compiled, torch.randn(5, 12))
    assert launches() >= 2


class IntermediateReturned(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = model_of(ModelSpec((Factor((2, 3, 4, 2), "einsum"),), 16, False))
        self.tail = model_of(ModelSpec((Factor((3, 2, 4, 1), "bmm"),), 12, False))

    def forward(self, x):
        h = self.model(x)
        return h, self.tail(h)


def test_chain_whose_intermediate_is_also_returned():
    model = IntermediateReturned()
    compiled = compile_ks(model)
    x = torch.randn(4, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ksfx.stats(reset=True)
    (ha, ya), (hb, yb) = compiled(xa), model(xb)
    assert launches() >= 1
    torch.testing.assert_close(ha, hb, **TOL[torch.float32])
    torch.testing.assert_close(ya, yb, **TOL[torch.float32])
    params = list(model.parameters())
    loss_a, loss_b = ha.sum() + (ya * ya).sum(), hb.sum() + (yb * yb).sum()
    for got, want in zip(
        torch.autograd.grad(loss_a, [xa, *params]), torch.autograd.grad(loss_b, [xb, *params]), strict=True
    ):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


# ----------------------------------------------------------------------------- state changes
def test_in_place_weight_updates_between_calls_are_honoured():
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    x = torch.randn(3, 16)
    before = compiled(x).detach()
    with torch.no_grad():
        model.step0_w.mul_(2)
        model.step1_w.add_(0.5)
    after = compiled(x)
    torch.testing.assert_close(after, model(x), **TOL[torch.float32])
    assert not torch.allclose(after, before)
    assert_same(model, compiled, x)


def test_mask_updates_between_calls():
    """A mask losing nonzeros stays on the rewritten chain; one gaining nonzeros falls back, with a warning."""
    model = model_of(MASKED)
    compiled = compile_ks(model)
    x = torch.randn(3, 16)
    compiled(x)
    with torch.no_grad():
        model.step0_mask[0, :2] = 0  # pruning inside the support
    ksfx.stats(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(compiled(x), model(x), **TOL[torch.float32])
    assert launches() >= 1
    with torch.no_grad():
        model.step0_mask.fill_(1.0)  # now dense: the KS support no longer holds
    with pytest.warns(RuntimeWarning, match="invalidates a rewritten KS chain"):
        torch.testing.assert_close(compiled(x), model(x), **TOL[torch.float32])
    assert_same(model, compiled, x)


def test_index_table_changed_between_calls_falls_back():
    spec = ModelSpec((Factor((2, 3, 4, 2), "einsum"),), 16, False)
    model = model_of(spec)
    model.register_buffer("table", torch.randperm(12, generator=torch.Generator().manual_seed(3)))
    forward = model.forward

    def shuffled(x):
        return forward(x)[..., model.table]

    model.forward = shuffled
    compiled = compile_ks(model)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), shuffled(x), **TOL[torch.float32])
    with torch.no_grad():
        model.table.copy_(model.table.flip(0))
    with pytest.warns(RuntimeWarning, match="invalidates"):
        torch.testing.assert_close(compiled(x), shuffled(x), **TOL[torch.float32])


def test_requires_grad_toggled_between_calls():
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    x = torch.randn(3, 16)
    assert_same(model, compiled, x)
    model.step0_w.requires_grad_(False)
    assert_same(model, compiled, x)  # gradients of the input and step1_w only
    model.step0_w.requires_grad_(True)
    model.step1_w.requires_grad_(False)
    assert_same(model, compiled, x)
    with torch.no_grad():
        model.step1_w.mul_(-1)  # a frozen weight is still read at run time
    assert_same(model, compiled, x)
    model.step1_w.requires_grad_(True)
    assert_same(model, compiled, x)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(context):
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    x = torch.randn(3, 16)
    ksfx.stats(reset=True)
    with context():
        actual, expected = compiled(x), model(x)
    assert launches() >= 1
    assert not actual.requires_grad
    torch.testing.assert_close(actual, expected, **TOL[torch.float32])
    assert_same(model, compiled, x)  # and training after it


def test_model_moved_to_float64_after_compiling():
    model = model_of(TWO_FACTORS)
    compiled = compile_ks(model)
    compiled(torch.randn(3, 16))
    model.double()
    x = torch.randn(3, 16, dtype=torch.float64)
    ksfx.stats(reset=True)
    assert_same(model, compiled, x)
    assert compiled(x).dtype == torch.float64
    assert launches() >= 1


# ----------------------------------------------------------------------------- refusals explained
class PromotingButterfly(nn.Module):
    """Broadcast multiply + sum with an fp64 twiddle on an fp32 input: the result is fp64."""

    def __init__(self):
        super().__init__()
        self.twiddle = nn.Parameter(torch.randn(4, 2, 2, 1, dtype=torch.float64))

    def forward(self, x):
        return (x.reshape(-1, 4, 1, 2, 1) * self.twiddle).sum(3).reshape(-1, 8)


def test_mixed_dtypes_keep_the_original_ops_with_a_reason():
    model = PromotingButterfly()
    x = torch.randn(3, 8)
    report = ksfx.explain(model, x, rewrite="always")
    reasons = [c.reason for c in report.chains]
    assert reasons and not any(c.rewritten for c in report.chains)
    assert any("torch.float32 to torch.float64" in r for r in reasons), reasons
    assert "torch.float32 to torch.float64" in str(report)
    assert_same(model, compile_ks(model), x)


class MaskedQuadratic(nn.Module):
    """``(x W^T) * x``: a gate on the chain's own input, refused as a quadratic form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.register_buffer("mask", ks_support(4, 4, 4, 1))

    def forward(self, x):
        return F.linear(x, self.w * self.mask) * x


def test_quadratic_form_is_refused_with_a_reason():
    model = MaskedQuadratic()
    x = torch.randn(3, 16)
    report = ksfx.explain(model, x, rewrite="always")
    assert not any(c.rewritten for c in report.chains)
    assert any("quadratic form" in c.reason for c in report.chains), str(report)
    assert_same(model, compile_ks(model), x)


def test_dense_linear_over_tokens_is_not_a_ks_factor():
    """``nn.Linear`` on ``(B, T, F)``: the token axis is batch, never a factor's ``d``."""
    model = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 16))
    x = torch.randn(2, 5, 16)
    report = ksfx.explain(model, x, rewrite="always")
    assert not any(c.rewritten for c in report.chains), str(report)
    assert_same(model, compile_ks(model), x)
