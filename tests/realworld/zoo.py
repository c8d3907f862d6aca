# ruff: noqa: E741 (k, q, p, l, s, r are the letters of the Monarch papers)
"""Registry of the real-world-style KS layers in :mod:`tests.realworld.layers`.

Each :class:`ZooCase` says what the detector must find in the module built by ``make``:
``expected_patterns`` holds one list of ``(a, b, c, d)`` per chain, leftmost first in
``W`` (``y = x @ W.T`` batch-first, ``y = W @ x`` batch-last). ``reference`` rebuilds
every expected chain *with its permutations* and the factors' values gathered from the
module's parameters; ``tests/realworld/test_zoo_eager.py`` checks that this chain's dense
matrix is the module's linear map, so the patterns listed here are proven, not guessed.

Canonical form. The same map can often be written with the permutations in different
places (a digit permutation next to a factor can move into its ``(a, d)`` block
indices). The patterns listed here follow one rule: every factor reads its input as the
user's code lays it out, absorbing the reshape/transpose shuffles it reads through into
``(a, d)``; a permutation stays in the chain only where no factor can absorb it (then it
sits at the output of the factor that produced the shuffled layout). A detector that
places permutations differently finds other, equally valid patterns: compare dense maps
(``ChainRef.chain.to_dense(values)``) in that case.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ksfx.pattern import Chain, DigitPerm, IndexPerm, KSPattern

from . import layers as L

Pattern = tuple[int, int, int, int]


@dataclass(frozen=True)
class ChainRef:
    """One expected chain of a zoo module.

    ``run`` is the user's eager code that computes exactly this chain plus ``bias`` (the
    whole module, or the submodule ending where the chain ends), on an input of the
    module's layout. ``values`` are ``(a, b, c, d)`` tensors in the order of
    ``chain.patterns``, gathered from the module's parameters. ``bias`` has shape
    ``(out_features,)``.
    """

    chain: Chain
    values: tuple[torch.Tensor, ...]
    run: Callable[[torch.Tensor], torch.Tensor]
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class ZooCase:
    name: str
    family: str
    make: Callable[[], tuple[nn.Module, torch.Tensor]]
    expected_patterns: list[list[Pattern]]
    batch_last: bool
    is_ks: bool
    #: the expected chains with permutations and values (None for negative cases)
    reference: Callable[[nn.Module], list[ChainRef]] | None = field(default=None, compare=False)


@contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _maker(build: Callable[[], nn.Module], example_shape: tuple[int, ...], seed: int = 0):
    def make():
        with _seeded(seed):
            return build(), torch.randn(*example_shape)

    return make


def _ks(*patterns: Pattern) -> list[KSPattern]:
    return [KSPattern(*p) for p in patterns]


def _swap(first: int, second: int) -> DigitPerm:
    """``(first, second) -> (second, first)`` on the feature index."""
    return DigitPerm((first, second), (1, 0))


# ----------------------------------------------------------------------------- references
def _monarch_values(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # W = KS(1, s, r, l) @ KS(k, q, p, 1): the transpose shuffle between the bmm's makes
    # l the second factor's d index, so no permutation is left.
    return w2.permute(1, 2, 0).unsqueeze(0), w1.unsqueeze(-1)


def _monarch_ref(m: L.MonarchLinear) -> list[ChainRef]:
    (k, q, p), (l, s, r) = m.blkdiag1.shape, m.blkdiag2.shape
    chain = Chain(tuple(_ks((1, s, r, l), (k, q, p, 1))))
    return [ChainRef(chain, _monarch_values(m.blkdiag1, m.blkdiag2), m, m.bias)]


def _monarch_stack_ref(m: nn.Sequential) -> list[ChainRef]:
    # One chain per layer: the first layer's bias ends its chain (the op's epilogue), the
    # second chain starts at that bias add.
    return [ref for layer in m for ref in _monarch_ref(layer)]


def _ks_bmm_ref(m: L.KSBmmLinear) -> list[ChainRef]:
    values = [f.reshape(a, d, b, c).permute(0, 2, 3, 1) for f, (a, b, c, d) in zip(m.factors, m.patterns)]
    chain = Chain(tuple(_ks(*reversed(m.patterns))))
    bias = None if m.bias is None else m.bias.reshape(-1)
    return [ChainRef(chain, tuple(reversed(values)), m, bias)]


def _ks_einsum_ref(m: L.KSEinsumLinear) -> list[ChainRef]:
    chain = Chain(tuple(_ks(*reversed(m.patterns))))
    return [ChainRef(chain, tuple(reversed(list(m.factors))), m, m.bias)]


def _three_operand_square_ref(m: L.MonarchThreeOperand) -> list[ChainRef]:
    mm = m.w1.shape[0]
    chain = Chain(tuple(_ks((1, mm, mm, mm), (mm, mm, mm, 1))))
    # 'bkp,kqp,qlk->blq': the second operand indexes w2[q, l, k] with q the diagonal index
    return [ChainRef(chain, (m.w2.permute(1, 2, 0).unsqueeze(0), m.w1.unsqueeze(-1)), m)]


def _block_then_mix_ref(m: L.BlockThenMixEinsum) -> list[ChainRef]:
    k, q, p = m.blocks.shape
    s = m.mix.shape[0]
    chain = Chain(tuple(_ks((1, s, k, q), (k, q, p, 1))))
    return [ChainRef(chain, (m.mix.unsqueeze(0), m.blocks.unsqueeze(-1)), m)]


def _masked_ref(pattern: Pattern):
    def ref(m: L.MaskedLinear) -> list[ChainRef]:
        ks = KSPattern(*pattern)
        return [ChainRef(Chain((ks,)), (ks.values_from_dense(m.weight),), m, m.bias)]

    return ref


def _masked_two_ref(first: Pattern, second: Pattern):
    def ref(m: L.MaskedTwoFactor) -> list[ChainRef]:
        k1, k2 = KSPattern(*first), KSPattern(*second)
        values = (k2.values_from_dense(m.weight2), k1.values_from_dense(m.weight1))
        return [ChainRef(Chain((k2, k1)), values, m)]

    return ref


def _blockdiag_dense_ref(m: L.BlockdiagDenseMonarch) -> list[ChainRef]:
    (k, q, p), (l, s, r) = m.w1_bfly.shape, m.w2_bfly.shape
    chain = Chain(tuple(_ks((1, s, r, l), (k, q, p, 1))))
    return [ChainRef(chain, _monarch_values(m.w1_bfly, m.w2_bfly), m)]


def _butterfly_factors(b: L.Butterfly2x2) -> tuple[list[KSPattern], list[torch.Tensor]]:
    """Factors in application order (rightmost first)."""
    n, patterns, values = b.n, [], []
    for idx in range(b.log_n):
        stride = 1 << (idx if b.increasing_stride else b.log_n - 1 - idx)
        patterns.append(KSPattern(n // (2 * stride), 2, 2, stride))
        values.append(b.twiddle[idx].view(n // (2 * stride), stride, 2, 2).permute(0, 2, 3, 1))
    return patterns, values


def _butterfly_ref(m: L.Butterfly2x2) -> list[ChainRef]:
    patterns, values = _butterfly_factors(m)
    return [ChainRef(Chain(tuple(reversed(patterns))), tuple(reversed(values)), m, m.bias)]


def _butterfly_branches_ref(m: L.ButterflyBranches) -> list[ChainRef]:
    """Factor ``k``: ``KS(n / (2s), 2, 2, s)``, value ``diag[k]`` on the diagonal of each 2×2
    block (``β == γ``), ``off[k]`` off it (the partner), both read at the block's row."""
    n, patterns, values = m.n, [], []
    same = torch.eye(2, dtype=torch.bool).reshape(1, 2, 2, 1)
    for k, stride in enumerate(m.strides):
        a = n // (2 * stride)
        on, off = (w[k].reshape(a, 2, 1, stride).expand(a, 2, 2, stride) for w in (m.diag, m.off))
        patterns.append(KSPattern(a, 2, 2, stride))
        values.append(torch.where(same, on, off))
    return [ChainRef(Chain(tuple(reversed(patterns))), tuple(reversed(values)), m)]


