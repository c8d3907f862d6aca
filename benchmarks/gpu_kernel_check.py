"""GPU check of the generated KS kernels: correctness, speed against the baselines, traffic.

For a handful of patterns (the paper's ViT-S/16 layers, a Monarch pair, butterfly
factors), batch sizes, dtypes and both layouts, one factor is computed by

- ``ksfx``: ``ksfx.ks_matmul`` (the op, as users call it) and ``kernel`` (the bare launch);
- ``bmm``: reshape/permute/bmm/permute (Monarch/ksmm style);
- ``einsum``: ``torch.einsum`` on the ``(a, b, c, d)`` values;
- ``dense``: cuBLAS on the materialised matrix (``x @ W.T`` / ``W @ x``).

Each output is checked against the bmm formulation in fp32, then timed with
``triton.testing.do_bench`` (median). The JSON also holds the traffic model of the
heuristic tile config (element and 32-byte-sector counts) next to the lower bound
``|X| + |W| + |Y|``, and the bandwidth those bytes imply. ``--autotune`` adds the time
of the autotuned kernel and the config it picked (a few extra minutes).

    PYTHONPATH=$PWD python benchmarks/gpu_kernel_check.py [--out PATH] [--autotune]

``--smoke`` runs tiny shapes on CPU through the Triton interpreter (a script check only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import ksfx
from benchmarks import common
from benchmarks.patterns import bmm_formulation, dense_formulation, einsum_formulation
from ksfx.codegen import TileConfig, forward_heuristic, kernel_mode, traffic
from ksfx.config import config
from ksfx.ops import triton_path
from ksfx.pattern import FactorStep, KSPattern

PATTERNS = [
    (2, 48, 192, 1),  # ViT-S/16 Q/K/V, applied first
    (1, 192, 48, 2),  # ViT-S/16 Q/K/V, applied second
    (6, 64, 64, 1),  # MLP up
    (1, 768, 192, 2),
    (6, 64, 256, 1),  # MLP down
    (1, 128, 128, 3),
    (16, 64, 64, 1),  # Monarch n = 4096
    (1, 64, 64, 16),
    (256, 2, 2, 32),  # butterfly factors, n = 16384 / 8192
    (1, 2, 2, 4096),
]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_kernel_check.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--batches", default="25088,4096")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layouts", default="batch-first,batch-last")
    parser.add_argument("--fp32-precision", default="highest", choices=["highest", "high", "medium"])
    parser.add_argument("--rep-ms", type=float, default=40.0)
    parser.add_argument("--autotune", action="store_true", help="also time the autotuned kernel (largest batch)")
    parser.add_argument("--time-budget", type=float, default=280.0, help="seconds; later cases are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    return parser.parse_args(argv)


def tile_dict(tile: TileConfig) -> dict:
    return {k: getattr(tile, k) for k in ("block_m", "block_n", "block_k", "num_warps", "num_stages")}


def autotuned_time(x, values, step, batch_last, device, rep_ms) -> tuple[float, dict]:
    """Time of the kernel under Triton's autotuner, and the config it kept."""
    config.autotune = True
    try:
        fn = lambda: triton_path.factor_forward(x, values, step, batch_last)  # noqa: E731
        fn()  # tunes
        seconds = common.measure(fn, device, rep_ms=rep_ms)
    finally:
        config.autotune = False
    return seconds, tile_dict(triton_path.tuned_config(x, step, batch_last))


