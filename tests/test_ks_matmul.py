"""ks_matmul (plain-torch CPU path) vs dense products and vs lazylinop."""

import numpy as np
import pytest
import torch

import ksfx
from ksfx.pattern import Chain, DigitPerm, IndexPerm, KSPattern

CHAINS = [
    [(1, 4, 4, 1)],
    [(2, 3, 5, 1)],
    [(1, 3, 2, 4)],
    [(3, 1, 2, 2)],
    [(2, 2, 1, 3)],
    [(2, 3, 4, 1), (1, 4, 2, 2)],
    [(1, 2, 2, 4), (2, 2, 2, 2), (4, 2, 2, 1)],  # size-8 butterfly
    [(4, 4, 4, 1), (1, 4, 4, 4)],  # Monarch n = 16
    [(5, 3, 2, 1), (1, 10, 7, 1), (7, 1, 1, 1)],
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def random_factors(chain, dtype, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=generator, dtype=dtype).requires_grad_(requires_grad) for p in chain]


def dense_of(factors):
    """W by multiplying dense factors built entry by entry (independent of ksfx.pattern)."""
    dense = None
    for v in factors:
        a, b, c, d = v.shape
        blocks = torch.zeros(a, b, d, a, c, d, dtype=v.dtype)
        for al in range(a):
            for de in range(d):
                blocks[al, :, de, al, :, de] = v[al, :, :, de]
        matrix = blocks.reshape(a * b * d, a * c * d)
        dense = matrix if dense is None else dense @ matrix
    return dense


