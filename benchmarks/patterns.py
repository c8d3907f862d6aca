"""Per-pattern sweep: ksfx's KS op against the formulations a user would otherwise run.

For every pattern ``(a, b, c, d)`` of the paper's grid (``benchmarks/data/``), dtype,
layout and batch size, one factor ``y = x @ K.T`` (batch-first, ``x: (n, a*c*d)``) or
``y = K @ x`` (batch-last, ``x: (a*c*d, n)``) is timed with:

- ``ksfx``: ``ksfx.ks_matmul`` (the ``ksfx::ks_chain`` op, called eagerly);
- ``bmm``: the reshape/transpose/bmm formulation (Monarch/ksmm style), eager;
- ``einsum``: ``torch.einsum`` on the ``(a, b, c, d)`` values, eager;
- ``dense``: a matmul with the materialised ``(a*b*d, a*c*d)`` matrix;
- ``bmm_inductor``: the bmm formulation compiled by ``torch.compile`` (Inductor defaults);
- with ``--tiles K``, ``ksfx_tile1`` .. ``ksfx_tileK``: the generated kernel on the K
  least-traffic other tiles of its autotuning space, next to the heuristic's (``ksfx``
  with ``KSFX_DISPATCH=triton``): the data to check the no-tuning heuristic against.

Every contender's output is checked against the bmm formulation run in fp32. Speedups
are ``time(contender) / time(ksfx)``; the headline is ksfx against the *best* baseline of
each case. Run ``python -m benchmarks.patterns --help`` for the options; rerunning the
same command resumes an interrupted sweep (cases already in the output file are skipped).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import zlib
from pathlib import Path

import torch

import ksfx
from benchmarks import common
from examples.ks_models import ks_factor_bmm
from ksfx.pattern import FactorStep

GRID_CSV = Path(__file__).resolve().parent / "data" / "ks_patterns_paper.csv"
LAYOUTS = ("batch-first", "batch-last")
BASELINES = ("bmm", "einsum", "dense", "bmm_inductor")
PAPER_BATCH = 25088  # 196 tokens × 128 images, the batch the paper tuned for
QUICK_PATTERNS, QUICK_MAX_FEATURES, QUICK_BATCH = 12, 4096, 2048

Pattern = tuple[int, int, int, int]


# ----------------------------------------------------------------------------- the grid
def load_grid(path: Path = GRID_CSV) -> list[Pattern]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [(int(r["a"]), int(r["b"]), int(r["c"]), int(r["d"])) for r in rows]


def features(p: Pattern) -> tuple[int, int]:
    """``(in_features, out_features)`` = ``(a*c*d, a*b*d)``."""
    a, b, c, d = p
    return a * c * d, a * b * d


def block_ratio(p: Pattern) -> float:
    """The paper's heuristic ``h(b, c) = (b + c) / (b*c)``: large for small blocks."""
    return (p[1] + p[2]) / (p[1] * p[2])


