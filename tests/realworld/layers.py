# ruff: noqa: E741 (k, q, p, l, s, r are the letters of the Monarch papers)
"""KS layers written the way public projects write them: ksfx's stand-in for unseen user code.

Nothing here imports ksfx: these modules are "user code". Each one mimics the *op
sequence* of a family found in public code bases (written from scratch for ksfx, not
copied):

* Hazy Research fly / m2: Monarch ``blockdiag_butterfly_multiply`` with
  reshape/transpose/bmm, the same inside an ``autograd.Function`` with
  ``torch.bmm(..., out=<non-contiguous>)`` and ``custom_fwd``, the ``torch.block_diag`` +
  ``F.linear`` + einops ``rearrange`` reference, the three-operand einsum reference, the
  m2 block-diagonal linear and its gated MLP, Monarch Mixer's ``MonarchMatrix``;
* ksmm: ``(a*d, b, c)`` bmm and ``(a,b,c,d)`` einsum formulations, batch-first and last;
* torch-butterfly: 2×2 butterfly factors by broadcast multiply + sum, bit reversal by
  indexing with a constant index buffer; FFT-like butterflies written as two weighted
  branches per factor (a diagonal and the partner ``i ^ stride``, by index buffer,
  ``index_select`` or a ``flip`` of the pair axis);
* lazylinop's array-API path: ``swapaxes`` + ``@`` with batch dimensions, batch-last;
* block tensor-train (BTT) layers: two bmm's with a rank index;
* masked dense weights, tied (expanded) weights;
* and look-alikes that are not KS (attention, dense, non-KS supports, quadratic forms).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum as einops_einsum
from einops import rearrange
from torch import nn


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


# ----------------------------------------------------------------------------- Monarch (fly / m2)
def monarch_bmm(x: torch.Tensor, w1_blocks: torch.Tensor, w2_blocks: torch.Tensor) -> torch.Tensor:
    """Two block-diagonal bmm's with a transpose shuffle between them.

    x: (..., n); w1_blocks: (k, q, p) with k*p == n; w2_blocks: (l, s, r) with l*r == k*q.
    Returns (..., s*l).
    """
    batch_shape, n = x.shape[:-1], x.shape[-1]
    batch_dim = math.prod(batch_shape)
    k, q, p = w1_blocks.shape
    l, s, r = w2_blocks.shape
    assert k * p == n and l * r == k * q
    x_blocks = x.reshape(batch_dim, k, p).transpose(0, 1)  # (k, batch, p)
    h = torch.bmm(x_blocks, w1_blocks.transpose(-1, -2))  # (k, batch, q)
    # (batch, k*q) read as (batch, r, l), then blocks over l: (l, batch, r)
    h = h.transpose(0, 1).reshape(batch_dim, r, l).transpose(-1, -2).contiguous().transpose(0, 1)
    out = torch.bmm(h, w2_blocks.transpose(-1, -2))  # (l, batch, s)
    return out.permute(1, 2, 0).reshape(*batch_shape, s * l)


class BlockdiagButterflyOutFn(torch.autograd.Function):
    """Monarch multiply with hand-written backward and bmm's into preallocated transposed outputs.

    The ``out=`` tensors are transposed views (non-contiguous) so that the results land
    in the layout the next step wants: Dynamo graph-breaks on every one of them.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.bfloat16)
    def forward(ctx, x, w1_blocks, w2_blocks):
        batch_shape = x.shape[:-1]
        batch_dim = np.prod(batch_shape)
        k, q, p = w1_blocks.shape
        l, s, r = w2_blocks.shape
        x_blocks = x.reshape(batch_dim, k, p).transpose(0, 1)
        h = torch.empty(batch_dim, k, q, device=x.device, dtype=x.dtype).transpose(0, 1)
        h = torch.bmm(x_blocks, w1_blocks.transpose(-1, -2), out=h)
        h = h.transpose(0, 1).reshape(batch_dim, r, l).transpose(-1, -2).contiguous().transpose(0, 1)
        out = torch.empty(batch_dim, l, s, device=x.device, dtype=x.dtype).transpose(0, 1)
        out = torch.bmm(h, w2_blocks.transpose(-1, -2), out=out)
        out = out.permute(1, 2, 0).reshape(*batch_shape, s * l)
        ctx.save_for_backward(x, w1_blocks, w2_blocks, h)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, w1_blocks, w2_blocks, h = ctx.saved_tensors
        batch_shape, n = x.shape[:-1], x.shape[-1]
        batch_dim = np.prod(batch_shape)
        k, q, p = w1_blocks.shape
        l, s, r = w2_blocks.shape
        dx = dw1 = dw2 = None
        g = grad_out.reshape(batch_dim, s, l).transpose(-1, -2).contiguous().transpose(0, 1)  # (l, batch, s)
        if ctx.needs_input_grad[2]:
            dw2 = torch.bmm(g.transpose(-1, -2), h)
        dh = torch.empty(batch_dim, l, r, device=x.device, dtype=x.dtype).transpose(0, 1)
        dh = torch.bmm(g, w2_blocks, out=dh)  # (l, batch, r)
        dh = dh.transpose(0, 1).transpose(-1, -2).contiguous().reshape(batch_dim, k, q).transpose(0, 1)
        if ctx.needs_input_grad[0]:
            dx = torch.empty(batch_dim, k, p, device=x.device, dtype=x.dtype)
            dx = torch.bmm(dh, w1_blocks, out=dx.transpose(0, 1)).transpose(0, 1).reshape(*batch_shape, n)
        if ctx.needs_input_grad[1]:
            dw1 = torch.bmm(dh.transpose(-1, -2), x.reshape(batch_dim, k, p).transpose(0, 1))
        return dx, dw1, dw2


