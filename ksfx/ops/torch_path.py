"""The plain-torch implementation of one factor step: the CPU path and the reference.

Written with reshape/einsum on strided views, which PyTorch lowers to a single batched
matmul per factor; permutations are applied as views where they are digit shuffles and
as ``index_select`` otherwise. Works on any device and dtype.
"""

from __future__ import annotations

import torch

from ksfx.pattern import DigitPerm, FactorStep, Perm


def apply_perm(x: torch.Tensor, perm: Perm | None, batch_last: bool) -> torch.Tensor:
    """Gather the feature index of ``x`` (last dim batch-first, first dim batch-last)."""
    if perm is None:
        return x
    if isinstance(perm, DigitPerm):
        k = len(perm.radices)
        if batch_last:
            moved = x.reshape(*perm.radices, x.shape[-1]).permute(*perm.order, k)
        else:
            moved = x.reshape(x.shape[0], *perm.radices).permute(0, *(o + 1 for o in perm.order))
        return moved.reshape(x.shape)
    index = perm.indices().to(x.device)
    return x.index_select(-1 if not batch_last else 0, index)


def factor_forward(
    x: torch.Tensor, values: torch.Tensor, step: FactorStep, batch_last: bool, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``out_perm(K(in_perm(x))) + bias`` for a 2-D ``x`` of shape ``(n, in)`` or ``(in, n)``."""
    a, b, c, d = step.pattern.as_tuple()
    x = apply_perm(x, step.in_perm, batch_last)
    if batch_last:
        y = torch.einsum("acdn,abcd->abdn", x.reshape(a, c, d, -1), values).reshape(a * b * d, -1)
    else:
        y = torch.einsum("nacd,abcd->nabd", x.reshape(-1, a, c, d), values).reshape(-1, a * b * d)
    y = apply_perm(y, step.out_perm, batch_last)
    if bias is not None:
        y = y + (bias[:, None] if batch_last else bias)
    return y


def factor_grad_values(dy: torch.Tensor, x: torch.Tensor, step: FactorStep, batch_last: bool) -> torch.Tensor:
    """``dL/dvalues`` of one step: the sampled outer product of ``dy`` and ``x``."""
    a, b, c, d = step.pattern.as_tuple()
    x = apply_perm(x, step.in_perm, batch_last)
    dy = apply_perm(dy, None if step.out_perm is None else step.out_perm.inverse(), batch_last)
    if batch_last:
        return torch.einsum("abdn,acdn->abcd", dy.reshape(a, b, d, -1), x.reshape(a, c, d, -1))
    return torch.einsum("nabd,nacd->abcd", dy.reshape(-1, a, b, d), x.reshape(-1, a, c, d))
