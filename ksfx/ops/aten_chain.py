"""The chain as plain aten ops, for graphs Inductor compiles on a CPU.

On a CPU the ``ks_chain`` op would be one opaque call whose einsums each pay their own
layout copies. Inlined as the ops below instead, the chain is visible to Inductor: it
fuses the few layout moves left with the LayerNorm, GELU, residual or cast around the
chain, and differentiates it for training.

The chain runs batch-last inside, whatever the input layout: with the batch as the
unit-stride axis, the input of factor ``(a, b, c, d)`` is a ``(a, d)``-batch of
``(c, n)`` matrices read in place for ``a = 1`` or ``d = 1`` and its output is stored
once in the next factor's order (:func:`as_buffer`). A batch-first chain transposes
once on the way in and once on the way out, moves Inductor fuses into the
neighbouring ops. Small blocks
(:data:`SMALL_BLOCK`) are a broadcast multiply and a sum over ``γ``, a loop Inductor
generates, rather than a batched matmul of tiny matrices.
"""

from __future__ import annotations

import functools

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


def _store_output(step: FactorStep, batch_last: bool, dtype: torch.dtype) -> bool:
    """Whether the chain's output goes through :func:`as_buffer` before the caller reads it.

    Batch-last, readers walk the batch, which has unit stride in the factor's output too:
    a copy would only add a pass. Batch-first, they read it transposed, which Inductor
    vectorises in tiles of one SIMD vector along the features: fine where the layout
    move keeps such runs in place (``d`` a multiple of the vector length; the Monarch
    2048 block at 8192 rows ran at 0.87x of Inductor when stored, 1.26x when not),
    compiled scalar otherwise (``d = 2``: 0.64x left, 1.1x stored).
    """
    if batch_last:
        return False
    if step.out_perm is not None:
        return True
    p = step.pattern
    if p.d == 1 or p.b == 1 or p.b * p.c <= SMALL_BLOCK:  # no layout move after the factor
        return False
    return p.d % _simd_width(dtype) != 0


@functools.cache
def _simd_width(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` per SIMD vector in the code Inductor generates on this CPU (1: none)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return max(1, isa.bit_width() // (8 * dtype.itemsize)) if isa else 1


@torch.library.custom_op("ksfx::as_buffer", mutates_args=())
def as_buffer(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that the backend's compiler must store as a buffer of its own.

    Left a view, the layout move that made ``t`` is fused into every reader, which
    then indexes it by div/mod of its flat feature and is compiled scalar (the
    batch-first GELU after a ``d = 2`` factor ran at 14 ns per element). Stored, the
    move is one copy vectorised along the batch and the readers load a plain 2-D
    layout. Inductor's lowering (registered by the backend) stores the input and
    reads it back, so the copy below only runs under other compilers and eagerly.
    """
    return t.clone()


@as_buffer.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _as_buffer_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return as_buffer(grad)  # the gradient's layout move, stored the same way


as_buffer.register_autograd(_as_buffer_backward)


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
        steps = factor_steps(factors, plan, dense)
        for k, (values, step, as_dense) in enumerate(steps):
            y = _factor(h, values, step)
            h = _nonfinite_as_dense(h, y, step, batch_last=True) if as_dense else y
            if k < len(steps) - 1 or _store_output(step, batch_last, x.dtype):
                h = as_buffer(h)
    if bias is not None:
        h = h + bias[:, None]
    return h if batch_last else h.t()
