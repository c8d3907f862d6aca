"""The one command to run when a GPU is lent: kernel tests, a pattern sample, the models, a summary.

    PYTHONPATH=$PWD python -m benchmarks.gpu_suite            # about 8 minutes on an H100/H200
    PYTHONPATH=$PWD python -m benchmarks.gpu_suite            # again: resumes where it stopped
    python -m benchmarks.gpu_suite --dry-run                  # every step, tiny shapes, interpreter, CPU

Steps, each in its own process (a crash or a hang costs that step only), each writing
under ``benchmarks/results/``:

1. ``tests``: the CUDA variants of the kernel tests and the static sm_90 check, on the
   machine's own torch and triton;
2. ``patterns``: ``benchmarks.patterns`` on a stratified sample of the paper grid (64
   patterns spread over ``h(b, c)`` and ``d``) x fp32/bf16 x both layouts at batch
   25,088, against bmm, einsum, dense cuBLAS and the bmm formulation compiled by
   Inductor, every output checked;
3. ``chains``: ``benchmarks.chains``, whole chains (a 1024 butterfly, Monarch, the ViT-S/16
   chains) as fused segments against per-factor launches, bmm and dense, with the bytes
   each moves by the traffic model;
4. ``models``: KS-ViT-S/16 (batch 128) and GPT-2-medium-KS (batch 8 x 1024) inference in
   fp32 and bf16 against eager and Inductor, then a ViT training step;
5. ``launch``: how the chains are launched (``benchmarks.models`` contenders): by Inductor
   (the ``triton_op``, the default), from Python (the ``custom_op``), with the GELU fused
   into the chain's store, and under CUDA graphs against Inductor's own, in a two-block
   ViT-S/16 at about 25k tokens, bf16, every output checked against eager;
6. ``tiles``: the generated kernel on the heuristic's tile and on the 3 least-traffic
   other tiles of its autotuning space, a few patterns, fp32 and bf16, both layouts (the
   data to check the no-tuning heuristic against);
7. the summary, printed last and saved as ``gpu_suite_<device>_<date>.json``: per dtype
   and layout the median speedup over the best baseline and the median fraction of the
   roofline ``max(|X|+|W|+|Y| / copy bandwidth, FLOPs / rate of the unit)`` reached (the
   bandwidth measured in the run, the rates from :mod:`ksfx.codegen.devices`); per kernel
   family the generated kernel against the op's plain-torch path next to what the
   dispatch policy runs there (the data to re-derive it from); and each model's latency
   against Inductor.

Every step resumes: the pattern and model files skip the cases they hold, and a step
that finished is not run again (``--force`` reruns it). fp32 runs are IEEE
(``"highest"``); the files record device, versions and precision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite (steps share it)")
    p.add_argument("--patterns", type=int, default=64, help="patterns sampled from the paper grid")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--force", action="store_true", help="run finished steps again")
    return p.parse_args(argv)


def _device_tag(dry_run: bool) -> str:
    import torch

    if dry_run or not torch.cuda.is_available():
        return "cpu-dry-run"
    from benchmarks.common import device_slug

    return device_slug(torch.device("cuda"))


def steps(args, tag: str, date: str) -> list[dict]:
    """The commands of the suite: name, argv, share of the budget, output file."""
    patterns_out = args.out_dir / f"gpu_suite_patterns_{tag}_{date}.json"
    chains_out = args.out_dir / f"gpu_suite_chains_{tag}_{date}.json"
    models_out = args.out_dir / f"gpu_suite_models_{tag}_{date}.json"
    launch_out = args.out_dir / f"gpu_suite_launch_{tag}_{date}.json"
    tiles_out = args.out_dir / f"gpu_suite_tiles_{tag}_{date}.json"
    py = [sys.executable]
    if args.dry_run:
        return [
            {"name": "tests", "share": 0.2, "argv": [*py, "-m", "pytest", "-q", "-x", "tests/test_kernels.py", "-k",
             "test_forward_matches_dense and interpret and float32 and bfirst"]},
            {"name": "patterns", "share": 0.2, "out": patterns_out, "argv": [
                *py, "-m", "benchmarks.patterns", "--device", "cpu", "--quick", "--limit", "2", "--batch", "16",
                "--dtype", "fp32,bf16", "--baselines", "bmm,einsum,dense", "--rounds", "1", "--cpu-min-time", "0.002",
                "--out", str(patterns_out)]},
            # 64 rows: at 8, dot-pair's merged (zero-padded) values outweigh its activations
            {"name": "chains", "share": 0.2, "out": chains_out, "argv": [
                *py, "-m", "benchmarks.chains", "--device", "cpu", "--quick", "--chain", "butterfly-16,dot-pair",
                "--batch", "64", "--rounds", "1", "--cpu-min-time", "0.002", "--out", str(chains_out)]},
            {"name": "models", "share": 0.2, "out": models_out, "argv": [
                *py, "-m", "benchmarks.models", "--device", "cpu", "--quick", "--model", "gpt2", "--batch", "1",
                "--contenders", "eager,ksfx", "--rounds", "1", "--cpu-min-time", "0.01", "--out", str(models_out)]},
            {"name": "launch", "share": 0.1, "out": launch_out, "argv": [
                *py, "-m", "benchmarks.models", "--device", "cpu", "--quick", "--model", "gpt2", "--batch", "1",
                "--contenders", "eager,ksfx_cudagraphs", "--rounds", "1", "--cpu-min-time", "0.01",
                "--out", str(launch_out)]},
            {"name": "tiles", "share": 0.1, "out": tiles_out, "argv": [
                *py, "-m", "benchmarks.patterns", "--device", "cpu", "--quick", "--limit", "1", "--batch", "16",
                "--dtype", "fp32", "--layout", "batch-last", "--baselines", "bmm", "--tiles", "1", "--rounds", "1",
                "--cpu-min-time", "0.002", "--no-plot", "--out", str(tiles_out)]},
        ]  # fmt: skip
    return [
        {"name": "tests", "share": 0.1, "argv": [*py, "-m", "pytest", "-q", "tests/test_kernels.py",
         "tests/test_static_check.py", "tests/test_ks_matmul.py", "tests/test_triton_op.py", "-k", "cuda or static"]},
        # The generated kernels on every case (KSFX_DISPATCH=triton): the data a dispatch policy is derived from.
        {"name": "patterns", "share": 0.3, "out": patterns_out, "env": {"KSFX_DISPATCH": "triton"}, "argv": [
            *py, "-m", "benchmarks.patterns", "--limit", str(args.patterns), "--dtype", "fp32,bf16",
            "--batch", "25088", "--layout", "batch-first,batch-last", "--out", str(patterns_out)]},
        # Whole chains: fused segments against per-factor launches, bmm and dense (issue: one kernel per chain).
        {"name": "chains", "share": 0.1, "out": chains_out, "argv": [
            *py, "-m", "benchmarks.chains", "--dtype", "fp32,bf16", "--batch", "25088", "--out", str(chains_out)]},
        {"name": "models", "share": 0.2, "out": models_out, "argv": [
            *py, "-m", "benchmarks.models", "--dtype", "fp32,bf16", "--out", str(models_out)]},
        {"name": "models-train", "share": 0.1, "out": models_out, "argv": [
            *py, "-m", "benchmarks.models", "--train", "--model", "vit", "--dtype", "bf16", "--out", str(models_out)]},
        # How chains are launched: by Inductor (triton_op), from Python (custom_op), with the
        # GELU fused into the chain's store, under CUDA graphs; the two-block ViT-S/16, ~25k tokens.
        {"name": "launch", "share": 0.1, "out": launch_out, "argv": [
            *py, "-m", "benchmarks.models", "--quick", "--model", "vit", "--batch", "1472", "--dtype", "bf16",
            "--contenders", "inductor,ksfx,ksfx_op,ksfx_epilogue,inductor_cudagraphs,ksfx_cudagraphs",
            "--out", str(launch_out)]},
        # The heuristic's tile against the least-traffic others of the autotuning space.
        {"name": "tiles", "share": 0.1, "out": tiles_out, "env": {"KSFX_DISPATCH": "triton"}, "argv": [
            *py, "-m", "benchmarks.patterns", "--limit", "6", "--dtype", "bf16,fp32", "--batch", "25088",
            "--layout", "batch-first,batch-last", "--baselines", "bmm", "--tiles", "3", "--out", str(tiles_out)]},
    ]  # fmt: skip


def run_step(step: dict, seconds: float, dry_run: bool) -> dict:
    """Run one step with ``--time-budget`` (sweeps stop cleanly) and a hard timeout a bit above it."""
    argv = list(step["argv"])
    if "benchmarks." in " ".join(argv):
        argv += ["--time-budget", str(max(10.0, seconds - 20.0))]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **step.get("env", {}))
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 60)
        code, tail = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as timeout:
        code, tail = "timeout", str(timeout.stdout or "")[-3000:]
    seconds_taken = round(time.perf_counter() - start, 1)
    return {"returncode": code, "seconds": seconds_taken, "env": step.get("env", {}), "tail": tail}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _roofline_s(case: dict, bandwidth: float | None, device) -> float | None:
    """The least time of a pattern case: bytes over the measured bandwidth, FLOPs over the unit's rate."""
    from ksfx.codegen.tiling import uses_tensor_cores
    from ksfx.pattern import KSPattern

    if not bandwidth or device is None:
        return None
    tensor_cores = uses_tensor_cores(KSPattern(*case["pattern"]), case["layout"] == "batch-last")
    # The unit the static check shows for the kernel: wgmma for 16-bit dots, else fp32 FMA (IEEE).
    unit = "wgmma16" if tensor_cores and case["dtype"] != "fp32" else "ffma"
    return max(case["min_bytes"] / bandwidth, case["flops"] / device.rates[unit].flops)