def spread(patterns: list[Pattern], count: int | None) -> list[Pattern]:
    """``count`` patterns evenly spaced over the grid ordered by ``h(b, c)`` then size."""
    ordered = sorted(patterns, key=lambda p: (block_ratio(p), p[0] * p[3], math.prod(p)))
    if count is None or count >= len(ordered):
        return ordered
    if count <= 1:
        return ordered[len(ordered) // 2 : len(ordered) // 2 + 1][:count]
    return [ordered[round(i * (len(ordered) - 1) / (count - 1))] for i in range(count)]


# ----------------------------------------------------------------------------- formulations
def bmm_formulation(x: torch.Tensor, w_bmm: torch.Tensor, pattern: Pattern, batch_last: bool) -> torch.Tensor:
    """The reshape/transpose/bmm code public KS layers use; ``w_bmm`` has shape ``(a*d, b, c)``."""
    if not batch_last:
        return ks_factor_bmm(x, w_bmm, pattern)
    a, b, c, d = pattern
    n = x.shape[1]
    blocks = x.reshape(a, c, d, n).permute(0, 2, 1, 3).reshape(a * d, c, n)
    out = torch.bmm(w_bmm, blocks)
    return out.reshape(a, d, b, n).permute(0, 2, 1, 3).reshape(a * b * d, n)


def einsum_formulation(x: torch.Tensor, values: torch.Tensor, pattern: Pattern, batch_last: bool) -> torch.Tensor:
    a, b, c, d = pattern
    if batch_last:
        return torch.einsum("abcd,acdn->abdn", values, x.reshape(a, c, d, -1)).reshape(a * b * d, -1)
    return torch.einsum("nacd,abcd->nabd", x.reshape(-1, a, c, d), values).reshape(-1, a * b * d)


def dense_formulation(x: torch.Tensor, dense: torch.Tensor, batch_last: bool) -> torch.Tensor:
    return dense @ x if batch_last else x @ dense.T


# ----------------------------------------------------------------------------- one case
def case_key(pattern: Pattern, dtype: str, layout: str, batch: int) -> str:
    return f"{','.join(map(str, pattern))}|{dtype}|{layout}|{batch}"


def analytic_bytes(pattern: Pattern, batch: int, itemsize: int, batch_last: bool, device: torch.device) -> int | None:
    """Global-memory bytes ksfx's Triton kernel moves (its own byte model, 32-byte sectors).

    Evaluated for the no-tuning tile heuristic (the autotuner may pick another tiling);
    None on CPU, where the Triton kernels do not run.
    """
    if device.type != "cuda":
        return None
    from ksfx.codegen import tiling, traffic

    kp = ksfx.KSPattern(*pattern)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    cfg = tiling.forward_heuristic(kp, batch, itemsize, batch_last, sms)
    return traffic.bytes_moved(FactorStep(kp), batch, batch_last, cfg, itemsize, sector=32).total


def tile_contenders(pattern: Pattern, x: torch.Tensor, values: torch.Tensor, batch_last: bool, count: int):
    """The generated kernel on the ``count`` least-traffic tiles of its forward config space
    other than the heuristic's (the space's first), and every config by contender name."""
    from ksfx.codegen.tuning import forward_config_space
    from ksfx.ops import triton_path

    step = FactorStep(ksfx.KSPattern(*pattern))
    n = x.shape[1] if batch_last else x.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    space = forward_config_space(step, n, x.element_size(), batch_last, sms)
    tiles = {"ksfx": space[0], **{f"ksfx_tile{i}": cfg for i, cfg in enumerate(space[1 : count + 1], 1)}}
    fns = {
        name: (lambda cfg=cfg: triton_path.factor_forward(x, values, step, batch_last, tile=cfg))
        for name, cfg in tiles.items()
        if name != "ksfx"
    }
    return fns, {name: dataclasses.asdict(cfg) for name, cfg in tiles.items()}


def fits(pattern: Pattern, batch: int, itemsize: int, device: torch.device, dense_limit: int) -> tuple[bool, bool]:
    """Whether the case (and separately its dense matrix) fits in memory."""
    fin, fout = features(pattern)
    # x, the fp32 reference, a contender's output and the bmm path's two reshuffled copies
    need = batch * (fin * itemsize + fout * 4 + 2 * fout * itemsize + fin * itemsize)
    dense_bytes = fin * fout * itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = 16 * 2**30
    return need < 0.8 * free, dense_bytes <= dense_limit and need + dense_bytes < 0.8 * free


def run_case(pattern: Pattern, dtype_name: str, layout: str, batch: int, device: torch.device, args) -> dict:
    dtype = common.DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    batch_last = layout == "batch-last"
    a, b, c, d = pattern
    fin, fout = features(pattern)
    case = {
        "key": case_key(pattern, dtype_name, layout, batch),
        "pattern": list(pattern),
        "dtype": dtype_name,
        "layout": layout,
        "batch": batch,
        "h": block_ratio(pattern),
        "flops": ksfx.KSPattern(*pattern).flops(batch),
        "min_bytes": ksfx.KSPattern(*pattern).min_bytes(batch, itemsize),
        "times": {},
        "errors": {},
        "skipped": {},
    }
    try:
        case["bytes"] = analytic_bytes(pattern, batch, itemsize, batch_last, device)
    except Exception as exc:  # the byte model is optional information: record why it is missing
        case["bytes"] = None
        case["bytes_error"] = f"{type(exc).__name__}: {exc}"[:300]
    ok, dense_ok = fits(pattern, batch, itemsize, device, int(args.dense_limit_gb * 2**30))
    if not ok:
        case["skipped"]["all"] = "does not fit in device memory"
        return case

    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case["key"].encode()))
    try:
        values = (torch.randn(pattern, generator=gen, device=device) / math.sqrt(c)).to(dtype)
        x_shape = (fin, batch) if batch_last else (batch, fin)
        x = torch.randn(x_shape, generator=gen, device=device, dtype=dtype)
        w_bmm = values.permute(0, 3, 1, 2).reshape(a * d, b, c).contiguous()
        ref = bmm_formulation(x.float(), w_bmm.float(), pattern, batch_last)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        case["skipped"]["all"] = "out of memory while preparing the inputs"
        return case

    contenders = {
        "ksfx": lambda: ksfx.ks_matmul(x, [values], batch_last=batch_last),
        "bmm": lambda: bmm_formulation(x, w_bmm, pattern, batch_last),
        "einsum": lambda: einsum_formulation(x, values, pattern, batch_last),
    }
    if "dense" in args.baselines:
        if dense_ok:
            dense = ksfx.KSPattern(*pattern).to_dense(values)
            contenders["dense"] = lambda: dense_formulation(x, dense, batch_last)
        else:
            case["skipped"]["dense"] = f"dense matrix ({fout}x{fin}) over --dense-limit-gb={args.dense_limit_gb}"
    if "bmm_inductor" in args.baselines:
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no stale guards
        compiled = torch.compile(lambda x, w: bmm_formulation(x, w, pattern, batch_last), dynamic=False)
        contenders["bmm_inductor"] = lambda: compiled(x, w_bmm)
    for name in [n for n in contenders if n != "ksfx" and n not in args.baselines]:
        del contenders[name]
    if args.tiles:
        tiled, case["tiles"] = tile_contenders(pattern, x, values, batch_last, args.tiles)
        contenders.update(tiled)

    working = {}
    for name, fn in contenders.items():
        try:
            ksfx.stats(reset=True)
            y = fn()  # first call: compiles (Inductor) or autotunes (ksfx on GPU)
            if name == "ksfx":  # which implementation ran: a kernel that fell back is not timed as one
                case["ksfx_launches"] = ksfx.stats(reset=True)
            case["errors"][name] = common.rel_error(y, ref)
            working[name] = fn
            del y
        except Exception as exc:  # a failing contender is recorded, the sweep goes on
            case["skipped"][name] = common.contender_failure(exc, args.verbose, limit=500)
    del ref
    case["times"] = common.measure_interleaved(
        working, device, args.rounds, rep_ms=args.rep_ms, cpu_min_time=args.cpu_min_time
    )
    summarise(case, dtype_name, args.copy_bandwidth)
    return case


