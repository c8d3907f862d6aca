"""Every kernel the op would launch for a chain, compiled for a GPU on a machine without one.

The launches are planned by the same functions the op runs (:func:`triton_path.forward_plan`,
:func:`triton_path.forward_arguments`, ...) on ``meta`` tensors, with the target's SM
count and compute capability, so the compiled kernels are the ones a real launch of the
op would build: same source, tile, specialisation. Each is reported with its SASS census
(:mod:`ksfx.codegen.census`), the traffic model's bytes next to ``|X| + |W| + |Y|``, and the
roofline time on a named device (:mod:`ksfx.codegen.devices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ksfx.codegen import census as sass
from ksfx.codegen import get_kernel, traffic
from ksfx.codegen.devices import DEVICES, SHARED_PER_BLOCK, Device, roofline_seconds, unit_of
from ksfx.codegen.fusion import Segment, backward_plan, ceilings, fma_dots, on_chip_steps, segments
from ksfx.codegen.tiling import uses_tensor_cores
from ksfx.config import config
from ksfx.ops import triton_path
from ksfx.ops.chain_op import _plan
from ksfx.ops.dispatch import prefers_triton
from ksfx.pattern import Chain, FactorStep, KSPattern


@dataclass(frozen=True)
class PlannedLaunch:
    """One kernel launch of the op: what it computes and how it is launched."""

    kind: str  # "forward" | "recompute" | "dx" | "grad"
    steps: tuple[FactorStep, ...]  # one, or a fused segment's (application order)
    key: object  # KernelKey | ChainKernelKey
    tile: object  # TileConfig
    programs: int
    args: tuple
    flags: dict
    n: int
    dtype: torch.dtype
    batch_last: bool
    #: a fused segment's steps as the chain has them, where its kernel merged blocks
    #: (:func:`~ksfx.ops.triton_path.merged_segment`): the floor counts these
    unmerged: tuple[FactorStep, ...] = ()

    @property
    def step(self) -> FactorStep:
        """The step of a per-factor launch (a segment's first)."""
        return self.steps[0]

    @property
    def fused(self) -> bool:
        return len(self.steps) > 1

    def patterns(self) -> list[list[int]]:
        return [list(s.pattern.as_tuple()) for s in self.steps]

    def min_bytes(self) -> int:
        """``|X| + |W| + |Y|`` of what the launch computes."""
        if not self.fused:
            return self.step.pattern.min_bytes(self.n, self.dtype.itemsize)
        return traffic.segment_min_bytes(self.unmerged or self.steps, self.n, self.dtype.itemsize)

    def flops(self) -> int:
        """The FLOPs of what the launch computes (merged blocks' zeros not counted)."""
        return sum(step.pattern.flops(self.n) for step in self.unmerged or self.steps)


def _activation(features: int, n: int, dtype, batch_last: bool) -> torch.Tensor:
    shape = (features, n) if batch_last else (n, features)
    return torch.empty(shape, dtype=dtype, device="meta")


def _forward(kind, step, values, n, dtype, batch_last, target) -> PlannedLaunch:
    p = step.pattern
    x, y = _activation(p.in_features, n, dtype, batch_last), _activation(p.out_features, n, dtype, batch_last)
    key, tile, programs = triton_path.forward_plan(step, batch_last, dtype, n, target)
    args, flags = triton_path.forward_arguments(x, values, y, step, batch_last)
    return PlannedLaunch(kind, (step,), key, tile, programs, args, flags, n, dtype, batch_last)


def _segment(kind, steps, values, n, dtype, batch_last, target, taps: bool = False) -> PlannedLaunch:
    unmerged = steps
    steps, values = triton_path.merged_segment(steps, values, batch_last, dtype)
    first, last = steps[0].pattern, steps[-1].pattern
    x, y = _activation(first.in_features, n, dtype, batch_last), _activation(last.out_features, n, dtype, batch_last)
    tapped = [_activation(s.pattern.out_features, n, dtype, batch_last) for s in steps[:-1]] if taps else []
    key, tile, programs = triton_path.chain_plan(steps, batch_last, dtype, n, target, taps)
    args, flags = triton_path.chain_arguments(x, values, y, steps, batch_last, None, tapped)
    return PlannedLaunch(
        kind, steps, key, tile, programs, args, flags, n, dtype, batch_last, unmerged if steps != unmerged else ()
    )


def _run(kind, steps, values, n, dtype, batch_last, target, ceil, taps: bool) -> list[PlannedLaunch]:
    """The launches running ``steps`` in turn, as the op's ``run_forward`` / ``run_steps`` do
    on a GPU; ``ceil``: the :class:`~ksfx.codegen.fusion.Ceilings` fusion plans with (``None``: no fusion)."""
    steps = list(steps)
    cut = segments(steps, batch_last, ceil=ceil) if ceil else [Segment(k, k + 1, False) for k in range(len(steps))]
    launches = []
    for segment in cut:
        run = slice(segment.start, segment.stop)
        if segment.fused:
            fused = tuple(steps[run]) if taps else on_chip_steps(steps[run])
            launches.append(_segment(kind, fused, values[run], n, dtype, batch_last, target, taps))
        else:
            launches.append(_forward(kind, steps[segment.start], values[segment.start], n, dtype, batch_last, target))
    return launches


def _grad(step, n, dtype, batch_last, target) -> PlannedLaunch:
    p = step.pattern
    x, dy = _activation(p.in_features, n, dtype, batch_last), _activation(p.out_features, n, dtype, batch_last)
    key, tile, chunk, programs = triton_path.grad_plan(step, batch_last, dtype, n, target)
    partials = torch.empty((triton_path.cdiv(n, chunk), *p.as_tuple()), dtype=torch.float32, device="meta")
    args, flags = triton_path.grad_arguments(dy, x, partials, chunk, step, batch_last)
    return PlannedLaunch("grad", (step,), key, tile, programs, args, flags, n, dtype, batch_last)


def chain_launches(
    chain: Chain,
    dtype: torch.dtype,
    batch_last: bool,
    n: int,
    device: Device,
    backward: bool = False,
    fuse: bool = False,
) -> list[PlannedLaunch]:
    """The launches of one forward (and, with ``backward``, one backward) of ``chain``.

    Mirrors :func:`ksfx.ops.chain_op.run_forward` / ``run_backward``: the forward runs
    the plan's fused segments (with ``fuse``: the roofline's cut on ``device``, which the
    op runs under ``ksfx.config.fuse = "always"`` and times under ``"auto"``) and one
    launch per other step; the backward
    (:func:`~ksfx.codegen.fusion.backward_plan`) recomputes the intermediates, runs ``dx``
    as the transposed chain on the transposed values views, and one weight-gradient
    launch per step.
    """
    plan = _plan(chain)
    if not isinstance(plan, list):
        return []  # a lone permutation is a torch gather, no generated kernel
    target = triton_path.Target((device.capability // 10, device.capability % 10), device.sms, False)
    values = [torch.empty(step.pattern.as_tuple(), dtype=dtype, device="meta") for step in plan]
    ceil = ceilings(device, str(dtype).removeprefix("torch."), triton_path.dot_precision(dtype)) if fuse else None
    launches = _run("forward", plan, values, n, dtype, batch_last, target, ceil, taps=False)
    if backward:
        steps = backward_plan(plan, need_x=True)
        transposed = [values[k].permute(0, 2, 1, 3) for k in steps.transposed_steps]
        launches += _run("recompute", steps.recompute, values, n, dtype, batch_last, target, ceil, taps=True)
        launches += _run("dx", steps.transposed, transposed, n, dtype, batch_last, target, ceil, taps=True)
        launches += [_grad(step, n, dtype, batch_last, target) for step in steps.grads]
    return launches


def _launch_bytes(launch: PlannedLaunch) -> traffic.Traffic | None:
    """The traffic model in 32-byte sectors; it covers forward kernels (not weight gradients)."""
    itemsize = launch.dtype.itemsize
    if launch.kind == "grad":
        return None
    if launch.fused:
        tile = launch.tile
        dots = fma_dots(launch.key.dtype, launch.key.precision)
        return traffic.segment_bytes(
            launch.steps, launch.n, launch.batch_last, tile.block_m, itemsize, 32, tile.num_warps, dots
        )
    return traffic.bytes_moved(launch.step, launch.n, launch.batch_last, launch.tile, itemsize, sector=32)


def check(launch: PlannedLaunch, device: Device, dump_dir: Path | None = None) -> dict:
    """Compile one launch for ``device`` and report census, bytes and roofline (a JSON-able dict)."""
    key, tile = launch.key, launch.tile
    kernel = get_kernel(key, config.cache_dir)
    cubin, shared = sass.compile_cubin(
        kernel, launch.args, {**launch.flags, **tile.meta()}, tile.num_warps, tile.num_stages, device.capability
    )
    counts = sass.census(cubin, shared)
    slug = "-".join(_slug(step) for step in launch.steps)
    mode = "fused" if launch.fused else key.mode
    cubin_path = None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        cubin_path = dump_dir / f"{launch.kind}_{mode}_{slug}_{key.dtype}.cubin"
        cubin_path.write_bytes(cubin)
    model, lower = _launch_bytes(launch), launch.min_bytes()
    flops = launch.flops()
    summary = counts.summary()
    unit = unit_of(summary["hgmma"], summary["hmma"], key.dtype)
    dispatch = "triton" if launch.fused or prefers_triton(launch.step, launch.batch_last, launch.dtype) else "torch"
    return {
        "kind": launch.kind,
        "pattern": launch.patterns() if launch.fused else launch.patterns()[0],
        "step": "; ".join(str(step) for step in launch.steps),
        "merged_from": [list(step.pattern.as_tuple()) for step in launch.unmerged],  # the chain's own blocks
        "mode": mode,
        "tensor_core_steps": sum(uses_tensor_cores(s.pattern, launch.batch_last) for s in launch.steps),
        "dtype": key.dtype,
        "layout": "batch-last" if launch.batch_last else "batch-first",
        "batch": launch.n,
        "target": f"sm_{device.capability}",
        "tile": {**tile.meta(), "num_warps": tile.num_warps, "num_stages": tile.num_stages, "splits": tile.splits},
        "programs": launch.programs,
        "dispatch": dispatch,
        "cubin": None if cubin_path is None else str(cubin_path),
        **summary,
        "wide_load_fraction": counts.wide_load_fraction,
        "unit": unit,
        "model_bytes": None if model is None else model.total,  # from L2, re-reads included
        "dram_bytes": None if model is None else model.dram,  # from device memory
        "min_bytes": lower,
        "model_ratio": None if model is None else model.total / lower,
        "dram_ratio": None if model is None else model.dram / lower,
        "flops": flops,
        "device": device.name,
        "roofline_us": 1e6 * roofline_seconds(device, lower, flops, unit),
    }


#: Local-memory instructions outside loops that the bar allows: two registers parked across
#: the main loop (a store before it, a load after), a few instructions per program.
PARKED_SPILLS = 4


def passes(report: dict, min_wide: float = 0.75) -> list[str]:
    """What keeps a kernel from the static check's bar (empty: it passes).

    The bar: no spill inside a loop, and at most :data:`PARKED_SPILLS` local-memory
    instructions outside loops (registers parked across the main loop, run once per
    program); shared memory within the target's per-block limit (else it fails to launch);
    at least ``min_wide`` of its global loads 8/16 bytes wide (or TMA); tensor
    cores where 16-bit ones apply (a ``dot`` / ``dot3`` kernel in fp16/bf16): wgmma on
    sm_90, mma.sync before it.
    """
    problems = []
    limit = SHARED_PER_BLOCK.get(int(report["target"].removeprefix("sm_")))
    if limit is not None and report["shared_bytes"] > limit:
        problems.append(
            f"{report['shared_bytes'] // 1024} KiB of shared memory, over {report['target']}'s {limit // 1024}"
        )
    if report["loop_spills"]:
        problems.append(f"{report['loop_spills']} local-memory instructions in loops (spills)")
    elif report["spills"] > PARKED_SPILLS:
        problems.append(f"{report['spills']} local-memory instructions (spills)")
    if report["wide_load_fraction"] < min_wide:
        problems.append(f"{report['wide_loads']}/{report['global_loads']} global loads wide")
    if report["mode"] == "fused" and report["tensor_core_steps"] and report["dtype"] in ("float16", "bfloat16"):
        if not (report["hgmma"] or report["hmma"]):  # batch tiles of 16 rows: wgmma needs 64
            problems.append(f"no tensor cores ({report['unit']})")
    if report["mode"] in ("dot", "dot3") and report["dtype"] in ("float16", "bfloat16"):
        if report["target"] == "sm_90" and not report["hgmma"]:
            problems.append(f"no wgmma ({report['unit']})")
        elif not (report["hgmma"] or report["hmma"]):
            problems.append(f"no tensor cores ({report['unit']})")
    return problems


def _slug(step: FactorStep) -> str:
    text = "x".join(map(str, step.pattern.as_tuple()))
    return text + ("_perm" if step.in_perm is not None or step.out_perm is not None else "")


def parse_chain(patterns: list[str]) -> Chain:
    """A chain from ``a,b,c,d`` strings, leftmost factor first."""
    factors = []
    for text in patterns:
        parts = text.replace("(", "").replace(")", "").split(",")
        if len(parts) != 4:
            raise ValueError(f"a pattern is a,b,c,d; got {text!r}")
        factors.append(KSPattern(*(int(v) for v in parts)))
    return Chain(tuple(factors))


__all__ = ["DEVICES", "PlannedLaunch", "chain_launches", "check", "parse_chain", "passes"]
