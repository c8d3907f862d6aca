"""KS blocks on a CPU: ``torch.compile(backend="ksfx")`` against Inductor, over a grid.

Each case is a block as a transformer writes it around KS layers: LayerNorm, the KS
layer(s), GELU and a residual (``x + down(gelu(up(ln(x))))`` for the MLP chains,
``x + gelu(ks(ln(x)))`` for square chains). The KS layers are written the way public
code writes them: reshape/transpose/bmm per factor (``examples.ks_models.BmmKSLinear``:
the paper's ViT-S/16 and GPT-2 medium chains, Monarch, butterflies as bmm's), and
butterflies with 2×2 blocks as a broadcast multiply and a sum per factor (torch-butterfly's
formulation). Grid: rows (tokens) × threads × inference / a training step (forward and
backward of a weighted sum); fp32, IEEE precision. Contenders: eager, Inductor, and
ksfx with the default options (``backend="ksfx"``: the cost model decides per chain).
Times are the best of ``--rounds`` interleaved medians; ``spread`` keeps every round's
median so that a ratio can be judged against the noise.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ksfx
from benchmarks import common
from examples.ks_models import BmmKSLinear, monarch_patterns

#: ``ksfx_always`` rewrites every structured chain: the data the cost model's CPU rule comes from.
CONTENDERS = ("eager", "inductor", "ksfx", "ksfx_always")
ROWS = (17, 197, 1576, 8192)
THREADS = (1, 2)
MODES = ("inference", "train")


def butterfly_patterns(n: int) -> tuple[tuple[int, int, int, int], ...]:
    """The size-``n`` butterfly, leftmost first: ``(2^{l-1}, 2, 2, n / 2^l)``."""
    log_n = int(math.log2(n))
    return tuple((2 ** (level - 1), 2, 2, n >> level) for level in range(1, log_n + 1))


class MulSumButterfly(nn.Module):
    """``log2(n)`` butterfly factors, each a broadcast multiply by ``(n/2, 2, 2)`` twiddles and a sum."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.log_n = n, int(math.log2(n))
        self.twiddle = nn.Parameter(torch.randn(self.log_n, n // 2, 2, 2) / math.sqrt(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, self.n)
        for level in range(self.log_n):
            stride = 1 << level
            t = self.twiddle[level].reshape(self.n // (2 * stride), stride, 2, 2).permute(0, 2, 3, 1)
            h = h.reshape(-1, self.n // (2 * stride), 1, 2, stride)
            h = (t * h).sum(dim=3).reshape(-1, self.n)
        return h.reshape(*lead, self.n)


class Block(nn.Module):
    """``x + down(gelu(up(ln(x))))``, or ``x + gelu(up(ln(x)))`` without ``down``."""

    def __init__(self, width: int, up: nn.Module, down: nn.Module | None = None) -> None:
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(width), up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(self.ln(x)))
        return x + (self.down(h) if self.down is not None else h)


def _vit_mlp():
    return Block(384, BmmKSLinear(((1, 768, 192, 2), (6, 64, 64, 1))), BmmKSLinear(((1, 128, 128, 3), (6, 64, 256, 1))))


#: name -> (width, builder)
CASES = {
    "vit_s16_mlp": (384, _vit_mlp),
    "vit_s16_qkv": (384, lambda: Block(384, BmmKSLinear(((1, 192, 48, 2), (2, 48, 192, 1))))),
    "gpt2_medium_mlp": (
        1024,
        lambda: Block(1024, BmmKSLinear(monarch_patterns(1024, 4096, 4)), BmmKSLinear(monarch_patterns(4096, 1024, 4))),
    ),
    "monarch_256": (256, lambda: Block(256, BmmKSLinear(((1, 16, 16, 16), (16, 16, 16, 1))))),
    "monarch_1024": (1024, lambda: Block(1024, BmmKSLinear(((1, 32, 32, 32), (32, 32, 32, 1))))),
    "monarch_2048": (2048, lambda: Block(2048, BmmKSLinear(((1, 64, 32, 32), (32, 32, 64, 1))))),
    "butterfly_bmm_1024": (1024, lambda: Block(1024, BmmKSLinear(butterfly_patterns(1024)))),
    "butterfly_mulsum_256": (256, lambda: Block(256, MulSumButterfly(256))),
    "butterfly_mulsum_1024": (1024, lambda: Block(1024, MulSumButterfly(1024))),
}


def _step(model: nn.Module, x: torch.Tensor, mode: str):
    if mode == "inference":

        def run():
            with torch.no_grad():
                return model(x)

        return run
    probe = torch.linspace(-1, 1, x.numel()).reshape(x.shape)

    def train():
        model.zero_grad(set_to_none=True)
        y = model(x)
        (y * probe).sum().backward()
        return y

    return train


def run_case(name: str, rows: int, threads: int, mode: str, args) -> dict:
    width, build = CASES[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(rows, width)
    contenders = {
        "eager": model,
        "inductor": torch.compile(model),
        "ksfx": torch.compile(model, backend="ksfx"),
        "ksfx_always": torch.compile(model, backend=ksfx.backend(rewrite="always")),
    }
    contenders = {k: v for k, v in contenders.items() if k in args.contenders}
    torch._dynamo.reset()
    fns = {k: _step(m, x, mode) for k, m in contenders.items()}
    expected = fns["eager"]().detach()
    errors = {k: common.rel_error(fns[k]().detach(), expected) for k in fns if k != "eager"}
    report = ksfx.explain(model, x)
    rounds = {k: [] for k in fns}
    for r in range(args.rounds):
        for k in fns if r % 2 == 0 else reversed(list(fns)):
            rounds[k].append(common.measure(fns[k], torch.device("cpu"), cpu_min_time=args.cpu_min_time))
    times = {k: min(v) for k, v in rounds.items()}
    return {
        "key": f"{name}/{rows}/{threads}/{mode}",
        "case": name,
        "width": width,
        "rows": rows,
        "threads": threads,
        "mode": mode,
        "times": times,
        "spread": rounds,
        "errors": errors,
        "speedup_vs_inductor": {k: times["inductor"] / t for k, t in times.items() if k.startswith("ksfx")},
        "rewritten": [
            {"patterns": c.patterns, "rewritten": c.rewritten, "reason": c.reason} for c in report.chains if c.patterns
        ],
    }


def summary(data: dict) -> str:
    """The measured claim the cost model's CPU rule quotes (``CPU_INLINE_MEASURED``)."""
    ratios = sorted(c["times"]["inductor"] / c["times"]["ksfx"] for c in data["cases"] if "ksfx" in c["times"])
    below = sum(max(c["spread"]["inductor"]) < min(c["spread"]["ksfx"]) for c in data["cases"] if "ksfx" in c["spread"])
    return (
        f"Inductor time / ksfx time on KS blocks: median {statistics.median(ratios):.2f}x, "
        f"{ratios[0]:.2f}-{ratios[-1]:.2f}x over {len(ratios)} points, {below} slower beyond the spread"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default=",".join(CASES), help=f"comma-separated, among {list(CASES)}")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--thread-list", default=",".join(map(str, THREADS)), help="torch.set_num_threads values")
    p.add_argument("--mode", default=",".join(MODES))
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"among {list(CONTENDERS)}")
    p.add_argument("--force", action="store_true", help="re-measure cases already in the result file")
    common.add_run_options(p, "cpu_grid", rep_ms=0.0, cpu_min_time=0.2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.device = "cpu"
    common.apply_run_options(args)
    cases = common.parse_list(args.case, CASES, "--case")
    args.contenders = common.parse_list(args.contenders, CONTENDERS, "--contenders")
    if not {"eager", "inductor"} <= set(args.contenders):
        raise ValueError("--contenders must include eager (the reference) and inductor (the baseline)")
    modes = common.parse_list(args.mode, MODES, "--mode")
    rows = [int(r) for r in common.parse_list(args.rows)]
    threads = [int(t) for t in common.parse_list(args.thread_list)]
    results = common.ResultFile.for_run("cpu_grid", args, torch.device("cpu"), argv)
    budget = common.Budget(args.time_budget)
    todo = [(t, c, r, m) for t in threads for c in cases for r in rows for m in modes]
    progress = common.Progress(len(todo), "cpu_grid")
    for t, name, n, mode in todo:
        key = f"{name}/{n}/{t}/{mode}"
        if budget.exhausted():
            print(f"time budget reached before {key}", file=sys.stderr)
            break
        if results.has(key) and not args.force:
            progress.update(f"{key} already measured")
            continue
        torch.set_num_threads(t)
        case = run_case(name, n, t, mode, args)
        results.add(case)
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in case["speedup_vs_inductor"].items())
        progress.update(f"{key}: {ratios} inductor")
        ms = {k: round(1e3 * t, 3) for k, t in case["times"].items()}
        print(f"{key}: {ratios} inductor ({ms} ms)", file=sys.stderr)
    progress.close()
    results.finish(plot=not args.no_plot)
    print(results.path)
    return results.path


if __name__ == "__main__":
    main()