def summarise(case: dict, dtype_name: str, copy_bandwidth: float | None) -> None:
    """Correctness, best baseline, speedups and bandwidth fraction of a measured case."""
    times = case["times"]
    case["correct"] = case["errors"].get("ksfx", math.inf) <= common.TOLERANCE[dtype_name]
    wrong_tiles = [n for n, e in case["errors"].items() if n.startswith("ksfx_") and e > common.TOLERANCE[dtype_name]]
    if wrong_tiles:
        case["wrong_tiles"] = wrong_tiles
    baselines = {n: t for n, t in times.items() if not n.startswith("ksfx")}
    if "ksfx" not in times or not baselines:
        return
    t = times["ksfx"]
    tiled = {n: bt for n, bt in times.items() if n.startswith("ksfx")}
    if len(tiled) > 1:  # the heuristic's tile against the fastest of the others timed
        case["best_tile"] = min(tiled, key=tiled.get)
        case["tile_gain"] = t / tiled[case["best_tile"]]
    case["best_baseline"] = min(baselines, key=baselines.get)
    case["speedup"] = baselines[case["best_baseline"]] / t
    case["speedups"] = {n: bt / t for n, bt in baselines.items()}
    case["ksfx_gbps"] = case["min_bytes"] / t / 1e9
    if copy_bandwidth:
        # achieved / copy bandwidth, counting the bytes ksfx's model says it moves and the lower bound
        case["lower_bound_fraction"] = case["min_bytes"] / t / copy_bandwidth
        if case["bytes"]:
            case["bandwidth_fraction"] = case["bytes"] / t / copy_bandwidth