def run_case(pattern, dtype_name, layout, batch, device, args, num_sms, bandwidth) -> dict:
    dtype = common.DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    batch_last = layout == "batch-last"
    p = KSPattern(*pattern)
    step = FactorStep(p)
    a, b, c, d = pattern
    gen = torch.Generator().manual_seed(hash((pattern, batch)) % 2**31)
    values = (torch.randn(pattern, generator=gen) / math.sqrt(c)).to(device, dtype)
    x = torch.randn((p.in_features, batch) if batch_last else (batch, p.in_features), generator=gen).to(device, dtype)
    w_bmm = values.permute(0, 3, 1, 2).reshape(a * d, b, c).contiguous()
    dense = p.to_dense(values)
    ref = bmm_formulation(x.float(), w_bmm.float(), pattern, batch_last)
    tile = forward_heuristic(p, batch, itemsize, batch_last, num_sms)
    contenders = {
        "ksfx": lambda: ksfx.ks_matmul(x, [values], batch_last=batch_last),
        "kernel": lambda: triton_path.factor_forward(x, values, step, batch_last),
        "bmm": lambda: bmm_formulation(x, w_bmm, pattern, batch_last),
        "einsum": lambda: einsum_formulation(x, values, pattern, batch_last),
        "dense": lambda: dense_formulation(x, dense, batch_last),
    }
    case = {
        "pattern": list(pattern),
        "dtype": dtype_name,
        "layout": layout,
        "batch": batch,
        "mode": kernel_mode(p),
        "tile": tile_dict(tile),
        "min_bytes": p.min_bytes(batch, itemsize),
        "model_bytes": traffic.bytes_moved(step, batch, batch_last, tile, itemsize).total,
        "model_sector_bytes": traffic.bytes_moved(step, batch, batch_last, tile, itemsize, sector=32).total,
        "errors": {},
        "times_ms": {},
    }
    for name, fn in contenders.items():
        case["errors"][name] = common.rel_error(fn(), ref)
        case["times_ms"][name] = common.measure(fn, device, rep_ms=args.rep_ms) * 1e3
    if args.autotune and batch == max(args.batch_list) and device.type == "cuda":
        seconds, best = autotuned_time(x, values, step, batch_last, device, args.rep_ms)
        case["times_ms"]["kernel_autotuned"] = seconds * 1e3
        case["autotuned_config"] = best
    t = case["times_ms"]
    best_baseline = min(t["bmm"], t["einsum"], t["dense"])
    case["correct"] = case["errors"]["ksfx"] <= common.TOLERANCE[dtype_name]
    case["speedup_vs_bmm"] = t["bmm"] / t["ksfx"]
    case["speedup_vs_best_baseline"] = best_baseline / t["ksfx"]
    case["speedup_vs_dense"] = t["dense"] / t["ksfx"]
    kernel_s = t["kernel"] * 1e-3
    case["achieved_GBps_model"] = case["model_bytes"] / kernel_s / 1e9
    case["achieved_GBps_min_bytes"] = case["min_bytes"] / kernel_s / 1e9
    if bandwidth:
        case["fraction_of_copy_bandwidth"] = case["min_bytes"] / kernel_s / bandwidth
    return case


def print_row(case: dict) -> None:
    t = case["times_ms"]
    tuned = f"{t['kernel_autotuned']:8.3f}" if "kernel_autotuned" in t else "       -"
    print(
        f"{str(tuple(case['pattern'])):18s} {case['dtype']:4s} {case['layout']:11s} {case['batch']:6d} "
        f"{case['mode']:3s} "
        f"{t['ksfx']:8.3f} {t['kernel']:8.3f} {tuned} {t['bmm']:8.3f} {t['einsum']:8.3f} {t['dense']:8.3f} "
        f"{case['speedup_vs_bmm']:6.2f} {case['speedup_vs_best_baseline']:6.2f} "
        f"{case['model_sector_bytes'] / case['min_bytes']:5.2f} {case['achieved_GBps_min_bytes']:7.0f} "
        f"{'ok' if case['correct'] else 'WRONG'} {case['errors']['ksfx']:.1e}",
        flush=True,
    )


def main(argv=None) -> Path:
    args = parse_args(argv)
    args.batch_list = [int(v) for v in args.batches.split(",")]
    patterns = PATTERNS
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        config.interpret = True
        device = torch.device("cpu")
        args.batch_list, args.rep_ms, patterns = [33], 1.0, [(2, 16, 24, 1), (4, 2, 2, 8)]
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_kernel_check needs a CUDA GPU (or --smoke for a CPU script check)")
    else:
        device = torch.device("cuda")
    torch.set_float32_matmul_precision(args.fp32_precision)
    dtypes = common.parse_list(args.dtypes, common.DTYPES, "--dtypes")
    layouts = common.parse_list(args.layouts, ("batch-first", "batch-last"), "--layouts")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    bandwidth = common.copy_bandwidth(device)
    result = {
        "kind": "gpu_kernel_check",
        "environment": common.environment(device),
        "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "cases": [],
        "skipped": [],
    }
    print(
        f"{'pattern':18s} {'dt':4s} {'layout':11s} {'batch':>6s} {'mod':3s} {'ksfx':>8s} {'kernel':>8s} {'tuned':>8s} "
        f"{'bmm':>8s} {'einsum':>8s} {'dense':>8s} {'x bmm':>6s} {'x best':>6s} {'B/LB':>5s} {'GB/s':>7s} check"
    )
    start = time.monotonic()
    for batch in args.batch_list:
        for pattern in patterns:
            for dtype_name in dtypes:
                for layout in layouts:
                    if time.monotonic() - start > args.time_budget:
                        result["skipped"].append([list(pattern), dtype_name, layout, batch])
                        continue
                    case = run_case(pattern, dtype_name, layout, batch, device, args, num_sms, bandwidth)
                    result["cases"].append(case)
                    print_row(case)
    cases = result["cases"]
    if cases:
        result["summary"] = {
            "all_correct": all(c["correct"] for c in cases),
            "geomean_speedup_vs_bmm": math.exp(sum(math.log(c["speedup_vs_bmm"]) for c in cases) / len(cases)),
            "geomean_speedup_vs_best_baseline": math.exp(
                sum(math.log(c["speedup_vs_best_baseline"]) for c in cases) / len(cases)
            ),
            "wall_seconds": time.monotonic() - start,
        }
        print(json.dumps(result["summary"], indent=1))
    if result["skipped"]:
        print(f"time budget reached: {len(result['skipped'])} cases skipped", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
