"""Whole chains: fused segments against per-factor launches, cuBLAS bmm and a dense matmul.

    PYTHONPATH=$PWD python -m benchmarks.chains                       # GPU: batch 25,088, fp32 + bf16
    TRITON_INTERPRET=1 python -m benchmarks.chains --device cpu --quick --batch 8   # a dry run

Per chain (a 10-factor butterfly and a Monarch pair of width 1024, the paper's ViT-S/16
chains), dtype and layout, the contenders run the same product:

* ``fused``: ``ksfx.ks_matmul`` with ``ksfx.config.fuse = "always"`` (its segments below:
  on a GPU, runs whose roofline gain is under ``fusion.MIN_GAIN`` stay per factor);
* ``fused-all``: on a GPU, every run that fits fused (``fuse_min_gain = 0``): where it
  beats ``fused``, the roofline rule was wrong;
* ``auto``: the defaults users get (``fuse = "auto"``, ``dispatch = "auto"``: on a GPU
  each segment's and each step's first call, during the warm-up, times the choices, fused
  or per factor, generated kernel or bmm, and keeps the fastest);
* ``per-factor``: the generated kernels, one launch per factor (``fuse = "never"``);
* ``bmm``: one cuBLAS bmm per factor with its layout copies (``ksfx.config.dispatch = "torch"``);
* ``dense``: ``x @ W.T`` / ``W @ x`` with ``W`` materialised (cuBLAS).

Every output is checked against a float64 product. Each case records the bytes the traffic
model gives for the fused segments and for the per-factor kernels (32-byte sectors, from L2
and from device memory), the
least bytes ``|X| + |W| + |Y|`` and the roofline on the measured copy bandwidth, and the
speed of ``fused`` over each other contender.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    Budget,
    ResultFile,
    add_run_options,
    apply_run_options,
    contender_failure,
    copy_bandwidth,
    measure_interleaved,
    parse_list,
    rel_error,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


def butterfly(n: int) -> list[tuple[int, int, int, int]]:
    return [(2 ** (level - 1), 2, 2, n >> level) for level in range(1, int(math.log2(n)) + 1)]


#: name -> leftmost-first patterns; "quick" ones are small enough for the interpreter.
CHAINS = {
    "butterfly-1024": butterfly(1024),
    "monarch-1024": [(1, 32, 32, 32), (32, 32, 32, 1)],
    "vit-qkv": [(1, 192, 48, 2), (2, 48, 192, 1)],
    "vit-mlp-up": [(1, 768, 192, 2), (6, 64, 64, 1)],
    "vit-mlp-down": [(1, 128, 128, 3), (6, 64, 256, 1)],
}
QUICK = {
    "butterfly-16": butterfly(16),
    "monarch-64": [(1, 8, 8, 8), (8, 8, 8, 1)],
    "dot-pair": [(1, 32, 16, 2), (2, 16, 32, 1)],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", default=None, help=f"comma-separated names (default: all of {list(CHAINS)})")
    p.add_argument("--quick", action="store_true", help=f"small chains instead ({list(QUICK)})")
    p.add_argument("--dtype", default="fp32,bf16")
    p.add_argument("--layout", default="batch-first,batch-last")
    p.add_argument("--batch", type=int, default=25088)
    add_run_options(p, "chains", rep_ms=40.0, cpu_min_time=0.01)
    return p.parse_args(argv)


def model_bytes(patterns, dtype: torch.dtype, batch_last: bool, n: int, ceil=None) -> dict:
    """Traffic-model bytes of the fused segments and of the per-factor kernels, and ``|X|+|W|+|Y|``;
    ``ceil``: the :class:`~ksfx.codegen.fusion.Ceilings` the op cuts the chain with on a GPU
    (``None``: the interpreter's cut)."""
    from ksfx.codegen import traffic
    from ksfx.codegen.fusion import fma_dots, fused_tile, merged_steps, on_chip_steps, segments
    from ksfx.codegen.tiling import forward_heuristic
    from ksfx.ops.triton_path import dot_precision
    from ksfx.pattern import Chain, KSPattern, split_chain

    plan = split_chain(Chain(tuple(KSPattern(*p) for p in patterns)))
    itemsize = dtype.itemsize

    def per_factor(step) -> traffic.Traffic:
        tile = forward_heuristic(step.pattern, n, itemsize, batch_last, 132)
        return traffic.bytes_moved(step, n, batch_last, tile, itemsize, sector=32)

    fused = []
    cut = segments(plan, batch_last, ceil=ceil)
    for segment in cut:
        steps = on_chip_steps(plan[segment.start : segment.stop])
        if segment.fused:
            name, precision = str(dtype).removeprefix("torch."), dot_precision(dtype)
            dots = fma_dots(name, precision)
            steps, _ = merged_steps(steps, batch_last, dots)  # small blocks merged, as the op runs them
            tile = fused_tile(steps, n, batch_last, name, precision)
            fused.append(traffic.segment_bytes(steps, n, batch_last, tile.block_m, itemsize, 32, tile.num_warps, dots))
        else:
            fused.append(per_factor(steps[0]))
    factors = [per_factor(s) for s in plan]
    least = traffic.segment_min_bytes(plan, n, itemsize)
    return {  # from L2 (re-reads included) and from device memory
        "fused_bytes": sum(t.total for t in fused),
        "fused_dram_bytes": sum(t.dram for t in fused),
        "per_factor_bytes": sum(t.total for t in factors),
        "per_factor_dram_bytes": sum(t.dram for t in factors),
        "min_bytes": least,
        "segments": [[s.start, s.stop, s.fused] for s in cut],
    }


def contenders(x, factors, dense, batch_last: bool) -> dict:
    import ksfx
    from ksfx.config import config

    def with_config(**settings):
        def run():
            saved = {k: getattr(config, k) for k in settings}
            for k, v in settings.items():
                setattr(config, k, v)
            try:
                return ksfx.ks_matmul(x, factors, batch_last=batch_last)
            finally:
                for k, v in saved.items():
                    setattr(config, k, v)

        return run

    fused_all = {"fused-all": with_config(fuse="always", dispatch="triton", fuse_min_gain=0.0)} if x.is_cuda else {}
    return {
        "fused": with_config(fuse="always", dispatch="triton"),
        **fused_all,
        "auto": with_config(fuse="auto", dispatch="auto"),
        "per-factor": with_config(fuse="never", dispatch="triton"),
        "bmm": with_config(fuse="never", dispatch="torch"),
        "dense": (lambda: dense @ x) if batch_last else (lambda: x @ dense.T),
    }


def run_case(name, patterns, dtype_name, layout, args, device, bandwidth) -> dict:
    from ksfx.ops.dispatch import fusion_ceilings
    from ksfx.pattern import Chain, KSPattern

    dtype, batch_last = DTYPES[dtype_name], layout == "batch-last"
    chain = Chain(tuple(KSPattern(*p) for p in patterns))
    g = torch.Generator().manual_seed(0)
    factors64 = [torch.randn(p, generator=g, dtype=torch.float64) / math.sqrt(p[2]) for p in patterns]
    dense64 = chain.to_dense(factors64)
    n = args.batch
    x64 = torch.randn(
        (chain.in_features, n) if batch_last else (n, chain.in_features), generator=g, dtype=torch.float64
    )
    want = dense64 @ x64 if batch_last else x64 @ dense64.T
    x = x64.to(device, dtype)
    factors = [f.to(device, dtype) for f in factors64]
    fns = contenders(x, factors, dense64.to(device, dtype), batch_last)
    case = {"key": f"{name}|{dtype_name}|{layout}|{n}", "chain": name, "patterns": [list(p) for p in patterns],
            "dtype": dtype_name, "layout": layout, "batch": n, "errors": {}, "failed": {}}  # fmt: skip
    case.update(model_bytes(patterns, dtype, batch_last, n, fusion_ceilings(x)))
    from ksfx.ops import race

    raced = len(race.races())
    working = {}
    for label, fn in fns.items():
        try:
            error = rel_error(fn(), want.to(device))
        except Exception as exc:  # noqa: BLE001 - a failing contender is recorded, the sweep goes on
            case["failed"][label] = contender_failure(exc, args.verbose, 300)
            continue
        case["errors"][label] = error
        if error > TOL[dtype_name]:
            case["failed"][label] = f"error {error:.2e} above {TOL[dtype_name]}"
            continue
        working[label] = fn
    case["times"] = measure_interleaved(
        working, device, args.rounds, rep_ms=args.rep_ms, cpu_min_time=args.cpu_min_time
    )
    case["races"] = [str(timed) for timed in race.races()[raced:]]  # auto's first calls
    fused = case["times"].get("fused")
    if fused:
        case["fused_speedup"] = {k: t / fused for k, t in case["times"].items() if k != "fused"}
        if bandwidth:
            case["roofline_s"] = case["min_bytes"] / bandwidth
            case["fused_roofline_fraction"] = case["roofline_s"] / fused
    return case


def main(argv=None) -> int:
    args = parse_args(argv)
    device = apply_run_options(args)
    table = QUICK if args.quick else CHAINS
    names = parse_list(args.chain, table, "--chain") if args.chain else list(table)
    results = ResultFile.for_run("chains", args, device, argv)
    bandwidth = copy_bandwidth(device)
    results.data["environment"]["copy_bandwidth"] = bandwidth
    budget = Budget(args.time_budget)
    for name in names:
        for dtype_name in parse_list(args.dtype, DTYPES, "--dtype"):
            for layout in parse_list(args.layout, ("batch-first", "batch-last"), "--layout"):
                key = f"{name}|{dtype_name}|{layout}|{args.batch}"
                if results.has(key) or budget.exhausted():
                    continue
                case = run_case(name, table[name], dtype_name, layout, args, device, bandwidth)
                results.add(case)
                speed = ", ".join(f"{k} {v:.2f}x" for k, v in case.get("fused_speedup", {}).items())
                print(f"{key}: fused vs {speed or '-'}; failed {case['failed'] or 'none'}", file=sys.stderr)
    results.finish(plot=not args.no_plot)
    print(results.path)
    return 1 if any(c["failed"] for c in results.data["cases"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
