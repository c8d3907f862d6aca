"""Which implementation runs a factor step: the generated Triton kernel or cuBLAS bmm.

The policy is measured, not assumed. On an H100 (torch 2.11, triton 3.6, batch 25,088;
``benchmarks/results/gpu_kernel_check_h100_2026-11-23.json``) the generated kernel

* wins by 6-27x in FMA mode (blocks smaller than 16x16: butterflies), where bmm on
  tiny matrices is latency bound and the permutations dominate;
* wins in fp16/bf16 tensor-core mode when it reads the features it gathers with unit
  stride: batch-first with ``d == 1`` (1.3-2.8x), batch-last with ``d >= 16``;
* loses where its loads of ``x`` stride by ``d`` along the contiguous axis
  (batch-first with ``d > 1``: 0.2-0.7x) and, so far, with fp32 operands (IEEE or TF32
  ``tl.dot`` against cuBLAS).

Those steps run the plain-torch path (reshape/einsum, i.e. cuBLAS bmm) on CUDA. These
timings are of the one-δ-per-program kernel: batch-first ``d > 1`` now runs the δ-tiled
``forward_dot3`` (contiguous runs, wgmma in the sm_90 census), not measured on a GPU yet;
``benchmarks.gpu_suite`` times the generated kernels on every case, the data to re-derive
this policy from (``KSFX_DISPATCH=triton`` runs them meanwhile). Under
``ksfx.config.dispatch = "auto"`` a step's first call on CUDA times both and keeps the
faster (:mod:`ksfx.ops.race`): this policy picks only where nothing can be timed (a trace
without an earlier decision, a CUDA graph capture). The interpreter always runs the
kernels (it exists to test them), and ``ksfx.config.dispatch`` = ``"triton"`` /
``"torch"`` overrides both.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from ksfx.codegen import devices
from ksfx.codegen.fusion import Ceilings, Segment, ceilings, segments
from ksfx.codegen.tiling import uses_tensor_cores
from ksfx.config import config
from ksfx.ops import torch_path
from ksfx.pattern import FactorStep

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def chain_implementation(x: torch.Tensor) -> tuple[str, ModuleType]:
    """Name and module that can run a chain on ``x`` at all."""
    if x.dtype in TRITON_DTYPES and (x.is_cuda or (config.interpret and x.device.type == "cpu")):
        from ksfx.ops import triton_path

        return ("triton" if x.is_cuda else "triton-interpret"), triton_path
    return torch_path_name(x), torch_path


def torch_path_name(x: torch.Tensor) -> str:
    """What ``ksfx.stats()`` calls the plain-torch path on ``x``'s device."""
    return "cpu" if x.device.type == "cpu" else f"torch-{x.device.type}"


def step_implementation(x: torch.Tensor, step: FactorStep, batch_last: bool) -> tuple[str, ModuleType]:
    """Name and module for one step, applying the measured policy on CUDA."""
    name, impl = chain_implementation(x)
    if impl is torch_path or not x.is_cuda:
        return name, impl
    if config.dispatch not in ("auto", "triton", "torch"):
        raise ValueError(f"ksfx.config.dispatch must be 'auto', 'triton' or 'torch', got {config.dispatch!r}")
    if config.dispatch == "torch" or (config.dispatch == "auto" and not prefers_triton(step, batch_last, x.dtype)):
        return "torch-cuda", torch_path
    return name, impl


@functools.lru_cache(maxsize=4096)
def prefers_triton(step: FactorStep, batch_last: bool, dtype: torch.dtype) -> bool:
    """Whether the generated kernel beats cuBLAS bmm for this step (see module doc)."""
    if not uses_tensor_cores(step.pattern, batch_last):
        return True
    if dtype == torch.float32:
        return False
    d = step.pattern.d
    return d >= 16 if batch_last else d == 1


def chain_segments(x: torch.Tensor, plan: list[FactorStep], batch_last: bool, dense: list[bool]) -> list[Segment]:
    """The plan cut into fused segments and single steps, for the implementation running ``x``.

    Fused segments exist only for the generated kernels: under the interpreter (which
    exists to test them) every run that fits fuses; on CUDA a run is cut where the roofline
    on this GPU's ceilings says fusing pays (:func:`~ksfx.codegen.fusion.roofline_gain`),
    and under ``ksfx.config.fuse = "auto"`` each segment then runs fused only where its
    first call timed it faster than its steps one by one (:mod:`ksfx.ops.race`);
    ``"always"`` skips the timing, ``"never"`` fuses nothing.
    """
    if config.fuse not in ("auto", "always", "never"):
        raise ValueError(f"ksfx.config.fuse must be 'auto', 'always' or 'never', got {config.fuse!r}")
    name, _ = chain_implementation(x)
    if config.fuse == "never" or not name.startswith("triton") or (x.is_cuda and config.dispatch == "torch"):
        return [Segment(k, k + 1, False, "fusion off") for k in range(len(plan))]
    return segments(plan, batch_last, dense, fusion_ceilings(x))


def fusion_ceilings(x: torch.Tensor) -> Ceilings | None:
    """The ceilings fusion plans with for ``x`` on CUDA; ``None`` elsewhere (the interpreter
    fuses every run that fits)."""
    return gpu_ceilings(torch.cuda.get_device_name(x.device), x.dtype) if x.is_cuda else None


def gpu_ceilings(gpu: str, dtype: torch.dtype) -> Ceilings:
    """The ceilings of the GPU ``torch.cuda.get_device_name`` calls ``gpu`` for ``dtype``
    under torch's matmul precision, with ``config.fuse_min_gain``."""
    from ksfx.ops.triton_path import dot_precision

    return ceilings(devices.named(gpu), str(dtype).removeprefix("torch."), dot_precision(dtype), config.fuse_min_gain)