def _bitrev_ref(m: L.BitReversalButterfly) -> list[ChainRef]:
    patterns, values = _butterfly_factors(m.butterfly)
    perm = IndexPerm(tuple(m.perm.permutation.tolist()))
    return [ChainRef(Chain((*reversed(patterns), perm)), tuple(reversed(values)), m)]


def _swapaxes_ref(m: L.SwapaxesMatmulKS) -> list[ChainRef]:
    return [ChainRef(Chain((KSPattern(*m.shape4),)), (m.weight.permute(0, 2, 3, 1),), m)]


def _lazy_ref(m: L.LazyKSBatchLast) -> list[ChainRef]:
    values = tuple(v.permute(0, 2, 3, 1) for v in m.values)
    return [ChainRef(Chain(tuple(_ks(*m.ks_shapes))), values, m)]


def _kron_tied_ref(m: L.KroneckerTiedEinsum) -> list[ChainRef]:
    a, b, c = m.weight.shape
    values = m.weight.unsqueeze(-1).expand(a, b, c, m.d)
    return [ChainRef(Chain((KSPattern(a, b, c, m.d),)), (values,), m)]


def _blockdiag_linear_ref(m: L.BlockdiagLinear) -> ChainRef:
    nblocks, q, p = m.weight.shape
    return ChainRef(Chain((KSPattern(nblocks, q, p, 1),)), (m.weight.unsqueeze(-1),), m, m.bias)


