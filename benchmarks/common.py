"""What every benchmark script shares: environment record, timers, progress, result files.

Timing: on CUDA ``triton.testing.do_bench`` (median over repetitions, warm-up, L2 flushed
before each run); on CPU ``torch.utils.benchmark.Timer.blocked_autorange`` (median).
Results are JSON files under ``benchmarks/results/``, written incrementally so that an
interrupted sweep resumes where it stopped when the same command is run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: Relative error bound (max |y - ref| / max |ref|) for a result to count as correct.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}


# ----------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """Short file-name form: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def device_label(env: dict) -> str:
    """The device, with the thread count on a CPU (it changes CPU timings a lot)."""
    if env.get("device_type") == "cpu":
        threads = env.get("cpu_threads")
        return f"{env['device']}, {threads} thread{'s' if threads != 1 else ''}"
    return env["device"]


def environment(device: torch.device) -> dict:
    """Everything needed to interpret a timing: device, versions, precision, threads."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import ksfx

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "ksfx": ksfx.__version__,
        "git_commit": commit or None,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "date": now(),
    }


def now() -> str:
    """The local date and time to the second, as result files record it."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    return device


def parse_list(text: str, allowed: Iterable[str] | None = None, name: str = "option") -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        allowed = list(allowed)
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown value(s) {bad}; choose among {allowed}")
    return items


