"""Every formulation family of the real-world zoo: found with the expected patterns, compiled = eager.

The zoo (``tests/realworld``) holds KS layers written the way public projects write them,
with the chains each one must produce (leftmost first), proven against the modules' eager
linear maps by ``tests/realworld/test_zoo_eager.py``. Here the backend must find exactly
those chains and, with ``rewrite="always"``, reproduce eager outputs and gradients.
Negative look-alikes must be left untouched. The same holds with ``dynamic=True``, where
every size is symbolic, feature widths included (the backend specialises the widths a
chain needs).
"""

from __future__ import annotations

import pytest
from ksfx_checks import assert_compiled_matches_eager, compile_ks, rewritten_patterns

from tests.realworld.zoo import ZOO

# Families reached only through a graph break are covered by tests/passes/test_graph_breaks.py.
POSITIVE = [case for case in ZOO if case.is_ks and case.family != "monarch_autograd_function"]
NEGATIVE = [case for case in ZOO if not case.is_ks]
FLOAT64 = [case for case in POSITIVE if case.family in ("monarch_bmm", "ks_einsum")]


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_finds_expected_chains(case):
    model, x = case.make()
    assert rewritten_patterns(model, x) == case.expected_patterns


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_compiled_matches_eager_forward_backward(case):
    model, x = case.make()
    assert_compiled_matches_eager(model, x, min_launches=len(case.expected_patterns))


@pytest.mark.parametrize("case", NEGATIVE, ids=lambda c: c.name)
def test_negative_look_alikes_untouched(case):
    model, x = case.make()
    assert rewritten_patterns(model, x) == []


@pytest.mark.parametrize("case", FLOAT64, ids=lambda c: c.name)
def test_float64(case):
    model, x = case.make()
    assert_compiled_matches_eager(model.double(), x.double())


@pytest.mark.parametrize("case", POSITIVE, ids=lambda c: c.name)
def test_every_size_symbolic_finds_the_same_chains(case):
    model, x = case.make()
    assert rewritten_patterns(model, x, dynamic=True) == case.expected_patterns


@pytest.mark.parametrize("case", POSITIVE[::3], ids=lambda c: c.name)
def test_every_size_symbolic_compiled_matches_eager(case):
    model, x = case.make()
    compiled = compile_ks(model, dynamic=True)
    assert_compiled_matches_eager(model, x, compiled, min_launches=len(case.expected_patterns))


@pytest.mark.parametrize("case", NEGATIVE, ids=lambda c: c.name)
def test_every_size_symbolic_negative_look_alikes_untouched(case):
    model, x = case.make()
    assert rewritten_patterns(model, x, dynamic=True) == []
