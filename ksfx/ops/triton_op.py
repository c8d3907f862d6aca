"""``ksfx::ks_chain_triton``: the chain op as a ``torch.library.triton_op``, for CUDA tensors.

Same schema, validation, dispatch and autograd as ``ksfx::ks_chain``, but AOT tracing
decomposes it into its body: each generated kernel launch becomes a
``triton_kernel_wrapper_functional`` node, and the plain-torch steps become aten ops.
Inductor then compiles and launches the kernels from its own generated code (no
Python dispatch per call; CUDA graphs and AOTInductor see every kernel) and may fuse a
pointwise epilogue into a kernel's single store
(``torch._inductor.config.epilogue_fusion_user_defined_triton_kernel``).

The ``custom_op`` stays for CPU tensors and the interpreter: an interpreted kernel is
not a ``JITFunction``, so ``wrap_triton`` cannot trace it, and a trace would hand it fake
tensors.
"""

from __future__ import annotations

import contextlib

import torch
from torch.library import triton_op

from ksfx.ops import triton_path
from ksfx.ops.chain_op import backward_through, run_backward, run_forward, setup_context, validate
from ksfx.ops.stats import paused
from ksfx.pattern import Chain


@contextlib.contextmanager
def _traceable(*tensors: torch.Tensor):
    """Kernel launches through ``wrap_triton``; no launch counted while tracing (fake tensors)."""
    tracing = torch._guards.detect_fake_mode(tensors) is not None
    with triton_path.traceable_launches(), paused() if tracing else contextlib.nullcontext():
        yield


@triton_op("ksfx::ks_chain_triton", mutates_args=())
def ks_chain_triton(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    spec: str,
    batch_last: bool,
    bias: torch.Tensor | None,
    dense: int,
) -> torch.Tensor:
    """What ``ksfx::ks_chain`` computes (its docstring states the arguments)."""
    chain = Chain.from_spec(spec)
    validate(x, factors, chain, batch_last, bias, dense)
    with _traceable(x, *factors):
        return run_forward(x, factors, chain, batch_last, bias, dense).contiguous()


@triton_op("ksfx::ks_chain_triton_backward", mutates_args=())
def ks_chain_triton_backward(
    grad: torch.Tensor, x: torch.Tensor, factors: list[torch.Tensor], spec: str, batch_last: bool, need_x: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with _traceable(grad, x, *factors):
        return run_backward(grad.contiguous(), x, factors, Chain.from_spec(spec), batch_last, need_x)


ks_chain_triton.register_autograd(
    backward_through(torch.ops.ksfx.ks_chain_triton_backward), setup_context=setup_context
)
