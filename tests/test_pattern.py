"""KS descriptors vs brute-force constructions built independently of ksfx.pattern."""

import itertools

import pytest
import torch

from ksfx.pattern import (
    Chain,
    DigitPerm,
    FactorStep,
    IndexPerm,
    KSPattern,
    PermStep,
    as_digit_perm,
    compose,
    fuse,
    fuse_values,
    permutation_matrix,
    split_chain,
    to_code,
)

PATTERNS = [
    (1, 1, 1, 1),
    (1, 3, 5, 1),
    (2, 3, 4, 5),
    (4, 1, 3, 2),
    (3, 2, 1, 4),
    (2, 2, 2, 2),
    (1, 6, 4, 3),
    (5, 1, 1, 1),
]


def brute_force_dense(values: torch.Tensor) -> torch.Tensor:
    """The definition, entry by entry: row (α,β,δ), col (α,γ,δ) holds values[α,β,γ,δ]."""
    a, b, c, d = values.shape
    dense = torch.zeros(a * b * d, a * c * d, dtype=values.dtype)
    for al, be, ga, de in itertools.product(range(a), range(b), range(c), range(d)):
        dense[al * b * d + be * d + de, al * c * d + ga * d + de] = values[al, be, ga, de]
    return dense


def kron_support(p: KSPattern) -> torch.Tensor:
    """I_a ⊗ 1_{b×c} ⊗ I_d by Kronecker products."""
    return torch.kron(torch.kron(torch.eye(p.a), torch.ones(p.b, p.c)), torch.eye(p.d)).bool()


@pytest.mark.parametrize("abcd", PATTERNS)
def test_dense_matches_definition(abcd):
    p = KSPattern(*abcd)
    values = torch.randn(abcd, dtype=torch.float64)
    assert p.shape == (abcd[0] * abcd[1] * abcd[3], abcd[0] * abcd[2] * abcd[3])
    assert torch.equal(p.to_dense(values), brute_force_dense(values))
    assert torch.equal(p.support(), kron_support(p))
    assert p.nnz == int(kron_support(p).sum())


@pytest.mark.parametrize("abcd", PATTERNS)
def test_index_maps_round_trip(abcd):
    p = KSPattern(*abcd)
    rows = torch.arange(p.out_features)
    cols = torch.arange(p.in_features)
    env_row = {"row": rows}
    env_col = {"col": cols}
    alpha, beta, delta = (eval(to_code(e), {}, env_row) for e in p.row_digits)
    alpha2, gamma, delta2 = (eval(to_code(e), {}, env_col) for e in p.col_digits)
    assert torch.equal(alpha * p.b * p.d + beta * p.d + delta, rows)
    assert torch.equal(alpha2 * p.c * p.d + gamma * p.d + delta2, cols)
    assert int(torch.as_tensor(beta).max()) == p.b - 1 and int(torch.as_tensor(gamma).max()) == p.c - 1


@pytest.mark.parametrize("abcd", PATTERNS)
def test_transpose(abcd):
    p = KSPattern(*abcd)
    values = torch.randn(abcd, dtype=torch.float64)
    assert torch.equal(p.transpose().to_dense(values.permute(0, 2, 1, 3)), p.to_dense(values).T)


@pytest.mark.parametrize("abcd", PATTERNS)
def test_values_from_dense_and_from_support(abcd):
    p = KSPattern(*abcd)
    values = torch.randn(abcd)
    assert torch.equal(p.values_from_dense(p.to_dense(values)), values)
    found = KSPattern.from_support(p.support())
    assert found is not None and torch.equal(found.support(), p.support())


def test_from_support_rejects_non_ks():
    mask = KSPattern(2, 3, 3, 1).support().clone()
    mask[0, 0] = False
    assert KSPattern.from_support(mask) is None
    assert KSPattern.from_support(torch.block_diag(torch.ones(2, 2), torch.ones(3, 3)).bool()) is None


