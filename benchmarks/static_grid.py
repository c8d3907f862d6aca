"""The static sm_90 check (``python -m ksfx kernels``) over the paper's pattern grid, no GPU needed.

Every forward kernel of every pattern, both layouts, fp32 and bf16 (``--backward`` adds
the weight-gradient and dx kernels, usually on ``--sample N`` patterns spread over the
grid). Kernels compile in worker processes, a chunk of patterns each, so that a compiler
abort (an LLVM error kills its process) costs one chunk, which is then retried pattern by
pattern and the aborting case recorded. Writes one JSON (environment, triton version,
every kernel's report, and a summary of which cases miss the bar and why)::

    python -m benchmarks.static_grid --out benchmarks/results/static_grid_triton39.json
    /tmp/venv36/bin/python -m benchmarks.static_grid --backward --sample 150 --out ...
    python -m benchmarks.static_grid --out FILE --recheck --mode fma --layout batch-last --note "after ..."

``--recheck`` re-checks, after a kernel change, only the cases of ``FILE`` that the
selectors pick (``--failing``, ``--mode``, ``--dtype``, ``--layout``, ``--pattern``; all
given must hold for one of the case's kernels), replaces their reports, recomputes the
summary and records the re-check (date, cases, selection, note) under ``rechecks`` in the
file's environment. It refuses a file written by another triton version.

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
    parser.add_argument("--recheck", action="store_true", help="re-check the selected cases of --out in place")
    parser.add_argument("--failing", action="store_true", help="with --recheck: cases with a kernel under the bar")
    parser.add_argument("--mode", help="with --recheck: cases with a kernel of this mode (fma, dot, dot3, ...)")
    parser.add_argument("--dtype", choices=DTYPES, help="with --recheck: cases of this dtype")
    parser.add_argument("--layout", choices=LAYOUTS, help="with --recheck: cases of this layout")
    parser.add_argument("--pattern", help="with --recheck: cases of this pattern a,b,c,d")
    parser.add_argument("--note", default="", help="with --recheck: why, recorded in the file")
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


def _check_all(cases: list, args) -> tuple[list, list]:
    chunks = [cases[i : i + args.chunk] for i in range(0, len(cases), args.chunk)]
    reports, crashes = [], []
    with ThreadPoolExecutor(args.jobs) as pool:
        for done, (r, c) in enumerate(pool.map(lambda chunk: _run(chunk, args), chunks), 1):
            reports += r
            crashes += c
            print(f"\r{done}/{len(chunks)} chunks, {len(reports)} kernels, {len(crashes)} aborts", end="", flush=True)
    print()
    return reports, crashes


_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def _case_of(report: dict) -> tuple:
    """The ``(pattern, dtype, layout)`` case a kernel report belongs to (dtype as given on the command line)."""
    dtype = next(short for short, name in _DTYPE_NAMES.items() if name == report["dtype"])
    a, b, c, d = report["pattern"]
    return ((a, c, b, d) if report["kind"] == "dx" else (a, b, c, d), dtype, report["layout"])  # dx: the transpose


def _picked(report: dict, args, pattern: tuple | None) -> bool:
    return (
        (not args.failing or bool(report["problems"]))
        and (args.mode is None or report["mode"] == args.mode)
        and (args.dtype is None or report["dtype"] == _DTYPE_NAMES[args.dtype])
        and (args.layout is None or report["layout"] == args.layout)
        and (pattern is None or _case_of(report)[0] == pattern)
    )


def recheck(args) -> int:
    """Re-check the cases of ``args.out`` the selectors pick; merge them into the file."""
    import torch
    import triton

    data = json.loads(args.out.read_text())
    if data.get("kind") != "static_grid" or data.get("backward") != args.backward:
        backward = data.get("backward")
        raise SystemExit(f"{args.out} is not a static_grid file with backward={args.backward} (it has {backward})")
    if data["environment"]["triton"] != triton.__version__:
        have = data["environment"]["triton"]
        raise SystemExit(f"{args.out} was written by triton {have}; this is triton {triton.__version__}: run its venv")
    pattern = tuple(int(v) for v in args.pattern.split(",")) if args.pattern else None
    picked = sorted({_case_of(r) for r in data["kernels"] if _picked(r, args, pattern)})
    if not picked:
        raise SystemExit("no case of the file matches the selection")
    start = time.perf_counter()
    reports, crashes = _check_all([[list(p), dtype, layout] for p, dtype, layout in picked], args)
    # a pattern the grid lists twice has its reports twice: keep that multiplicity
    old = collections.Counter(_case_of(r) for r in data["kernels"])
    new = collections.Counter(_case_of(r) for r in reports)
    reports = [r for r in reports for _ in range(max(1, old[_case_of(r)] // new[_case_of(r)]))]
    again = set(picked)
    keep = [r for r in data["kernels"] if _case_of(r) not in again]
    old_crashes = [c for c in data["compile_aborts"] if (tuple(c["case"][0]), *c["case"][1:]) not in again]
    data["kernels"], data["compile_aborts"] = keep + reports, old_crashes + crashes
    data["summary"] = summarise(data["kernels"], data["compile_aborts"])
    selection = {k: getattr(args, k) for k in ("failing", "mode", "dtype", "layout", "pattern") if getattr(args, k)}
    data["environment"].setdefault("rechecks", []).append(
        {
            "date": time.strftime("%Y-%m-%d"),
            "cases": len(picked),
            "selection": selection,
            "note": args.note,
            "triton": triton.__version__,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - start, 1),
        }
    )
    args.out.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    print(json.dumps({k: v for k, v in data["summary"].items() if k != "failing"}, indent=1))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.recheck:
        return recheck(args)
    import torch
    import triton

    patterns = load_grid()
    if args.sample:
        patterns = spread(patterns, args.sample)
    cases = [[list(p), dtype, layout] for p in patterns for dtype in DTYPES for layout in LAYOUTS]
    start = time.perf_counter()
    reports, crashes = _check_all(cases, args)
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