def _fell_back(case: dict) -> bool:
    """Whether the op ran its torch path for the case, Triton having failed to build the kernel."""
    return any(name.endswith(".fallback") for name in case.get("ksfx_launches", {}))


def summarise_patterns(path: Path) -> dict:
    from ksfx.codegen.devices import DEVICES

    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    env = data["environment"]
    name = env["device"]
    device = next((d for key, d in DEVICES.items() if key in name), None)
    bandwidth = env.get("copy_bandwidth")
    bandwidth = bandwidth * 1e9 if bandwidth and bandwidth < 1e6 else bandwidth  # GB/s or B/s
    groups: dict[str, dict] = {}
    for case in data["cases"]:
        group = groups.setdefault(
            f"{case['dtype']} {case['layout']}", {"speedup": [], "roofline": [], "wrong": 0, "fell_back": 0}
        )
        if _fell_back(case):  # timed the torch path, not a kernel
            group["fell_back"] += 1
            continue
        if case.get("speedup"):
            group["speedup"].append(case["speedup"])
        floor = _roofline_s(case, bandwidth, device)
        if floor and case["times"].get("ksfx"):
            case["roofline_fraction"] = floor / case["times"]["ksfx"]
            group["roofline"].append(case["roofline_fraction"])
        group["wrong"] += case.get("correct") is False
    return {
        "file": str(path),
        "device": name,
        "copy_bandwidth_Bps": bandwidth,
        "cases": len(data["cases"]),
        "groups": {
            key: {
                "cases": len(g["speedup"]),
                "median_speedup_vs_best": _median(g["speedup"]),
                "median_roofline_fraction": _median(g["roofline"]),
                "out_of_tolerance": g["wrong"],
                "fell_back": g["fell_back"],
            }
            for key, g in sorted(groups.items())
        },
    }


