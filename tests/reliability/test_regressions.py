"""Regression tests for bugs the property tests found (each names the bug it pins)."""

from __future__ import annotations

import torch

from tests.reliability.compare import compile_ks
from tests.reliability.models import Factor, Gather, ModelSpec, RandomKSModel, Shuffle


def _compile_and_report(spec: ModelSpec, x: torch.Tensor):
    model = RandomKSModel(spec, torch.Generator().manual_seed(0))
    reports = []
    compiled = compile_ks(model, reports)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    return [chain for graph in reports for chain in graph.chains]


def test_single_input_feature():
    spec = ModelSpec((Factor((1, 2, 1, 1), "einsum"), Factor((2, 1, 1, 1), "einsum")), 1, False)
    chains = _compile_and_report(spec, torch.randn(3, 1))
    assert [c.patterns for c in chains if c.rewritten] == [[(2, 1, 1, 1), (1, 2, 1, 1)]], [c.reason for c in chains]


def test_empty_batch_last_input_is_refused_with_a_reason():
    spec = ModelSpec((Factor((2, 2, 3, 1), "einsum"),), 6, True)
    chains = _compile_and_report(spec, torch.randn(6, 0))
    assert chains and all("input is empty" in c.reason for c in chains), [c.reason for c in chains]


def test_value_view_with_a_reversed_axis():
    from ksfx.passes.rewrite import _as_view

    index = torch.tensor([[1, 0]])  # values w[1], w[0]: not a forward strided view
    view = _as_view(index, 2)
    assert view is None or view[0] >= 0


def test_swap_absorbed_into_a_diagonal_factor():
    spec = ModelSpec((Factor((1, 2, 2, 1), "bmm"), Gather((1, 0)), Factor((2, 1, 1, 1), "bmm", bias=True)), 2, False)
    model = RandomKSModel(spec, torch.Generator().manual_seed(0))
    reports = []
    compiled = compile_ks(model, reports)
    x = torch.randn(3, 2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert not [g.note for g in reports if g.note]
    assert any(c.rewritten for g in reports for c in g.chains)


def test_gather_over_a_single_feature():
    """Long profile: ``x[[0]]`` on a 1-feature batch-last input made planning fail (min of no digits),
    then, with one output feature, the output was taken as batch-first ("layouts differ")."""
    spec = ModelSpec((Gather((0,)), Factor((1, 1, 1, 1), "bmm", bias=True)), 1, True)
    chains = _compile_and_report(spec, torch.randn(1, 2))
    assert [c.reason for c in chains] == ["dense matrix product (no Kronecker structure): left to the compiler"]


def test_gather_over_a_single_feature_before_a_structured_chain():
    """Long profile: the identity gather ``x[..., [0]]`` made a size-1 digit that looked broadcast."""
    spec = ModelSpec(
        (Gather((0,)), Factor((1, 2, 1, 1), "bmm"), Shuffle((2,), (0,)), Factor((2, 1, 1, 1), "bmm", bias=True)),
        1,
        False,
    )
    chains = _compile_and_report(spec, torch.randn(3, 1))
    assert [c.patterns for c in chains if c.rewritten] == [[(2, 1, 1, 1), (1, 2, 1, 1)]], [c.reason for c in chains]
