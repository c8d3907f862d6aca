"""The zoo's expected chains are right: each module's eager linear map is its chain's dense matrix.

The reference is built differently from the module: the module runs the user's
reshape/bmm/einsum/mul-sum code on an identity batch; the expected side is
``Chain.to_dense`` of the values gathered from the parameters, with the permutations the
zoo states. Everything in float64 so the comparison is tight.
"""

from __future__ import annotations

import pytest
import torch

from ksfx.pattern import KSPattern

from .zoo import ZOO, ZooCase

POSITIVE = [case for case in ZOO if case.is_ks]
NEGATIVE = [case for case in ZOO if not case.is_ks]
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _build(case: ZooCase) -> tuple[torch.nn.Module, torch.Tensor]:
    module, example = case.make()
    return module.double(), example.double()


def _as_2d(run, x: torch.Tensor, example_ndim: int, batch_last: bool) -> torch.Tensor:
    """Run on a 2-D batch ``x`` reshaped to the module's number of dims, return 2-D."""
    extra = [1] * (example_ndim - 2)
    if batch_last:
        y = run(x.reshape(x.shape[0], x.shape[1], *extra))
        return y.reshape(-1, x.shape[1])
    y = run(x.reshape(*extra, x.shape[0], x.shape[1]))
    return y.reshape(x.shape[0], -1)


def _linear_map(run, in_features: int, example_ndim: int, batch_last: bool, bias=None) -> torch.Tensor:
    """Dense ``W`` of ``run`` (``y = x @ W.T + b`` or ``y = W @ x + b``) probed with an identity batch."""
    eye = torch.eye(in_features, dtype=torch.float64)
    with torch.no_grad():
        y = _as_2d(run, eye, example_ndim, batch_last)
    dense = y if batch_last else y.T
    return dense if bias is None else dense - bias.reshape(-1, 1)


def test_registry_is_consistent():
    names = [case.name for case in ZOO]
    assert len(names) == len(set(names))
    for case in ZOO:
        assert (case.reference is not None) == case.is_ks, case.name
        assert bool(case.expected_patterns) == case.is_ks, case.name
    families = {case.family for case in POSITIVE}
    assert len(families) >= 12


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_expected_chain_is_the_module_linear_map(case: ZooCase):
    module, example = _build(case)
    refs = case.reference(module)
    assert [[p.as_tuple() for p in ref.chain.patterns] for ref in refs] == case.expected_patterns
    for ref in refs:
        for pattern, values in zip(ref.chain.patterns, ref.values):
            pattern.check_values(values)
        expected = ref.chain.to_dense(list(ref.values)).detach()
        dense = _linear_map(ref.run, ref.chain.in_features, example.ndim, case.batch_last, ref.bias)
        torch.testing.assert_close(dense, expected, **TOL)


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_chain_reproduces_module_on_batched_input(case: ZooCase):
    """Same check on a random input with the example's batch dims (leading or trailing)."""
    module, example = _build(case)
    for ref in case.reference(module):
        n_in = ref.chain.in_features
        w = ref.chain.to_dense(list(ref.values)).detach()
        b = torch.zeros(ref.chain.out_features, dtype=torch.float64) if ref.bias is None else ref.bias.detach()
        if case.batch_last:
            x = torch.randn(n_in, *example.shape[1:], dtype=torch.float64)
            expected = (w @ x.reshape(n_in, -1) + b[:, None]).reshape(-1, *example.shape[1:])
        else:
            x = torch.randn(*example.shape[:-1], n_in, dtype=torch.float64)
            expected = (x.reshape(-1, n_in) @ w.T + b).reshape(*example.shape[:-1], -1)
        with torch.no_grad():
            torch.testing.assert_close(ref.run(x), expected, **TOL)


@pytest.mark.parametrize("case", NEGATIVE, ids=lambda c: c.name)
def test_negative_case_is_not_a_ks_map(case: ZooCase):
    """Either the module is not linear in its input, or its support is no nontrivial KS support."""
    module, example = _build(case)
    other = torch.randn_like(example)
    with torch.no_grad():
        linear = torch.allclose(module(example + 2 * other), module(example) + 2 * module(other), **TOL)
    if not linear:
        return
    dense = _linear_map(module, example.shape[-1], example.ndim, case.batch_last, getattr(module, "bias", None))
    pattern = KSPattern.from_support(dense != 0)
    assert pattern is None or (pattern.a == 1 and pattern.d == 1), f"{case.name} has KS support {pattern}"


def test_examples_run_forward_and_backward():
    for case in ZOO:
        module, example = case.make()
        out = module(example.requires_grad_())
        out.square().sum().backward()
        assert example.grad is not None and torch.isfinite(example.grad).all(), case.name
