"""The chain as plain aten ops, for graphs Inductor compiles on a CPU.

On a CPU the ``ks_chain`` op would be one opaque call whose einsums each pay their own
layout copies. Inlined as the ops below instead, the chain is visible to Inductor: it
fuses the few layout moves left with the LayerNorm, GELU, residual or cast around the
chain, and differentiates it for training.

The chain runs batch-last inside, whatever the input layout: with the batch as the
unit-stride axis, the input of factor ``(a, b, c, d)`` is a ``(a, d)``-batch of
``(c, n)`` matrices read in place for ``a = 1`` or ``d = 1`` and its output is written
in the next factor's order. A batch-first chain transposes once on the way in and once
on the way out, moves Inductor fuses into the neighbouring ops. Small blocks
(:data:`SMALL_BLOCK`) are a broadcast multiply and a sum over ``γ``, a loop Inductor
generates, rather than a batched matmul of tiny matrices.
"""

from __future__ import annotations

import torch

from ksfx.ops.chain_op import _nonfinite_as_dense, factor_steps
from ksfx.ops.torch_path import apply_perm
from ksfx.pattern import Chain, FactorStep, PermStep, split_chain

#: Largest ``b * c`` computed as multiply-and-sum instead of a batched matmul.
SMALL_BLOCK = 16


def _factor(h: torch.Tensor, values: torch.Tensor, step: FactorStep) -> torch.Tensor:
    """``out_perm(K(in_perm(h)))`` for a batch-last ``h`` of shape ``(in, n)``."""
    a, b, c, d = step.pattern.as_tuple()
    n = h.shape[1]
    x = apply_perm(h, step.in_perm, batch_last=True).reshape(a, c, d, n)
    if b * c <= SMALL_BLOCK:
        y = (values[:, :, :, :, None] * x[:, None]).sum(2)  # (a, b, d, n)
    else:
        y = torch.matmul(values.permute(0, 3, 1, 2), x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # (a, b, d, n)
    return apply_perm(y.reshape(a * b * d, n), step.out_perm, batch_last=True)


def chain_as_aten(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    spec: str,
    batch_last: bool,
    bias: torch.Tensor | None,
    dense: int,
) -> torch.Tensor:
    """What ``ksfx::ks_chain(x, factors, spec, batch_last, bias, dense)`` computes, in traceable ops."""
    chain = Chain.from_spec(spec)
    plan = split_chain(chain)
    h = x if batch_last else x.t()
    if isinstance(plan, PermStep):
        h = apply_perm(h, plan.perm, batch_last=True).clone()
    else:
        for values, step, as_dense in factor_steps(factors, plan, dense):
            y = _factor(h, values, step)
            h = _nonfinite_as_dense(h, y, step, batch_last=True) if as_dense else y
    if bias is not None:
        h = h + bias[:, None]
    return h if batch_last else h.t()
