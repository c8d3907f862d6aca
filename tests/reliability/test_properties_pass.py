"""Property: a random KS model compiled with ksfx (``rewrite="always"``) computes what eager computes.

Models are drawn as user code (``models.py``): 1–4 factors with random ``(a, b, c, d)``
(1s and non-powers of two included), each written as bmm, einsum, masked dense
``F.linear`` or ``W @ x``, random permutations between them, batch-first or batch-last,
random leading batch shapes (0 and 1 included), and a second call with another batch
shape (Dynamo recompiles it with symbolic sizes). A dynamic-shape profile compiles with
``dynamic=True`` (every size symbolic from the first call, feature widths included).
Forward output and the gradients of the input and every parameter must equal eager
PyTorch's.

Budgets follow the hypothesis profile (``tests/conftest.py``): ``ci`` by default,
``--hypothesis-profile=long`` for deep runs.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ksfx
from tests.reliability.compare import TOL, assert_same, compile_ks, outputs_and_grads
from tests.reliability.models import Factor, RandomKSModel, model_specs

LEADS = st.lists(st.integers(0, 3), min_size=0, max_size=2).map(tuple)


def _budget(fraction: float, minimum: int):
    """A share of the active profile's ``max_examples`` (read when the module is imported)."""
    return settings(max_examples=max(minimum, int(settings().max_examples * fraction)))


def make_input(spec, lead, dtype, generator):
    shape = (spec.in_features, *lead) if spec.batch_last else (*lead, spec.in_features)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def structured(spec) -> bool:
    return any(isinstance(s, Factor) and s.pattern[0] * s.pattern[3] > 1 for s in spec.steps)


def pass_notes(reports) -> list[str]:
    return [graph.note for graph in reports if graph.note]


def check_reports(spec, shape, graphs) -> None:
    """Every chain left alone says why; the pass never fails; ``always`` rewrites structured models."""
    chains = [chain for graph in graphs for chain in graph.chains]
    for chain in chains:
        assert chain.rewritten or chain.reason, f"a chain was left alone without a reason: {chain}"
    assert not pass_notes(graphs), pass_notes(graphs)
    internal = [c.reason for c in chains if "internal error" in c.reason]
    assert not internal, internal
    if graphs and structured(spec) and math.prod(shape):  # an empty batch has nothing to rewrite
        assert any(c.rewritten for c in chains), (
            f"rewrite='always' left every chain of a structured model alone: {[c.reason for c in chains]}"
        )


@_budget(2.0, 10)
@given(
    spec=model_specs(),
    lead=LEADS,
    second=LEADS,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    dynamic=st.sampled_from([None, True]),
)
def test_compiled_random_ks_model_matches_eager(spec, lead, second, dtype, dynamic):
    generator = torch.Generator().manual_seed(0)
    model = RandomKSModel(spec, generator, dtype)
    reports = []
    compiled = compile_ks(model, reports, dynamic=dynamic)
    for shape in (lead, second):
        seen = len(reports)
        assert_same(model, compiled, make_input(spec, shape, dtype, generator), generator)
        check_reports(spec, shape, reports[seen:])


@_budget(0.25, 3)
@given(
    spec=model_specs(max_width=16, max_factors=2, max_in=16),
    lead=st.sampled_from([(0,), (1,), (3,), (2, 2)]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_compiled_low_precision_through_the_triton_interpreter(triton_interpret, spec, lead, dtype):
    """fp16/bf16 through the generated kernels: compiled and eager both close to the fp64 model."""
    generator = torch.Generator().manual_seed(0)
    model = RandomKSModel(spec, generator, dtype)
    reference = RandomKSModel(spec, torch.Generator().manual_seed(0), torch.float64)
    x = make_input(spec, lead, dtype, generator)
    compiled = compile_ks(model)
    ksfx.stats(reset=True)
    with torch.no_grad():
        actual = compiled(x)
        expected = reference(x.double())
    if structured(spec) and x.numel():
        assert ksfx.stats().get("triton-interpret.forward", 0) >= 1, ksfx.stats()
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])
    probe = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    actual_grads = outputs_and_grads(compiled, x, probe.to(dtype))[1]
    expected_grads = outputs_and_grads(reference, x.double(), probe)[1]
    for got, want in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@_budget(0.5, 8)
@given(spec=model_specs(max_width=24, max_factors=3), rows=st.integers(1, 3), data=st.data())
def test_non_finite_inputs_propagate_as_in_eager(spec, rows, data):
    """inf and NaN entries give NaN/inf exactly where eager's do (masked weights: ``inf · 0``)."""
    generator = torch.Generator().manual_seed(0)
    model = RandomKSModel(spec, generator, torch.float64)
    x = make_input(spec, (rows,), torch.float64, generator)
    flat = x.view(-1)
    for value in data.draw(st.lists(st.sampled_from([math.inf, -math.inf, math.nan]), min_size=1, max_size=3)):
        flat[data.draw(st.integers(0, flat.numel() - 1))] = value
    compiled = compile_ks(model)
    ksfx.stats(reset=True)
    with torch.no_grad():
        actual, expected = compiled(x), model(x)
    if structured(spec):
        assert sum(ksfx.stats().values()) >= 1, "the chain was not rewritten"
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    assert torch.equal(actual.isinf(), expected.isinf()), (actual, expected)
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOL[torch.float64])