def _d_class(d: int) -> str:
    return "1" if d == 1 else ("2-15" if d < 16 else ">=16")


def summarise_dispatch(path: Path) -> list[dict]:
    """Per kernel family (mode, dtype, layout, ``d`` of 1, 2-15 or 16 and more): the generated
    kernel's median speedup over the op's plain-torch path (the ``einsum`` baseline: the same
    einsum) and what :func:`ksfx.ops.dispatch.prefers_triton` runs there today. The data a
    policy is re-derived from; ``agrees`` is False where the policy picks the slower one."""
    import torch

    from ksfx.codegen.tiling import kernel_mode
    from ksfx.ops.dispatch import prefers_triton
    from ksfx.pattern import FactorStep, KSPattern

    if not path.exists():
        return []
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    groups: dict[tuple, dict] = {}
    for case in json.loads(path.read_text())["cases"]:
        times = case["times"]
        if not times.get("ksfx") or not times.get("einsum") or case.get("correct") is False:
            continue
        if _fell_back(case):
            continue
        p, batch_last = KSPattern(*case["pattern"]), case["layout"] == "batch-last"
        key = (kernel_mode(p, batch_last), case["dtype"], case["layout"], _d_class(p.d))
        group = groups.setdefault(key, {"speedups": [], "policy": set()})
        group["speedups"].append(times["einsum"] / times["ksfx"])
        group["policy"].add("triton" if prefers_triton(FactorStep(p), batch_last, dtypes[case["dtype"]]) else "torch")
    rows = []
    for (mode, dtype, layout, d), g in sorted(groups.items()):
        median = _median(g["speedups"])
        policy = g["policy"].pop() if len(g["policy"]) == 1 else "mixed"
        agrees = None if policy == "mixed" else (median >= 1) == (policy == "triton")
        rows.append({"mode": mode, "dtype": dtype, "layout": layout, "d": d, "cases": len(g["speedups"]),
                     "median_speedup_vs_torch_path": median, "policy": policy, "agrees": agrees})  # fmt: skip
    return rows