blockdiag_butterfly_out = BlockdiagButterflyOutFn.apply


class MonarchLinear(nn.Module):
    """Monarch layer ``in_features -> out_features`` with ``nblocks`` blocks per factor.

    ``fused=True`` goes through the ``autograd.Function`` with ``out=`` bmm's (the form
    Dynamo cannot trace); ``fused=False`` through :func:`monarch_bmm`.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True, fused: bool = False):
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(f"{in_features=} and {out_features=} must be multiples of {nblocks=}")
        in_blk, out_blk = in_features // nblocks, out_features // nblocks
        if in_features < out_features:
            self.blkdiag1 = _uniform(nblocks, in_blk, in_blk, fan_in=in_blk)
            self.blkdiag2 = _uniform(nblocks, out_blk, in_blk, fan_in=in_blk)
        else:
            self.blkdiag1 = _uniform(nblocks, out_blk, in_blk, fan_in=in_blk)
            self.blkdiag2 = _uniform(nblocks, out_blk, out_blk, fan_in=out_blk)
        self.bias = _uniform(out_features, fan_in=in_features) if bias else None
        self.fused = fused

    def forward(self, x):
        multiply = blockdiag_butterfly_out if self.fused else monarch_bmm
        out = multiply(x, self.blkdiag1, self.blkdiag2)
        return out + self.bias if self.bias is not None else out


class MonarchThreeOperand(nn.Module):
    """Square Monarch in one einsum holding both factors (the ``version=1`` reference style)."""

    def __init__(self, sqrt_n: int):
        super().__init__()
        m = sqrt_n
        self.w1 = _uniform(m, m, m, fan_in=m)
        self.w2 = _uniform(m, m, m, fan_in=m)

    def forward(self, x):
        batch, n = x.shape
        m = self.w1.shape[0]
        x_blocks = rearrange(x, "b (k p) -> b k p", k=m)
        return torch.einsum("bkp,kqp,qlk->blq", x_blocks, self.w1, self.w2).reshape(batch, n)


class BlockThenMixEinsum(nn.Module):
    """Rectangular: ``k`` blocks ``p -> q`` then, per ``q``, a ``k -> s`` mix, in one einsum."""

    def __init__(self, k: int, p: int, q: int, s: int):
        super().__init__()
        self.blocks = _uniform(k, q, p, fan_in=p)
        self.mix = _uniform(s, k, q, fan_in=k)

    def forward(self, x):
        k = self.blocks.shape[0]
        xb = x.unflatten(-1, (k, -1))
        y = torch.einsum("...kp,kqp,skq->...sq", xb, self.blocks, self.mix)
        return y.flatten(-2)


class BlockdiagDenseMonarch(nn.Module):
    """Monarch through dense block-diagonal weights rebuilt at every call (the ``version=3`` style)."""

    def __init__(self, k: int, p: int, q: int, l: int, s: int):
        super().__init__()
        if (k * q) % l:
            raise ValueError(f"l={l} must divide k*q={k * q}")
        self.w1_bfly = _uniform(k, q, p, fan_in=p)
        self.w2_bfly = _uniform(l, s, k * q // l, fan_in=k * q // l)

    def forward(self, x):
        l = self.w2_bfly.shape[0]
        w1_dense = torch.block_diag(*torch.unbind(self.w1_bfly, dim=0))
        h = F.linear(x, w1_dense)
        h = rearrange(h, "... (r l) -> ... (l r)", l=l)
        w2_dense = torch.block_diag(*torch.unbind(self.w2_bfly, dim=0))
        out = F.linear(h, w2_dense)
        return rearrange(out, "... (l s) -> ... (s l)", l=l)


def blockdiag_multiply_bmm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: (..., nblocks * p); weight: (nblocks, q, p). Returns (..., nblocks * q)."""
    batch_shape = x.shape[:-1]
    nblocks, q, p = weight.shape
    seq = math.prod(batch_shape)
    xb = x.reshape(seq, nblocks, p).transpose(0, 1)
    out = torch.bmm(xb, weight.transpose(-1, -2))
    return out.transpose(0, 1).reshape(*batch_shape, nblocks * q)


class BlockdiagLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True):
        super().__init__()
        self.weight = _uniform(nblocks, out_features // nblocks, in_features // nblocks, fan_in=in_features // nblocks)
        self.bias = _uniform(out_features, fan_in=in_features) if bias else None

    def forward(self, x):
        out = blockdiag_multiply_bmm(x, self.weight)
        return out if self.bias is None else out + self.bias


class GatedBlockdiagMLP(nn.Module):
    """GLU MLP: one block-diagonal layer makes both halves, sliced apart (m2-BERT style)."""

    def __init__(self, hidden: int, intermediate: int, nblocks: int):
        super().__init__()
        self.intermediate = intermediate
        self.gated_layers = BlockdiagLinear(hidden, 2 * intermediate, nblocks)
        self.act = nn.GELU(approximate="none")
        self.wo = BlockdiagLinear(intermediate, hidden, nblocks)

    def forward(self, x):
        h = self.gated_layers(x)
        gated, non_gated = h[..., : self.intermediate], h[..., self.intermediate :]
        return self.wo(self.act(gated) * non_gated)


def blockdiag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bnm,...bm->...bn", w, x.view(*x.shape[:-1], w.shape[0], w.shape[-1])).reshape(*x.shape)


class MonarchMatrix(nn.Module):
    """Square Monarch as in Monarch Mixer write-ups: shuffle, blocks, shuffle, blocks, shuffle."""

    def __init__(self, sqrt_n: int):
        super().__init__()
        self.sqrt_n = sqrt_n
        self.L = _uniform(sqrt_n, sqrt_n, sqrt_n, fan_in=sqrt_n)
        self.R = _uniform(sqrt_n, sqrt_n, sqrt_n, fan_in=sqrt_n)

    def forward(self, x):
        x = rearrange(x, "... (m n) -> ... (n m)", n=self.sqrt_n)
        x = blockdiag_matmul(x, self.L)
        x = rearrange(x, "... (m n) -> ... (n m)", n=self.sqrt_n)
        x = blockdiag_matmul(x, self.R)
        return rearrange(x, "... (m n) -> ... (n m)", n=self.sqrt_n)


# ----------------------------------------------------------------------------- ksmm-style (a, b, c, d)
class KSBmmLinear(nn.Module):
    """Chain of KS factors stored in bmm format ``(a*d, b, c)``.

    ``patterns`` are listed in application order (rightmost factor of ``W`` first), as
    the ksmm reference code does.
    """

    def __init__(self, patterns, bias: bool = True, batch_last: bool = False):
        super().__init__()
        self.patterns = [tuple(p) for p in patterns]
        self.batch_last = batch_last
        self.factors = nn.ParameterList(_uniform(a * d, b, c, fan_in=c) for a, b, c, d in self.patterns)
        a, b, _, d = self.patterns[-1]
        out_size = a * b * d
        bias_shape = (out_size, 1) if batch_last else (out_size,)
        self.bias = _uniform(*bias_shape, fan_in=out_size) if bias else None

    @staticmethod
    def _factor_bs_first(x, factor, pattern):
        a, b, c, d = pattern
        batch = x.shape[0]
        xp = x.reshape(batch, a, c, d).transpose(-1, -2).reshape(batch, a * d, c).transpose(0, 1)
        y = torch.bmm(xp, factor.transpose(-1, -2))  # (a*d, batch, b)
        return y.transpose(0, 1).reshape(batch, a, d, b).transpose(-1, -2).reshape(batch, a * b * d)

    @staticmethod
    def _factor_bs_last(x, factor, pattern):
        a, b, c, d = pattern
        batch = x.shape[-1]
        xp = x.reshape(a, c, d, batch).transpose(1, 2).reshape(a * d, c, batch)
        y = torch.bmm(factor, xp)  # (a*d, b, batch)
        return y.reshape(a, d, b, batch).transpose(1, 2).reshape(a * b * d, batch)

    def forward(self, x):
        step = self._factor_bs_last if self.batch_last else self._factor_bs_first
        out = x
        for factor, pattern in zip(self.factors, self.patterns):
            out = step(out, factor, pattern)
        return out if self.bias is None else out + self.bias


class KSEinsumLinear(nn.Module):
    """Chain of KS factors stored as ``(a, b, c, d)``, applied by einsum.

    ``style="einops"``: einops ``rearrange`` + ``einops.einsum`` (batch dims as ``...``);
    ``style="torch"``: ``reshape`` + ``torch.einsum``. Application order as in
    :class:`KSBmmLinear`.
    """

    def __init__(self, patterns, bias: bool = True, batch_last: bool = False, style: str = "einops"):
        super().__init__()
        self.patterns = [tuple(p) for p in patterns]
        self.batch_last, self.style = batch_last, style
        self.factors = nn.ParameterList(_uniform(a, b, c, d, fan_in=c) for a, b, c, d in self.patterns)
        a, b, _, d = self.patterns[-1]
        self.bias = _uniform(a * b * d, fan_in=a * b * d) if bias else None

    def _factor(self, x, w):
        a, b, c, d = w.shape
        if self.style == "einops" and not self.batch_last:
            x = rearrange(x, "... (a c d) -> ... a c d", a=a, c=c, d=d)
            return rearrange(einops_einsum(x, w, "... a c d, a b c d -> ... a b d"), "... a b d -> ... (a b d)")
        if self.style == "einops":
            x = rearrange(x, "(a c d) ... -> a c d ...", a=a, c=c, d=d)
            return rearrange(einops_einsum(x, w, "a c d ..., a b c d -> a b d ..."), "a b d ... -> (a b d) ...")
        if self.batch_last:
            y = torch.einsum("acdn,abcd->abdn", x.reshape(a, c, d, -1), w)
            return y.reshape(a * b * d, *x.shape[1:])
        y = torch.einsum("...acd,abcd->...abd", x.reshape(*x.shape[:-1], a, c, d), w)
        return y.reshape(*x.shape[:-1], a * b * d)

    def forward(self, x):
        for w in self.factors:
            x = self._factor(x, w)
        if self.bias is None:
            return x
        return x + (self.bias.reshape(-1, *([1] * (x.ndim - 1))) if self.batch_last else self.bias)


# ----------------------------------------------------------------------------- masked dense weights
def ks_mask(a: int, b: int, c: int, d: int) -> torch.Tensor:
    return torch.kron(torch.kron(torch.eye(a), torch.ones(b, c)), torch.eye(d))


class MaskedLinear(nn.Module):
    """Dense weight times a fixed 0/1 mask buffer, through ``F.linear``."""

    def __init__(self, mask: torch.Tensor, bias: bool = True):
        super().__init__()
        out_features, in_features = mask.shape
        self.register_buffer("mask", mask)
        self.weight = _uniform(out_features, in_features, fan_in=in_features)
        self.bias = _uniform(out_features, fan_in=in_features) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MaskedTwoFactor(nn.Module):
    """Two masked factors in a row, written ``input @ (mask * weight).t()``."""

    def __init__(self, first: tuple, second: tuple):
        super().__init__()
        self.register_buffer("mask1", ks_mask(*first))
        self.register_buffer("mask2", ks_mask(*second))
        self.weight1 = _uniform(*self.mask1.shape, fan_in=first[2])
        self.weight2 = _uniform(*self.mask2.shape, fan_in=second[2])

    def forward(self, x):
        h = x @ (self.mask1 * self.weight1).t()
        return h @ (self.mask2 * self.weight2).t()


# ----------------------------------------------------------------------------- butterflies (torch-butterfly)
class Butterfly2x2(nn.Module):
    """Product of ``log2(n)`` butterfly factors with 2×2 blocks, no matmul at all.

    Twiddle ``(log_n, n/2, 2, 2)``: factor ``idx`` has stride ``2**idx`` (increasing) or
    ``n / 2**(idx+1)`` (decreasing); each is a broadcast multiply and a sum.
    """

    def __init__(self, n: int, increasing_stride: bool = True, bias: bool = True):
        super().__init__()
        log_n = int(math.log2(n))
        if 1 << log_n != n:
            raise ValueError(f"n={n} must be a power of 2")
        self.n, self.log_n, self.increasing_stride = n, log_n, increasing_stride
        self.twiddle = nn.Parameter(torch.randn(log_n, n // 2, 2, 2) / math.sqrt(2))
        self.bias = nn.Parameter(torch.zeros(n).uniform_(-0.5, 0.5)) if bias else None

    def forward(self, x):
        batch_shape, n = x.shape[:-1], self.n
        out = x.reshape(-1, n)
        for idx in range(self.log_n):
            log_stride = idx if self.increasing_stride else self.log_n - 1 - idx
            stride = 1 << log_stride
            t = self.twiddle[idx].view(n // (2 * stride), stride, 2, 2).permute(0, 2, 3, 1)
            out = (t * out.view(-1, n // (2 * stride), 1, 2, stride)).sum(dim=3)
        out = out.reshape(*batch_shape, n)
        return out if self.bias is None else out + self.bias


def bitreversal_permutation(n: int) -> torch.Tensor:
    log_n = int(math.log2(n))
    perm = torch.arange(n).reshape(n, 1)
    for _ in range(log_n):
        half = perm.shape[0] // 2
        perm = torch.cat((perm[:half], perm[half:]), dim=1)
    return perm.reshape(-1)


class FixedPermutation(nn.Module):
    def __init__(self, permutation: torch.Tensor):
        super().__init__()
        self.register_buffer("permutation", permutation)

    def forward(self, x):
        return x[..., self.permutation]


class BitReversalButterfly(nn.Module):
    """FFT-like: bit-reverse the input by indexing, then increasing-stride butterflies."""

    def __init__(self, n: int):
        super().__init__()
        self.perm = FixedPermutation(bitreversal_permutation(n))
        self.butterfly = Butterfly2x2(n, increasing_stride=True, bias=False)

    def forward(self, x):
        return self.butterfly(self.perm(x))


class ButterflyBranches(nn.Module):
    """Butterfly as ``log2(n)`` factors ``y = diag[k] * x + off[k] * x[..., partner]``.

    Factor ``k`` pairs index ``i`` with its partner ``i ^ stride`` (stride ``2**k``
    increasing, or decreasing); the partner is read with an index buffer (``"index"``),
    ``torch.index_select`` (``"index_select"``) or by flipping the pair axis of a
    ``(n / (2 * stride), 2, stride)`` view (``"flip"``).
    """

    def __init__(self, n: int, increasing_stride: bool = True, partner: str = "index"):
        super().__init__()
        log_n = int(math.log2(n))
        if 1 << log_n != n:
            raise ValueError(f"n={n} must be a power of 2")
        self.n, self.partner = n, partner
        self.strides = [1 << k for k in range(log_n)]
        if not increasing_stride:
            self.strides.reverse()
        self.diag = nn.Parameter(torch.randn(log_n, n) / math.sqrt(2))
        self.off = nn.Parameter(torch.randn(log_n, n) / math.sqrt(2))
        for k, stride in enumerate(self.strides):
            self.register_buffer(f"partner_{k}", torch.arange(n) ^ stride)

    def _partner(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if self.partner == "index":
            return x[..., getattr(self, f"partner_{k}")]
        if self.partner == "index_select":
            return torch.index_select(x, -1, getattr(self, f"partner_{k}"))
        stride = self.strides[k]
        return x.view(*x.shape[:-1], self.n // (2 * stride), 2, stride).flip(-2).reshape(x.shape)

    def forward(self, x):
        for k in range(len(self.strides)):
            x = self.diag[k] * x + self.off[k] * self._partner(x, k)
        return x


class PairedBranches(nn.Module):
    """One factor written as two branches ``w1 * x + w2 * x[..., perm]`` with any permutation."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        n = perm.numel()
        self.w1 = _uniform(n, fan_in=2)
        self.w2 = _uniform(n, fan_in=2)
        self.register_buffer("perm", perm)

    def forward(self, x):
        return self.w1 * x + self.w2 * x[..., self.perm]


# ----------------------------------------------------------------------------- matmul with batch dims (lazylinop-like)
class SwapaxesMatmulKS(nn.Module):
    """One KS factor as a broadcast matmul: weight ``(a, d, b, c)``, batch-first, any leading dims."""

    def __init__(self, a: int, b: int, c: int, d: int):
        super().__init__()
        self.shape4 = (a, b, c, d)
        self.weight = _uniform(a, d, b, c, fan_in=c)

    def forward(self, x):
        a, b, c, d = self.shape4
        xs = x.reshape(*x.shape[:-1], a, c, d).swapaxes(-1, -2)  # (..., a, d, c)
        y = (xs.unsqueeze(-2) @ self.weight.transpose(-1, -2)).squeeze(-2)  # (..., a, d, b)
        return y.swapaxes(-1, -2).reshape(*x.shape[:-1], a * b * d)


class LazyKSBatchLast(nn.Module):
    """Chain ``K_0 @ K_1 @ ...`` applied to ``x`` of shape ``(in, batch)``; factor ``k`` stored ``(a, d, b, c)``.

    ``ks_shapes`` are listed leftmost first; the rightmost factor is applied first. Like
    lazylinop, each step first multiplies a row of the values by a column of ``x`` only
    to learn the result dtype: dead code in the traced graph.
    """

    def __init__(self, ks_shapes):
        super().__init__()
        self.ks_shapes = [tuple(p) for p in ks_shapes]
        self.values = nn.ParameterList(_uniform(a, d, b, c, fan_in=c) for a, b, c, d in self.ks_shapes)

    def forward(self, x):
        batch = x.shape[1]
        for v in reversed(list(self.values)):
            a, d, b, c = v.shape
            dtype = (v[0, 0, 0, :] @ x[:c, 0].reshape(-1, 1)).dtype
            xs = x.reshape(a, c, d, batch).swapaxes(1, 2)  # (a, d, c, batch)
            x = (v @ xs).swapaxes(1, 2).reshape(-1, batch).to(dtype)  # (a*b*d, batch)
        return x


# ----------------------------------------------------------------------------- tied weights
class SharedBlockLinear(nn.Module):
    """Grouped linear whose ``k`` groups share one ``(q, p)`` weight: ``F.linear`` on an unflattened view."""

    def __init__(self, k: int, p: int, q: int):
        super().__init__()
        self.k = k
        self.linear = nn.Linear(p, q)

    def forward(self, x):
        return self.linear(x.unflatten(-1, (self.k, -1))).flatten(-2)


class KroneckerTiedEinsum(nn.Module):
    """Weight ``(a, b, c)`` broadcast along ``d``: a KS factor ``B ⊗ I_d`` blockwise, by einsum."""

    def __init__(self, a: int, b: int, c: int, d: int):
        super().__init__()
        self.d = d
        self.weight = _uniform(a, b, c, fan_in=c)

    def forward(self, x):
        a, b, c = self.weight.shape
        w = self.weight.unsqueeze(-1).expand(a, b, c, self.d)
        y = torch.einsum("...acd,abcd->...abd", x.unflatten(-1, (a, c, self.d)), w)
        return y.flatten(-3)


# ----------------------------------------------------------------------------- block tensor-train
class BTTLinear(nn.Module):
    """Rank-``rank`` block tensor-train layer ``(alpha*gamma) -> (eps*phi)`` with two bmm's."""

    def __init__(self, alpha: int, gamma: int, phi: int, eps: int, rank: int, bias: bool = True):
        super().__init__()
        self.dims = (alpha, gamma, phi, eps, rank)
        self.A = _uniform(gamma, alpha, phi * rank, fan_in=alpha)
        self.B = _uniform(phi, gamma * rank, eps, fan_in=gamma * rank)
        self.bias = _uniform(eps * phi, fan_in=alpha * gamma) if bias else None

    def forward(self, x):
        alpha, gamma, phi, eps, rank = self.dims
        batch_shape = x.shape[:-1]
        bsz = math.prod(batch_shape)
        xs = x.reshape(bsz, alpha, gamma).permute(2, 0, 1)  # (gamma, bsz, alpha)
        z = torch.bmm(xs, self.A)  # (gamma, bsz, phi*rank)
        z = z.reshape(gamma, bsz, phi, rank).transpose(0, 2).contiguous()  # (phi, bsz, gamma, rank)
        y = torch.bmm(z.reshape(phi, bsz, gamma * rank), self.B)  # (phi, bsz, eps)
        y = y.permute(1, 2, 0).reshape(*batch_shape, eps * phi)
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------- look-alikes that are not KS
class HeadsSelfAttention(nn.Module):
    """Attention without projections: every contraction is activation × activation."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        q = rearrange(x, "b t (h e) -> b h t e", h=self.heads)
        scores = q @ q.transpose(-1, -2) / math.sqrt(q.shape[-1])
        out = scores.softmax(dim=-1) @ q
        return rearrange(out, "b h t e -> b t (h e)")


class UnequalBlockdiagLinear(nn.Module):
    """Dense block-diagonal weight whose two blocks have different shapes."""

    def __init__(self):
        super().__init__()
        self.w_a = _uniform(6, 4, fan_in=4)
        self.w_b = _uniform(2, 8, fan_in=8)

    def forward(self, x):
        return F.linear(x, torch.block_diag(self.w_a, self.w_b))


class BlockQuadraticGate(nn.Module):
    """``x`` scaled by a per-block quadratic form of itself: one einsum, ``x`` in it twice."""

    def __init__(self, k: int, p: int):
        super().__init__()
        self.k = k
        self.w = _uniform(k, p, p, fan_in=p)

    def forward(self, x):
        xb = x.unflatten(-1, (self.k, -1))
        score = torch.einsum("...kp,kqp,...kq->...k", xb, self.w, xb)
        return (xb * score.unsqueeze(-1)).flatten(-2)


class HyperBlockdiag(nn.Module):
    """Block-diagonal weights generated from the input (a hypernetwork): not a fixed linear map."""

    def __init__(self, k: int, p: int):
        super().__init__()
        self.k, self.p = k, p
        self.gen = nn.Linear(k * p, k * p * p)

    def forward(self, x):
        w = self.gen(x).unflatten(-1, (self.k, self.p, self.p))
        y = torch.einsum("...kp,...kqp->...kq", x.unflatten(-1, (self.k, self.p)), w)
        return y.flatten(-2)