@pytest.mark.parametrize("bad", [(0, 1, 1, 1), (1, -2, 1, 1)])
def test_invalid_pattern_values(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        KSPattern(*bad)


def test_invalid_pattern_types():
    with pytest.raises(TypeError, match="must be an int"):
        KSPattern(1, 2.0, 1, 1)


def test_counts():
    p = KSPattern(2, 3, 4, 5)
    assert p.flops(batch=7) == 2 * 2 * 3 * 4 * 5 * 7
    assert p.min_bytes(batch=7, itemsize=4) == 4 * (7 * (40 + 30) + 120)


# ---------------------------------------------------------------------------- permutations
@pytest.mark.parametrize(
    "radices,order", [((3, 4, 5), (2, 0, 1)), ((2, 2, 2, 2), (3, 2, 1, 0)), ((6, 1, 4), (2, 1, 0)), ((7,), (0,))]
)
def test_digit_perm_is_reshape_permute(radices, order):
    perm = DigitPerm(radices, order)
    x = torch.arange(perm.size)
    assert torch.equal(x[perm.indices()], x.reshape(radices).permute(order).reshape(-1))
    assert torch.equal(perm.simplified().indices(), perm.indices())
    assert torch.equal(x[perm.indices()][perm.inverse().indices()], x)


def test_compose_matches_sequential_gathers():
    first = DigitPerm((3, 4), (1, 0))
    then = DigitPerm((4, 3), (1, 0))
    x = torch.randn(12)
    assert compose(first, then).is_identity
    table = IndexPerm(tuple(torch.randperm(12).tolist()))
    for p, q in [(first, table), (table, first), (first, DigitPerm((2, 6), (1, 0)))]:
        assert torch.equal(x[compose(p, q).indices()], x[p.indices()][q.indices()])


def test_as_digit_perm_recognises_bit_reversal():
    n_bits = 5
    table = [int(format(i, f"0{n_bits}b")[::-1], 2) for i in range(2**n_bits)]
    found = as_digit_perm(IndexPerm(tuple(table)))
    assert found == DigitPerm((2,) * n_bits, tuple(reversed(range(n_bits))))
    generator = torch.Generator().manual_seed(0)
    random = IndexPerm(tuple(torch.randperm(24, generator=generator).tolist()))
    recognised = as_digit_perm(random)
    assert recognised is None or torch.equal(recognised.indices(), random.indices())


def test_index_perm_rejects_non_permutation():
    with pytest.raises(ValueError, match="not a permutation"):
        IndexPerm((0, 0, 1))


# ---------------------------------------------------------------------------- chains
FUSABLE = [
    ((1, 2, 2, 4), (2, 2, 2, 2), (1, 4, 4, 2)),  # butterfly factors: structural rule
    ((1, 4, 4, 1), (1, 4, 4, 1), (1, 4, 4, 1)),
    ((2, 3, 6, 2), (4, 6, 2, 1), (2, 6, 4, 1)),
    ((1, 3, 4, 2), (2, 2, 3, 2), (1, 3, 6, 2)),
    ((2, 3, 4, 1), (1, 4, 2, 2), (1, 6, 4, 1)),  # saturated: the product is dense
]
NOT_FUSABLE = [((1, 2, 2, 3), (3, 2, 2, 1)), ((1, 2, 4, 3), (3, 2, 2, 2))]


@pytest.mark.parametrize("left,right,expected", FUSABLE)
def test_fuse_product_is_ks(left, right, expected):
    lp, rp = KSPattern(*left), KSPattern(*right)
    v1, v2 = torch.randn(left, dtype=torch.float64), torch.randn(right, dtype=torch.float64)
    product = brute_force_dense(v1) @ brute_force_dense(v2)
    fused = fuse(lp, rp)
    assert fused == KSPattern(*expected)
    assert torch.allclose(fused.to_dense(fuse_values(lp, rp, v1, v2)), product)
    assert KSPattern.from_support(product != 0) == fused


@pytest.mark.parametrize("left,right", NOT_FUSABLE)
def test_fuse_rejects_non_ks_products(left, right):
    lp, rp = KSPattern(*left), KSPattern(*right)
    assert fuse(lp, rp) is None
    product = brute_force_dense(torch.randn(left, dtype=torch.float64)) @ brute_force_dense(
        torch.randn(right, dtype=torch.float64)
    )
    assert KSPattern.from_support(product != 0) is None


def test_chain_validation_names_the_steps():
    with pytest.raises(ValueError, match="steps 0 and 1 do not chain"):
        Chain((KSPattern(1, 2, 3, 1), KSPattern(1, 2, 3, 1)))
    with pytest.raises(TypeError):
        Chain(((1, 2, 3, 4),))


def test_chain_dense_transpose_and_spec():
    steps = (
        DigitPerm((2, 3), (1, 0)),
        KSPattern(2, 3, 4, 1),
        IndexPerm((1, 0, 3, 2, 5, 4, 7, 6)),
        KSPattern(1, 4, 2, 2),
    )
    chain = Chain(steps)
    v = [torch.randn(2, 3, 4, 1, dtype=torch.float64), torch.randn(1, 4, 2, 2, dtype=torch.float64)]
    expected = (
        permutation_matrix(steps[0], torch.float64)
        @ brute_force_dense(v[0])
        @ permutation_matrix(steps[2], torch.float64)
        @ brute_force_dense(v[1])
    )
    assert torch.equal(chain.to_dense(v), expected)
    assert torch.equal(chain.simplified().to_dense(v), expected)
    transposed = chain.transpose().to_dense([t.permute(0, 2, 1, 3) for t in reversed(v)])
    assert torch.equal(transposed, expected.T)
    assert Chain.from_spec(chain.to_spec()) == chain
    assert chain.in_features == 4 and chain.out_features == 6


def test_split_chain_folds_perms_into_neighbours():
    p_out, p_mid, p_in = DigitPerm((2, 3), (1, 0)), IndexPerm((1, 0, 3, 2, 5, 4, 7, 6)), DigitPerm((2, 2), (1, 0))
    chain = Chain((p_out, KSPattern(2, 3, 4, 1), p_mid, KSPattern(1, 4, 2, 2), p_in))
    steps = split_chain(chain)
    assert [s.pattern for s in steps] == [KSPattern(1, 4, 2, 2), KSPattern(2, 3, 4, 1)]
    assert steps[0] == FactorStep(KSPattern(1, 4, 2, 2), in_perm=p_in, out_perm=None)
    assert steps[1].out_perm == p_out and torch.equal(steps[1].in_perm.indices(), p_mid.indices())
    assert isinstance(split_chain(Chain((p_in,))), PermStep)