# ----------------------------------------------------------------------------- the sweep
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.patterns", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_PATTERNS} representative patterns (features <= "
        f"{QUICK_MAX_FEATURES}), batch {QUICK_BATCH}, fp32: a few minutes on a CPU",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N patterns, spread evenly over the grid")
    p.add_argument("--shard", default=None, help="i/n: run every n-th pattern starting at i (0-based)")
    p.add_argument("--dtype", default=None, help="comma list of fp32,fp16,bf16 (default: all on GPU, fp32 on CPU)")
    p.add_argument("--layout", default=",".join(LAYOUTS), help="comma list of batch-first,batch-last")
    p.add_argument("--batch", default=None, help=f"comma list of batch sizes (default {PAPER_BATCH},4096,128)")
    p.add_argument("--baselines", default=",".join(BASELINES), help="comma list of " + ",".join(BASELINES))
    p.add_argument("--dense-limit-gb", type=float, default=2.0, help="skip the dense baseline above this size")
    p.add_argument("--tiles", type=int, default=0, help="also time the kernel on K other tiles of its config space")
    common.add_run_options(p, "patterns", rep_ms=40.0, cpu_min_time=0.1)
    return p.parse_args(argv)


def plan(args: argparse.Namespace, device: torch.device) -> list[tuple[Pattern, str, str, int]]:
    grid = load_grid()
    if args.quick:
        grid = [p for p in grid if max(features(p)) <= QUICK_MAX_FEATURES]
        patterns = spread(grid, args.limit or QUICK_PATTERNS)
    else:
        patterns = spread(grid, args.limit)
    patterns = common.shard(patterns, args.shard)
    default_dtypes = "fp32,fp16,bf16" if device.type == "cuda" else "fp32"
    dtypes = common.parse_list(args.dtype or default_dtypes, common.DTYPES, "--dtype")
    if device.type == "cpu" and set(dtypes) - {"fp32"}:
        print("note: fp16/bf16 matmuls on this CPU measure its emulation, not a fair comparison", file=sys.stderr)
    layouts = common.parse_list(args.layout, LAYOUTS, "--layout")
    default_batch = str(QUICK_BATCH) if args.quick else f"{PAPER_BATCH},4096,128"
    batches = [int(v) for v in common.parse_list(args.batch or default_batch)]
    args.baselines = common.parse_list(args.baselines, BASELINES, "--baselines")
    # Cheap cases first so that a time budget covers every (dtype, layout, batch) group.
    return [(p, dt, lay, n) for n in sorted(batches) for dt in dtypes for lay in layouts for p in patterns]


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = common.apply_run_options(args)
    cases = plan(args, device)
    results = common.ResultFile.for_run("patterns", args, device, argv)
    todo = [c for c in cases if not results.has(case_key(*c))]
    args.copy_bandwidth = common.copy_bandwidth(device)
    results.data["environment"]["copy_bandwidth"] = args.copy_bandwidth
    print(
        f"{len(cases)} cases, {len(cases) - len(todo)} already in {results.path}; "
        f"device {results.data['environment']['device']}",
        file=sys.stderr,
    )
    budget = common.Budget(args.time_budget)
    progress = common.Progress(len(todo), "patterns")
    stopped = False
    for pattern, dtype_name, layout, batch in todo:
        if budget.exhausted():
            stopped = True
            break
        case = run_case(pattern, dtype_name, layout, batch, device, args)
        results.add(case)
        note = f"{pattern} {dtype_name} {layout} n={batch} ×{case.get('speedup', float('nan')):.2f}"
        progress.update(note)
    progress.close()
    left = len(todo) - progress.done if stopped else 0
    results.finish(plot=not args.no_plot, cases_left=left)
    if left:
        print(f"time budget reached: {left} cases left; run the same command again to resume", file=sys.stderr)
    bad = [c["key"] for c in results.data["cases"] if c.get("correct") is False]
    if bad:
        print(f"WARNING: ksfx out of tolerance in {len(bad)} cases, e.g. {bad[:3]}", file=sys.stderr)
    print(results.path)
    return results.path


if __name__ == "__main__":
    main()