def _gated_mlp_ref(m: L.GatedBlockdiagMLP) -> list[ChainRef]:
    # The first chain ends where its output is sliced into the two halves.
    return [_blockdiag_linear_ref(m.gated_layers), _blockdiag_linear_ref(m.wo)]


def _btt_ref(m: L.BTTLinear) -> list[ChainRef]:
    alpha, gamma, phi, eps, rank = m.dims
    # First bmm: x read as (alpha, gamma), blocks over gamma (the d index); its output
    # is laid out (phi, rank, gamma). Second bmm: blocks over phi (the a index), summing
    # over (rank, gamma); its (phi, eps) output is transposed to (eps, phi) at the end.
    first = m.A.permute(2, 1, 0).unsqueeze(0)
    second = m.B.reshape(phi, gamma, rank, eps).permute(0, 3, 2, 1).reshape(phi, eps, rank * gamma, 1)
    chain = Chain((_swap(phi, eps), KSPattern(phi, eps, rank * gamma, 1), KSPattern(1, phi * rank, alpha, gamma)))
    return [ChainRef(chain, (second, first), m, m.bias)]


def _monarch_matrix_ref(m: L.MonarchMatrix) -> list[ChainRef]:
    n = m.sqrt_n
    # shuffle + L-blocks + shuffle read as one KS(1, n, n, n); the R-blocks read their
    # input directly; the last shuffle stays.
    chain = Chain((_swap(n, n), KSPattern(n, n, n, 1), KSPattern(1, n, n, n)))
    return [ChainRef(chain, (m.R.unsqueeze(-1), m.L.permute(1, 2, 0).unsqueeze(0)), m)]