def rel_err(x, ref):
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("chain", CHAINS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lead", [(7,), (2, 3), (1,), ()])
def test_batch_first_matches_dense(chain, dtype, lead):
    factors = random_factors(chain, dtype)
    dense = dense_of(factors)
    x = torch.randn(*lead, dense.shape[1], dtype=dtype)
    y = ksfx.ks_matmul(x, factors)
    assert y.shape == (*lead, dense.shape[0])
    assert rel_err(y, x @ dense.T) < TOL[dtype]


@pytest.mark.parametrize("chain", CHAINS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_last_matches_dense(chain, dtype):
    factors = random_factors(chain, dtype)
    dense = dense_of(factors)
    x = torch.randn(dense.shape[1], 5, dtype=dtype)
    y = ksfx.ks_matmul(x, factors, batch_last=True)
    assert rel_err(y, dense @ x) < TOL[dtype]


@pytest.mark.parametrize("chain", CHAINS, ids=str)
def test_matches_lazylinop(chain):
    ksm = pytest.importorskip("lazylinop.butterfly").ksm

    factors = random_factors(chain, torch.float64)
    operator = ksm([f.numpy() for f in factors])
    x = torch.randn(operator.shape[1], 3, dtype=torch.float64)
    expected = operator @ x.numpy()
    assert np.allclose(ksfx.ks_matmul(x, factors, batch_last=True).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert np.allclose(dense_of(factors).numpy(), operator.toarray())


def test_non_contiguous_input_and_bias():
    factors = random_factors(CHAINS[5], torch.float64)
    dense = dense_of(factors)
    x = torch.randn(9, 8, dtype=torch.float64)[::2, ::2]
    bias = torch.randn(dense.shape[0], dtype=torch.float64)
    assert rel_err(ksfx.ks_matmul(x, factors, bias=bias), x @ dense.T + bias) < 1e-12
    xl = torch.randn(8, 8, dtype=torch.float64)[::2, ::3]
    assert rel_err(ksfx.ks_matmul(xl, factors, batch_last=True, bias=bias), dense @ xl + bias[:, None]) < 1e-12


def test_chain_with_permutations():
    perm_mid = IndexPerm(tuple(torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()))
    steps = (
        DigitPerm((2, 3), (1, 0)),
        KSPattern(2, 3, 4, 1),
        perm_mid,
        KSPattern(1, 4, 2, 2),
        DigitPerm((2, 2), (1, 0)),
    )
    chain = Chain(steps)
    factors = random_factors([(2, 3, 4, 1), (1, 4, 2, 2)], torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64)
    x_perm_ref = x[:, [0, 2, 1, 3]]  # DigitPerm((2,2),(1,0)) written out
    h = x_perm_ref @ dense_of([factors[1]]).T
    h = h[:, list(perm_mid.indices_)]
    y_ref = (h @ dense_of([factors[0]]).T)[:, [0, 3, 1, 4, 2, 5]]  # DigitPerm((2,3),(1,0))
    assert rel_err(ksfx.ks_matmul(x, factors, chain=chain), y_ref) < 1e-12


@pytest.mark.parametrize("dense", [0b01, 0b10, 0b11])
@pytest.mark.parametrize("batch_last", [False, True])
@pytest.mark.parametrize("interpret", [False, True], ids=["cpu", "triton-interpret"])
def test_dense_factors_make_the_nans_of_a_dense_product(dense, batch_last, interpret, request):
    """Bit k of ``dense``: factor k's output is what ``h @ dense(K_k).T`` gives, ``inf · 0`` included."""
    if interpret:
        request.getfixturevalue("triton_interpret")
    perm_mid = IndexPerm(tuple(torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()))
    chain = Chain(
        (DigitPerm((2, 3), (1, 0)), KSPattern(2, 3, 4, 1), perm_mid, KSPattern(1, 4, 2, 2), DigitPerm((2, 2), (1, 0)))
    )
    factors = random_factors([(2, 3, 4, 1), (1, 4, 2, 2)], torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    x[0, 1], x[1, 3], x[2, 0], x[2, 2] = float("inf"), float("nan"), float("-inf"), float("inf")

    def product(h, k):  # dense (inf * 0 = nan) or restricted to the support (no structural zeros)
        matrix = dense_of([factors[k]])
        if dense >> k & 1:
            return h @ matrix.T
        return torch.stack([(h[:, matrix[i] != 0] * matrix[i, matrix[i] != 0]).sum(-1) for i in range(len(matrix))], -1)

    h = product(x[:, [0, 2, 1, 3]], 1)[:, list(perm_mid.indices_)]
    expected = product(h, 0)[:, [0, 3, 1, 4, 2, 5]]
    xin = x.T.contiguous() if batch_last else x
    actual = torch.ops.ksfx.ks_chain(xin, factors, chain.to_spec(), batch_last, None, dense)
    actual = actual.T if batch_last else actual
    assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-12, atol=1e-12)
    assert expected.isnan().sum() > expected[:, :1].isnan().sum(), "the inputs must make some NaNs"


@pytest.mark.parametrize("chain", [CHAINS[1], CHAINS[5], CHAINS[6]], ids=str)
@pytest.mark.parametrize("batch_last", [False, True])
def test_gradients_match_dense(chain, batch_last):
    factors = random_factors(chain, torch.float64, requires_grad=True)
    dense_factors = [f.detach().clone().requires_grad_(True) for f in factors]
    n_in = dense_of(factors).shape[1]
    x = torch.randn(*((n_in, 5) if batch_last else (5, n_in)), dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias = torch.randn(dense_of(factors).shape[0], dtype=torch.float64, requires_grad=True)
    bias_ref = bias.detach().clone().requires_grad_(True)
    y = ksfx.ks_matmul(x, factors, batch_last=batch_last, bias=bias)
    dense = dense_of(dense_factors)
    y_ref = dense @ x_ref + bias_ref[:, None] if batch_last else x_ref @ dense.T + bias_ref
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert rel_err(x.grad, x_ref.grad) < 1e-12
    assert rel_err(bias.grad, bias_ref.grad) < 1e-12
    for f, f_ref in zip(factors, dense_factors, strict=True):
        assert rel_err(f.grad, f_ref.grad) < 1e-12


def test_gradcheck_with_permutations():
    chain = Chain((DigitPerm((2, 3), (1, 0)), KSPattern(2, 3, 2, 1), IndexPerm((3, 0, 2, 1))))
    factor = torch.randn(2, 3, 2, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, f: ksfx.ks_matmul(x, [f], chain=chain), (x, factor))


def test_stats_count_cpu_launches():
    factors = random_factors(CHAINS[5], torch.float32)
    ksfx.stats(reset=True)
    ksfx.ks_matmul(torch.randn(3, 4), factors)
    counts = ksfx.stats(reset=True)
    assert counts == {"cpu.forward": 2}
    assert ksfx.stats() == {}


# ---------------------------------------------------------------------------- bad input
def test_width_mismatch_names_factors():
    with pytest.raises(ValueError, match=r"factors 0 and 1 do not chain: factor 0 KS\(1, 4, 2, 2\) takes a\*c\*d = 4"):
        ksfx.ks_matmul(torch.randn(3, 8), random_factors([(1, 4, 2, 2), (2, 3, 4, 1)], torch.float32))


def test_input_width_mismatch():
    with pytest.raises(ValueError, match="takes 4"):
        ksfx.ks_matmul(torch.randn(3, 5), random_factors(CHAINS[5], torch.float32))
    with pytest.raises(ValueError, match="batch-last input must have shape"):
        ksfx.ks_matmul(torch.randn(4), random_factors(CHAINS[5], torch.float32), batch_last=True)


def test_wrong_factor_ndim_and_type():
    with pytest.raises(ValueError, match="factor 0 must have 4 dims"):
        ksfx.ks_matmul(torch.randn(3, 4), [torch.randn(4, 4)])
    with pytest.raises(TypeError, match="factor 0 must be a torch.Tensor"):
        ksfx.ks_matmul(torch.randn(3, 4), [np.zeros((1, 4, 4, 1))])
    with pytest.raises(TypeError, match="non-empty list"):
        ksfx.ks_matmul(torch.randn(3, 4), [])


def test_dtype_mix_is_rejected():
    factors = random_factors(CHAINS[5], torch.float32)
    factors[1] = factors[1].double()
    with pytest.raises(TypeError, match=r"factor 1 KS\(1, 4, 2, 2\) has dtype torch.float64"):
        ksfx.ks_matmul(torch.randn(3, 4), factors)


def test_bias_shape_is_checked():
    with pytest.raises(ValueError, match=r"bias of the chain .* must have shape \(6,\)"):
        ksfx.ks_matmul(torch.randn(3, 4), random_factors(CHAINS[5], torch.float32), bias=torch.randn(4))