def summarise_models(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for case in json.loads(path.read_text())["cases"]:
        times = case["times"]
        row = {"key": case["key"], "ms": {k: 1e3 * v for k, v in times.items()}, "ratios": case.get("ratios", {})}
        if "inductor" in times and "ksfx" in times:
            row["ksfx_vs_inductor_latency"] = times["ksfx"] / times["inductor"] - 1
        row["wrong"] = [k for k, ok in case.get("correct", {}).items() if not ok]
        row["unavailable"] = sorted(case.get("unavailable", {}))
        rows.append(row)
    return rows


def summarise_chains(path: Path) -> list[dict]:
    """Per chain case: fused over each contender, and the fraction of the roofline reached."""
    if not path.exists():
        return []
    keep = ("key", "segments", "fused_speedup", "fused_roofline_fraction", "fused_bytes", "fused_dram_bytes",
            "per_factor_bytes", "per_factor_dram_bytes", "min_bytes", "failed")  # fmt: skip
    return [{k: case.get(k) for k in keep} for case in json.loads(path.read_text())["cases"]]


def summarise_tiles(path: Path) -> dict:
    """The heuristic's tile against the fastest other tile timed: per case the gain
    (heuristic time over the best one), the best tile's config, and the median gain."""
    if not path.exists():
        return {}
    rows = []
    for case in json.loads(path.read_text())["cases"]:
        if "tile_gain" not in case:
            continue
        rows.append({"key": case["key"], "gain": case["tile_gain"], "best": case["best_tile"],
                     "best_tile": case["tiles"].get(case["best_tile"]), "heuristic": case["tiles"]["ksfx"],
                     "wrong_tiles": case.get("wrong_tiles", [])})  # fmt: skip
    return {"file": str(path), "median_gain": _median([r["gain"] for r in rows]), "cases": rows}


def table(summary: dict) -> str:
    lines = [f"device {summary['environment']['device']}, torch {summary['environment']['torch']}, "
             f"triton {summary['environment']['triton']}, fp32 {summary['environment']['fp32_precision']}, "
             f"{summary['environment']['date']}"]  # fmt: skip
    for name, step in summary["steps"].items():
        lines.append(f"step {name:<13} rc={step['returncode']} {step['seconds']:>6.1f} s")
    groups = summary["patterns"].get("groups", {})
    if groups:
        lines.append("patterns          cases  median speedup vs best  median roofline fraction  wrong  fell back")
        for key, g in groups.items():
            speed = "-" if g["median_speedup_vs_best"] is None else f"{g['median_speedup_vs_best']:.2f}x"
            roof = "-" if g["median_roofline_fraction"] is None else f"{100 * g['median_roofline_fraction']:.0f}%"
            lines.append(f"{key:<17} {g['cases']:>5}  {speed:>22}  {roof:>24}  {g['out_of_tolerance']:>5}  "
                         f"{g.get('fell_back', 0):>9}")  # fmt: skip
    dispatch = summary.get("dispatch", [])
    if dispatch:
        lines.append("dispatch (mode dtype layout d)   cases  generated vs torch path  policy  agrees")
        for r in dispatch:
            family = f"{r['mode']} {r['dtype']} {r['layout']} d={r['d']}"
            lines.append(f"{family:<32} {r['cases']:>5}  {r['median_speedup_vs_torch_path']:>22.2f}x  "
                         f"{r['policy']:>6}  {r['agrees']}")  # fmt: skip
    for row in summary.get("chains", []):
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in (row["fused_speedup"] or {}).items())
        roof = row["fused_roofline_fraction"]
        cut = " ".join(f"{a + 1}-{b}" if fused else f"{a + 1}" for a, b, fused in row.get("segments") or [])
        line = f"chain {row['key']} (launches: {cut or '-'}): fused vs {speed or '-'}"
        line += "" if roof is None else f", {100 * roof:.0f}% of roofline"
        lines.append(line + (f"; failed {row['failed']}" if row["failed"] else ""))
    tiles = summary.get("tiles") or {}
    if tiles.get("cases"):
        lines.append(f"tiles: heuristic over the fastest tile timed, median {tiles['median_gain']:.2f}x "
                     f"over {len(tiles['cases'])} cases")  # fmt: skip
        for row in tiles["cases"]:
            if row["gain"] > 1.1 or row["wrong_tiles"]:
                lines.append(f"  {row['key']}: {row['gain']:.2f}x with {row['best_tile']}"
                             + (f"; wrong: {row['wrong_tiles']}" if row["wrong_tiles"] else ""))  # fmt: skip
    for kind in ("models", "launch"):
        for row in summary.get(kind, []):
            vs = row.get("ksfx_vs_inductor_latency")
            line = f"{kind} {row['key']}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row["ms"].items())
            line += "" if vs is None else f"; ksfx {100 * vs:+.1f}% vs Inductor"
            if kind == "launch":
                line += "; " + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items())
            for what in ("wrong", "unavailable"):
                line += f"; {what} {row[what]}" if row[what] else ""
            lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.common import environment

    tag, date = _device_tag(args.dry_run), datetime.date.today().isoformat()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.out_dir / f"gpu_suite_{tag}_{date}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"steps": {}}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    torch.set_float32_matmul_precision("highest")
    state["environment"] = {**environment(device), "fp32_precision": "highest", "dry_run": args.dry_run}
    deadline = time.monotonic() + args.budget
    plan = steps(args, tag, date)
    for step in plan:
        previous = state["steps"].get(step["name"])
        if previous and previous["returncode"] == 0 and not args.force:
            print(f"{step['name']}: done in an earlier run", file=sys.stderr)
            continue
        seconds = min(step["share"] * args.budget, deadline - time.monotonic())
        if seconds < 15:
            print(f"{step['name']}: no time left; run the same command again to resume", file=sys.stderr)
            break
        print(f"{step['name']}: up to {seconds:.0f} s", file=sys.stderr)
        state["steps"][step["name"]] = run_step(step, seconds, args.dry_run)
        state_path.write_text(json.dumps(state, indent=1) + "\n")
    state["patterns"] = summarise_patterns(next(s["out"] for s in plan if s["name"] == "patterns"))
    state["dispatch"] = summarise_dispatch(next(s["out"] for s in plan if s["name"] == "patterns"))
    state["chains"] = summarise_chains(next(s["out"] for s in plan if s["name"] == "chains"))
    state["models"] = summarise_models(next(s["out"] for s in plan if s["name"] == "models"))
    state["launch"] = summarise_models(next(s["out"] for s in plan if s["name"] == "launch"))
    state["tiles"] = summarise_tiles(next(s["out"] for s in plan if s["name"] == "tiles"))
    state_path.write_text(json.dumps(state, indent=1) + "\n")
    print(table(state))
    print(state_path)
    failed = [name for name, step in state["steps"].items() if step["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
