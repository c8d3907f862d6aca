"""The static sm_90 check (``python -m ksfx kernels``) over the paper's pattern grid, no GPU needed.

Every forward kernel of every pattern, both layouts, fp32 and bf16 (``--backward`` adds
the weight-gradient and dx kernels, usually on ``--sample N`` patterns spread over the
grid). Kernels compile in worker processes, a chunk of patterns each, so that a compiler
abort (an LLVM error kills its process) costs one chunk, which is then retried pattern by
pattern and the aborting case recorded. Writes one JSON (environment, triton version,
every kernel's report, and a summary of which cases miss the bar and why)::

    python -m benchmarks.static_grid --out benchmarks/results/static_grid_triton39.json
    /tmp/venv36/bin/python -m benchmarks.static_grid --backward --sample 150 --out ...

The triton version is the one of the interpreter running it: use a side venv with
``triton==3.6.0`` for what the GPU machine builds (``docs/kernels.md``).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.patterns import load_grid, spread

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16")
LAYOUTS = ("batch-first", "batch-last")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sample", type=int, help="N patterns spread over the grid (default: all)")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--batch", type=int, default=25088)
    parser.add_argument("--device", default="H100")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=24, help="patterns per worker process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args) -> int:
    """Check the cases given as JSON on the command line; print one JSON list."""
    import torch

    from ksfx.ops import static_check
    from ksfx.pattern import Chain, KSPattern

    torch.set_float32_matmul_precision("highest")
    device = static_check.DEVICES[args.device]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out = []
    for pattern, dtype, layout in json.loads(args.cases):
        chain = Chain((KSPattern(*pattern),))
        launches = static_check.chain_launches(
            chain, dtypes[dtype], layout == "batch-last", args.batch, device, args.backward
        )
        for launch in launches:
            report = static_check.check(launch, device)
            report["problems"] = static_check.passes(report)
            out.append(report)
    print(json.dumps(out))
    return 0


def _run(cases: list, args) -> tuple[list, list]:
    """Reports of ``cases`` in one worker; on a crash, each case alone (crashes recorded)."""
    command = [sys.executable, "-m", "benchmarks.static_grid", "--worker", "--out", "-", "--batch", str(args.batch)]
    command += ["--device", args.device] + (["--backward"] if args.backward else [])
    result = subprocess.run([*command, "--cases", json.dumps(cases)], capture_output=True, text=True, cwd=ROOT)
    if result.returncode == 0:
        return json.loads(result.stdout.splitlines()[-1]), []
    if len(cases) == 1:
        return [], [{"case": cases[0], "error": (result.stderr.strip().splitlines() or ["?"])[-1][:300]}]
    reports, crashes = [], []
    for case in cases:
        r, c = _run([case], args)
        reports += r
        crashes += c
    return reports, crashes


def summarise(reports: list, crashes: list) -> dict:
    by_reason = collections.Counter()
    failing = []
    for r in reports:
        for problem in r["problems"]:
            by_reason[problem.split(" ", 1)[1] if problem[0].isdigit() else problem] += 1
        if r["problems"]:
            failing.append(f"{r['kind']} {r['step']} {r['dtype']} {r['layout']}: {'; '.join(r['problems'])}")
    return {
        "kernels": len(reports),
        "passing": sum(not r["problems"] for r in reports),
        "compile_aborts": len(crashes),
        "problems_by_kind": dict(by_reason.most_common()),
        "failing": failing,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch
    import triton

    patterns = load_grid()
    if args.sample:
        patterns = spread(patterns, args.sample)
    cases = [[list(p), dtype, layout] for p in patterns for dtype in DTYPES for layout in LAYOUTS]
    chunks = [cases[i : i + args.chunk] for i in range(0, len(cases), args.chunk)]
    start = time.perf_counter()
    reports, crashes = [], []
    with ThreadPoolExecutor(args.jobs) as pool:
        for done, (r, c) in enumerate(pool.map(lambda chunk: _run(chunk, args), chunks), 1):
            reports += r
            crashes += c
            print(f"\r{done}/{len(chunks)} chunks, {len(reports)} kernels, {len(crashes)} aborts", end="", flush=True)
    print()
    summary = summarise(reports, crashes)
    data = {
        "kind": "static_grid",
        "environment": {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "target": "sm_90",
            "device_ceilings": args.device,
            "batch": args.batch,
            "date": time.strftime("%Y-%m-%d"),
            "fp32_precision": "highest",
        },
        "patterns": len(patterns),
        "backward": args.backward,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "summary": summary,
        "compile_aborts": crashes,
        "kernels": reports,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "failing"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
