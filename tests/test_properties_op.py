"""Property-based tests of chains and ks_matmul: random valid chains vs dense products."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ksfx
from ksfx.pattern import Chain, DigitPerm, IndexPerm, KSPattern, as_digit_perm, compose

SIZES = st.integers(1, 4)


@st.composite
def ks_patterns_with_out(draw, out_features):
    """A pattern producing ``out_features`` (a*b*d == out_features), with random c."""
    divisors = [k for k in range(1, out_features + 1) if out_features % k == 0]
    a = draw(st.sampled_from(divisors))
    rest = out_features // a
    d = draw(st.sampled_from([k for k in range(1, rest + 1) if rest % k == 0]))
    return KSPattern(a, rest // d, draw(SIZES), d)


@st.composite
def perms_of(draw, n):
    if draw(st.booleans()):
        factors = []
        remaining = n
        while remaining > 1:
            divisor = draw(st.sampled_from([k for k in range(2, remaining + 1) if remaining % k == 0]))
            factors.append(divisor)
            remaining //= divisor
        factors = factors or [1]
        order = draw(st.permutations(range(len(factors))))
        return DigitPerm(tuple(factors), tuple(order))
    return IndexPerm(tuple(draw(st.permutations(range(n)))))


@st.composite
def chains(draw):
    """1–4 factors, chained right to left from a random input width, perms in between."""
    out_features = draw(st.integers(1, 12))
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 2)) == 0:
            steps.append(draw(perms_of(out_features)))
        pattern = draw(ks_patterns_with_out(out_features))
        steps.append(pattern)
        out_features = pattern.in_features
        if out_features > 48:
            break
    if draw(st.booleans()):
        steps.append(draw(perms_of(out_features)))
    return Chain(tuple(steps))


def dense_reference(chain, factors):
    """Dense product, applying each permutation as an explicit gather of matrix rows."""
    dense = torch.eye(chain.out_features, dtype=torch.float64)
    it = iter(factors)
    for step in chain.steps:
        if isinstance(step, KSPattern):
            dense = dense @ step.to_dense(next(it))
        else:
            dense = dense[:, torch.argsort(step.indices())]  # (M P)[:, j] = M[:, P^-1 j]
    return dense


@settings(max_examples=60, deadline=None)
@given(chain=chains(), batch=st.integers(0, 3), batch_last=st.booleans(), data=st.data())
def test_random_chains_match_dense(chain, batch, batch_last, data):
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.randn(p.as_tuple(), generator=generator, dtype=torch.float64) for p in chain.patterns]
    dense = dense_reference(chain, factors)
    shape = (chain.in_features, batch) if batch_last else (batch, chain.in_features)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = ksfx.ks_matmul(x, factors, chain=chain, batch_last=batch_last)
    expected = dense @ x if batch_last else x @ dense.T
    assert y.shape == expected.shape
    assert torch.allclose(y, expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose(chain.simplified().to_dense(factors), dense, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 36))
def test_permutation_algebra(data, n):
    p, q = data.draw(perms_of(n)), data.draw(perms_of(n))
    x = torch.arange(n)
    assert torch.equal(x[compose(p, q).indices()], x[p.indices()][q.indices()])
    assert torch.equal(x[p.indices()][p.inverse().indices()], x)
    if isinstance(p, IndexPerm):
        recognised = as_digit_perm(p)
        assert recognised is None or torch.equal(recognised.indices(), p.indices())
    elif n > 1:
        recognised = as_digit_perm(IndexPerm(tuple(p.indices().tolist())))
        assert recognised is not None and torch.equal(recognised.indices(), p.indices())
        assert math.prod(p.simplified().radices) == n
