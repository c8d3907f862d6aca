"""Command line: ``python -m ksfx inspect module:factory`` and ``python -m ksfx kernels``.

``inspect``: ``factory()`` returns ``(model, example_inputs)`` (a tensor or a tuple of
them); the command prints :func:`ksfx.explain`'s report: chains, decisions, graph breaks
and the rewritten graphs.

``kernels``: compiles every kernel the op would launch for a chain for a GPU target (no
GPU needed) and reports registers, spills, shared memory, the SASS census, the traffic
model's bytes (from L2, re-reads included, and from device memory) against
``|X| + |W| + |Y|`` and the roofline time on a named device::

    python -m ksfx kernels --pattern 6,64,64,1 --pattern 1,768,192,2 --dtype bf16 --backward
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _load(spec: str):
    if ":" not in spec:
        raise SystemExit(f"expected module:factory, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    sys.path.insert(0, "")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise SystemExit(f"{module_name} has no attribute {attr!r}")
    model, inputs = factory()
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return model, tuple(inputs)


def _kernels(args) -> int:
    from ksfx.ops import static_check

    device = static_check.DEVICES.get(args.device)
    if device is None:
        raise SystemExit(f"unknown device {args.device!r}; known: {', '.join(static_check.DEVICES)}")
    capability = int(args.target.removeprefix("sm_"))
    if capability != device.capability:  # sm_80 code against Hopper ceilings: say so in the name
        name = f"{device.name} ceilings, sm_{capability} code"
        device = dataclasses.replace(device, name=name, capability=capability)
    try:
        chain = static_check.parse_chain(args.pattern)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    torch.set_float32_matmul_precision(args.fp32_precision)
    launches = static_check.chain_launches(
        chain, DTYPES[args.dtype], args.layout == "batch-last", args.batch, device, args.backward, args.fuse
    )
    reports = [static_check.check(launch, device, args.dump_dir) for launch in launches]
    for report in reports:
        report["problems"] = static_check.passes(report)
    if args.json:
        print(json.dumps(reports, indent=1))
        return 0
    print(f"{chain}, {args.dtype} {args.layout}, batch {args.batch}, {args.target}, roofline on {device.name}")
    print(
        "kind          step                         mode  regs spill/loop smem_kB  wgmma  mma  ffma  ld wide/all"
        "  st wide/all  L2/min dram/min  roofline_us  problems"
    )
    for r in reports:
        model = "-" if r["model_ratio"] is None else f"{r['model_ratio']:.2f}"
        dram = "-" if r["dram_ratio"] is None else f"{r['dram_ratio']:.2f}"
        print(
            f"{r['kind']:<13} {r['step'][:28]:<28} {r['mode']:<5} {r['registers']:>4} "
            f"{r['spills']:>5}/{r['loop_spills']:<4} "
            f"{r['shared_bytes'] / 1024:>7.1f} {r['hgmma']:>6} {r['hmma']:>4} {r['ffma']:>5} "
            f"{r['wide_loads']:>5}/{r['global_loads']:<5} {r['wide_stores']:>5}/{r['global_stores']:<5} "
            f"{model:>7} {dram:>8} {r['roofline_us']:>12.1f}  {'; '.join(r['problems']) or 'ok'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ksfx", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print what the ksfx backend finds and rewrites")
    inspect.add_argument("target", help="module:factory, factory() -> (model, example_inputs)")
    inspect.add_argument("--rewrite", default="auto", choices=("auto", "always", "never"))
    kernels = commands.add_parser("kernels", help="compile the chain's kernels for a GPU and report their SASS census")
    kernels.add_argument(
        "--pattern", action="append", required=True, help="a,b,c,d; repeat for a chain (leftmost factor first)"
    )
    kernels.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    kernels.add_argument("--layout", default="batch-first", choices=("batch-first", "batch-last"))
    kernels.add_argument("--batch", type=int, default=25088)
    kernels.add_argument("--target", default="sm_90", choices=("sm_90", "sm_80"))
    kernels.add_argument("--device", default="H100", help="ceilings for the roofline: H100 or H200 (sm_90 only)")
    kernels.add_argument("--fp32-precision", default="highest", choices=("highest", "high", "medium"))
    kernels.add_argument("--backward", action="store_true", help="also the weight-gradient and dx kernels")
    kernels.add_argument(
        "--fuse", action="store_true", help="the roofline's fused segments (which the op times on a GPU first)"
    )
    kernels.add_argument("--dump-dir", type=Path, help="write each kernel's cubin here")
    kernels.add_argument("--json", action="store_true", help="print a JSON list, one object per kernel")
    args = parser.parse_args(argv)
    if args.command == "kernels":
        return _kernels(args)
    from ksfx.backend import explain

    model, inputs = _load(args.target)
    print(explain(model, *inputs, rewrite=args.rewrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