# ----------------------------------------------------------------------------- command line
def add_run_options(p: argparse.ArgumentParser, kind: str, *, rep_ms: float, cpu_min_time: float) -> None:
    """The options every sweep takes: device, threads, precision, timing, result file, plot."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument(
        "--precision",
        default="highest",
        choices=("highest", "high", "medium"),
        help="torch.set_float32_matmul_precision for every contender (highest = IEEE fp32)",
    )
    p.add_argument("--time-budget", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--rep-ms", type=float, default=rep_ms, help="do_bench repetition time per contender (GPU)")
    p.add_argument("--cpu-min-time", type=float, default=cpu_min_time, help="blocked_autorange min_run_time (CPU)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds, best kept (default: 3 on CPU, 1 on GPU)")
    p.add_argument("--out", type=Path, default=None, help=f"result file (default results/{kind}_<device>_<date>.json)")
    p.add_argument("--verbose", action="store_true", help="print full tracebacks of failing contenders")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG next to the JSON")


def apply_run_options(args: argparse.Namespace) -> torch.device:
    """Act on :func:`add_run_options`: pick the device, set threads and precision, default ``--rounds``."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.precision)
    args.rounds = args.rounds or default_rounds(device)
    return device


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, *, rep_ms: float = 40.0, cpu_min_time: float = 0.1
) -> float:
    """Median seconds per call of ``fn`` (already warmed up by the caller or here)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(rep_ms / 4, 5.0), rep=rep_ms, return_mode="median") * 1e-3
    import torch.utils.benchmark as benchmark

    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=cpu_min_time).median


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, **kwargs
) -> dict[str, float]:
    """Best of ``rounds`` medians per contender, timing the contenders in turn each round.

    Interleaving spreads background load (a shared CPU) over every contender instead of
    penalising whichever ran while the machine was busy; the order alternates per round.
    """
    best: dict[str, float] = {}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):  # alternate the order: no position bias
            best[name] = min(best.get(name, float("inf")), measure(fns[name], device, **kwargs))
    return {name: best[name] for name in names}


def default_rounds(device: torch.device) -> int:
    return 1 if device.type == "cuda" else 3


def copy_bandwidth(device: torch.device) -> float | None:
    """Achievable global-memory bandwidth in bytes/s (a large device-to-device copy), CUDA only."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device, rep_ms=100.0)
    return 2 * src.numel() / seconds


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` computed in fp32 (inf on shape mismatch or NaN)."""
    if y.shape != ref.shape:
        return float("inf")
    y, ref = y.detach().float(), ref.detach().float()
    scale = ref.abs().max().item() or 1.0
    err = (y - ref).abs().max().item() / scale
    return err if err == err else float("inf")


def report_failure(verbose: bool) -> None:
    """Tell stderr why a contender failed (inside an ``except``): one line, or the traceback."""
    if verbose:
        traceback.print_exc(file=sys.stderr)
    else:
        sys.stderr.write("  failed: " + traceback.format_exc().strip().splitlines()[-1][:300] + "\n")


def contender_failure(exc: Exception, verbose: bool, limit: int) -> str:
    """Why a contender failed, as a case records it (inside its ``except``).

    Out of memory frees the CUDA cache and is recorded as such; any other error is told to
    stderr (:func:`report_failure`) and recorded as ``error: Type: message``, cut at ``limit``.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return "out of memory"
    report_failure(verbose)
    return f"error: {type(exc).__name__}: {exc}"[:limit]


# ----------------------------------------------------------------------------- progress
class Progress:
    """One-line progress bar on stderr (redrawn on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, label: str = "") -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_decile = -1

    def update(self, note: str = "") -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        width = 30
        filled = int(width * self.done / self.total)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s elapsed, ~{eta:4.0f}s left {note}"
        )
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
            if self.done == self.total:
                sys.stderr.write("\n")
        elif self.done * 10 // self.total != self.last_decile:
            self.last_decile = self.done * 10 // self.total
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.done < self.total:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------- result files
def default_path(kind: str, device: torch.device) -> Path:
    return RESULTS_DIR / f"{kind}_{device_slug(device)}_{datetime.date.today().isoformat()}.json"


class ResultFile:
    """A JSON result file holding ``environment``, ``runs`` and ``cases`` keyed by ``key``.

    Opening an existing file resumes it: cases already present are skipped by the
    caller (:meth:`has`), new ones are appended, and :meth:`save` rewrites the file
    atomically (at most every ``interval`` seconds unless forced).
    """

    def __init__(self, path: Path, kind: str, env: dict, argv: list[str], interval: float = 15.0) -> None:
        self.path, self.interval = Path(path), interval
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data.get("kind") != kind:
                raise ValueError(f"{self.path} holds {self.data.get('kind')!r} results, not {kind!r}")
            if self.data["environment"]["device"] != env["device"]:
                raise ValueError(
                    f"{self.path} was measured on {self.data['environment']['device']!r}, not {env['device']!r}"
                )
        else:
            self.data = {"kind": kind, "environment": env, "runs": [], "cases": []}
        self.data["runs"].append({"argv": argv, "started": env["date"], "environment": env})
        self.keys = {case["key"] for case in self.data["cases"]}
        self.last_save = 0.0

    @classmethod
    def for_run(cls, kind: str, args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> ResultFile:
        """The file ``--out`` names (default :func:`default_path`), opened for this run of ``main(argv)``."""
        argv = sys.argv[1:] if argv is None else list(argv)
        return cls(args.out or default_path(kind, device), kind, environment(device), argv)

    def has(self, key: str) -> bool:
        return key in self.keys

    def add(self, case: dict) -> None:
        """Append ``case``, replacing an earlier case with the same key (a forced re-measure)."""
        self.data["cases"] = [c for c in self.data["cases"] if c["key"] != case["key"]] + [case]
        self.keys.add(case["key"])
        self.save(force=False)

    def save(self, force: bool = True, **run_info) -> None:
        self.data["runs"][-1].update(run_info)
        if not force and time.monotonic() - self.last_save < self.interval:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False) + "\n")
        tmp.replace(self.path)
        self.last_save = time.monotonic()

    def finish(self, plot: bool, **run_info) -> None:
        """Save with the run's end time and ``run_info``; with ``plot``, draw the PNG next to the JSON."""
        self.save(finished=now(), **run_info)
        if plot:
            from benchmarks import plots

            plots.plot(self.data, self.path.with_suffix(".png"))


class Budget:
    """``--time-budget``: tells a sweep when to stop so that it can save and exit cleanly."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def exhausted(self, margin: float = 0.0) -> bool:
        return self.seconds is not None and time.monotonic() - self.start + margin > self.seconds


def shard(items: list, spec: str | None) -> list:
    """``--shard i/n``: every n-th item starting at i (0-based), so shards interleave sizes."""
    if not spec:
        return items
    match = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard must read i/n with 0 <= i < n, got {spec!r}")
    i, n = int(match[1]), int(match[2])
    return items[i::n]