# ----------------------------------------------------------------------------- the registry
ZOO: list[ZooCase] = [
    ZooCase(
        "monarch_bmm_square",
        "monarch_bmm",
        _maker(lambda: L.MonarchLinear(16, 16, 4, bias=False), (6, 16)),
        [[(1, 4, 4, 4), (4, 4, 4, 1)]],
        False,
        True,
        _monarch_ref,
    ),
    ZooCase(
        "monarch_bmm_expand_bias",
        "monarch_bmm",
        _maker(lambda: L.MonarchLinear(16, 32, 4), (2, 3, 16)),
        [[(1, 8, 4, 4), (4, 4, 4, 1)]],
        False,
        True,
        _monarch_ref,
    ),
    ZooCase(
        "monarch_bmm_shrink_bias",
        "monarch_bmm",
        _maker(lambda: L.MonarchLinear(32, 16, 4), (2, 3, 5, 32)),
        [[(1, 4, 4, 4), (4, 4, 8, 1)]],
        False,
        True,
        _monarch_ref,
    ),
    ZooCase(
        "monarch_autograd_out",
        "monarch_autograd_function",
        _maker(lambda: L.MonarchLinear(16, 32, 4, fused=True), (2, 3, 16)),
        [[(1, 8, 4, 4), (4, 4, 4, 1)]],
        False,
        True,
        _monarch_ref,
    ),
    ZooCase(
        "monarch_bmm_stack_bias_between",
        "bias_between_chains",
        _maker(lambda: nn.Sequential(L.MonarchLinear(16, 32, 4), L.MonarchLinear(32, 16, 4)), (2, 3, 16)),
        [[(1, 8, 4, 4), (4, 4, 4, 1)], [(1, 4, 4, 4), (4, 4, 8, 1)]],
        False,
        True,
        _monarch_stack_ref,
    ),
    ZooCase(
        "ks_bmm_general",
        "ks_bmm",
        _maker(lambda: L.KSBmmLinear([(2, 4, 8, 2), (1, 8, 4, 4)]), (5, 32)),
        [[(1, 8, 4, 4), (2, 4, 8, 2)]],
        False,
        True,
        _ks_bmm_ref,
    ),
    ZooCase(
        "ks_bmm_batch_last",
        "ks_bmm",
        _maker(lambda: L.KSBmmLinear([(4, 2, 4, 2), (2, 4, 8, 1)], batch_last=True), (32, 7)),
        [[(2, 4, 8, 1), (4, 2, 4, 2)]],
        True,
        True,
        _ks_bmm_ref,
    ),
    ZooCase(
        "ks_einsum_einops",
        "ks_einsum",
        _maker(lambda: L.KSEinsumLinear([(4, 2, 2, 4), (2, 4, 4, 4), (1, 4, 4, 8)]), (2, 3, 32)),
        [[(1, 4, 4, 8), (2, 4, 4, 4), (4, 2, 2, 4)]],
        False,
        True,
        _ks_einsum_ref,
    ),
    ZooCase(
        "ks_einsum_torch",
        "ks_einsum",
        _maker(lambda: L.KSEinsumLinear([(2, 3, 4, 2), (1, 4, 3, 4)], bias=False, style="torch"), (4, 16)),
        [[(1, 4, 3, 4), (2, 3, 4, 2)]],
        False,
        True,
        _ks_einsum_ref,
    ),
    ZooCase(
        "ks_einsum_einops_batch_last",
        "ks_einsum",
        _maker(lambda: L.KSEinsumLinear([(2, 6, 4, 2)], bias=False, batch_last=True), (16, 3, 5)),
        [[(2, 6, 4, 2)]],
        True,
        True,
        _ks_einsum_ref,
    ),
    ZooCase(
        "ks_einsum_torch_batch_last",
        "ks_einsum",
        _maker(lambda: L.KSEinsumLinear([(4, 2, 2, 2), (2, 4, 4, 2)], batch_last=True, style="torch"), (16, 6)),
        [[(2, 4, 4, 2), (4, 2, 2, 2)]],
        True,
        True,
        _ks_einsum_ref,
    ),
    ZooCase(
        "einsum_three_operand_square",
        "einsum_three_operand",
        _maker(lambda: L.MonarchThreeOperand(4), (5, 16)),
        [[(1, 4, 4, 4), (4, 4, 4, 1)]],
        False,
        True,
        _three_operand_square_ref,
    ),
    ZooCase(
        "einsum_three_operand_rect",
        "einsum_three_operand",
        _maker(lambda: L.BlockThenMixEinsum(k=2, p=8, q=4, s=6), (2, 3, 16)),
        [[(1, 6, 2, 4), (2, 4, 8, 1)]],
        False,
        True,
        _block_then_mix_ref,
    ),
    ZooCase(
        "masked_linear",
        "masked_dense",
        _maker(lambda: L.MaskedLinear(L.ks_mask(2, 8, 4, 2)), (2, 3, 16)),
        [[(2, 8, 4, 2)]],
        False,
        True,
        _masked_ref((2, 8, 4, 2)),
    ),
    ZooCase(
        "masked_matmul_t_two_factors",
        "masked_dense",
        _maker(lambda: L.MaskedTwoFactor((4, 4, 2, 2), (1, 4, 8, 4)), (5, 16)),
        [[(1, 4, 8, 4), (4, 4, 2, 2)]],
        False,
        True,
        _masked_two_ref((4, 4, 2, 2), (1, 4, 8, 4)),
    ),
    ZooCase(
        "blockdiag_dense_einops",
        "block_diag_dense",
        _maker(lambda: L.BlockdiagDenseMonarch(k=3, p=4, q=4, l=4, s=5), (2, 3, 12)),
        [[(1, 5, 3, 4), (3, 4, 4, 1)]],
        False,
        True,
        _blockdiag_dense_ref,
    ),
    ZooCase(
        "butterfly_2x2_increasing",
        "butterfly_mul_sum",
        _maker(lambda: L.Butterfly2x2(16), (2, 3, 16)),
        [[(1, 2, 2, 8), (2, 2, 2, 4), (4, 2, 2, 2), (8, 2, 2, 1)]],
        False,
        True,
        _butterfly_ref,
    ),
    ZooCase(
        "butterfly_2x2_decreasing",
        "butterfly_mul_sum",
        _maker(lambda: L.Butterfly2x2(8, increasing_stride=False, bias=False), (5, 8)),
        [[(4, 2, 2, 1), (2, 2, 2, 2), (1, 2, 2, 4)]],
        False,
        True,
        _butterfly_ref,
    ),
    ZooCase(
        "butterfly_bitrev_index",
        "index_permutation",
        _maker(lambda: L.BitReversalButterfly(8), (2, 3, 8)),
        [[(1, 2, 2, 4), (2, 2, 2, 2), (4, 2, 2, 1)]],
        False,
        True,
        _bitrev_ref,
    ),
    ZooCase(
        "butterfly_branches_index",
        "butterfly_two_branches",
        _maker(lambda: L.ButterflyBranches(8), (2, 3, 8)),
        [[(1, 2, 2, 4), (2, 2, 2, 2), (4, 2, 2, 1)]],
        False,
        True,
        _butterfly_branches_ref,
    ),
    ZooCase(
        "butterfly_branches_flip_decreasing",
        "butterfly_two_branches",
        _maker(lambda: L.ButterflyBranches(16, increasing_stride=False, partner="flip"), (5, 16)),
        [[(8, 2, 2, 1), (4, 2, 2, 2), (2, 2, 2, 4), (1, 2, 2, 8)]],
        False,
        True,
        _butterfly_branches_ref,
    ),
    ZooCase(
        "matmul_swapaxes_broadcast",
        "matmul_broadcast",
        _maker(lambda: L.SwapaxesMatmulKS(2, 4, 3, 2), (2, 3, 12)),
        [[(2, 4, 3, 2)]],
        False,
        True,
        _swapaxes_ref,
    ),
    ZooCase(
        "matmul_swapaxes_batch_last",
        "matmul_broadcast",
        _maker(lambda: L.LazyKSBatchLast([(2, 4, 4, 2), (4, 2, 2, 2)]), (16, 5)),
        [[(2, 4, 4, 2), (4, 2, 2, 2)]],
        True,
        True,
        _lazy_ref,
    ),
    ZooCase(
        "tied_kronecker_expand",
        "tied_weights",
        _maker(lambda: L.KroneckerTiedEinsum(2, 3, 4, 2), (5, 16)),
        [[(2, 3, 4, 2)]],
        False,
        True,
        _kron_tied_ref,
    ),
    ZooCase(
        "gated_mlp_slice",
        "sliced_output",
        _maker(lambda: L.GatedBlockdiagMLP(hidden=16, intermediate=32, nblocks=4), (2, 3, 16)),
        [[(4, 16, 4, 1)], [(4, 4, 8, 1)]],
        False,
        True,
        _gated_mlp_ref,
    ),
    ZooCase(
        "btt_rank2",
        "block_tensor_train",
        _maker(lambda: L.BTTLinear(alpha=4, gamma=4, phi=4, eps=4, rank=2), (2, 3, 16)),
        [[(4, 4, 8, 1), (1, 8, 4, 4)]],
        False,
        True,
        _btt_ref,
    ),
    ZooCase(
        "monarch_mixer_matrix",
        "einops_shuffle",
        _maker(lambda: L.MonarchMatrix(4), (2, 3, 16)),
        [[(4, 4, 4, 1), (1, 4, 4, 4)]],
        False,
        True,
        _monarch_matrix_ref,
    ),
    # ------------------------------------------------------------------------- negatives
    ZooCase(
        "attention_activation_x_activation",
        "negative",
        _maker(lambda: L.HeadsSelfAttention(heads=2), (2, 5, 16)),
        [],
        False,
        False,
    ),
    ZooCase("dense_nn_linear", "negative", _maker(lambda: nn.Linear(16, 32), (2, 3, 16)), [], False, False),
    # nn.Linear on x.unflatten(-1, (k, -1)): the shared block index is one more batch index
    # (the weight does not depend on it), so this is a dense product, left to Inductor.
    ZooCase(
        "shared_block_linear_is_dense",
        "negative",
        _maker(lambda: L.SharedBlockLinear(k=4, p=4, q=6), (2, 3, 16)),
        [],
        False,
        False,
    ),
    ZooCase(
        "masked_linear_tril_not_ks",
        "negative",
        _maker(lambda: L.MaskedLinear(torch.ones(16, 16).tril()), (5, 16)),
        [],
        False,
        False,
    ),
    ZooCase(
        "block_diag_unequal_blocks",
        "negative",
        _maker(L.UnequalBlockdiagLinear, (5, 12)),
        [],
        False,
        False,
    ),
    ZooCase(
        "quadratic_form_einsum",
        "negative",
        _maker(lambda: L.BlockQuadraticGate(k=4, p=4), (2, 3, 16)),
        [],
        False,
        False,
    ),
    ZooCase(
        "hypernetwork_blockdiag",
        "negative",
        _maker(lambda: L.HyperBlockdiag(k=2, p=4), (5, 8)),
        [],
        False,
        False,
    ),
]

ZOO_BY_NAME = {case.name: case for case in ZOO}
