"""ksfx in one minute: compile a Kronecker-sparse ViT with ``backend="ksfx"``.

Run ``python -m examples.demo``. The model (``examples/ks_models.py``) is plain PyTorch:
its Q/K/V and MLP projections are KS chains written the way Monarch-style code writes
them (reshape → permute → bmm → inverse reshuffle). Nothing in it mentions ksfx. The
demo shows what ksfx finds in the graph, checks the compiled model against eager, and
times eager vs Inductor vs ksfx on the available device.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

import ksfx
from examples.ks_models import VIT_SMALL, KSViT, vit_inputs


def median_seconds(fn, device: torch.device) -> float:
    """Median time of one call: ``do_bench`` on a GPU, ``torch.utils.benchmark`` on a CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3
    import torch.utils.benchmark as benchmark

    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = KSViT(VIT_SMALL).to(device).eval()
    (images,) = vit_inputs(VIT_SMALL, batch=32, device=device)
    print(f"KS-ViT: {VIT_SMALL.depth} blocks, width {VIT_SMALL.dim}, {VIT_SMALL.tokens} tokens, batch 32, on {device}")
    print(f"  Q/K/V chains (leftmost first): {VIT_SMALL.qkv}")
    print(f"  MLP chains: up {VIT_SMALL.mlp_up}, down {VIT_SMALL.mlp_down}\n")

    # 1. What ksfx sees, without changing the model (print(report) shows every chain and the rewritten graph).
    report = ksfx.explain(model, images)
    found = Counter((tuple(c.patterns), c.rewritten, c.reason) for c in report.chains)
    print(f"ksfx.explain: {len(report.chains)} candidate chains, {sum(c.rewritten for c in report.chains)} rewritten")
    for (patterns, rewritten, reason), count in found.items():
        shown = ", ".join(str(p) for p in patterns) or "-"
        print(f"  {count:2d} x  {shown:<40} {'rewritten' if rewritten else 'kept':<9}  {reason}")

    # 2. Compile. The string "ksfx" resolves through an entry point (no import needed) and lets
    #    the cost model decide per chain; ksfx.backend(rewrite="always") rewrites every KS chain.
    compiled = {
        "Inductor": torch.compile(model),
        "ksfx": torch.compile(model, backend="ksfx"),
        "ksfx-always": torch.compile(model, backend=ksfx.backend(rewrite="always")),
    }
    print()
    with torch.no_grad():
        reference = model(images)
        for name, fn in compiled.items():
            start = time.perf_counter()
            ksfx.stats(reset=True)
            out = fn(images)
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            print(
                f"{name:>11}: compiled in {time.perf_counter() - start:5.1f} s, max relative error vs eager "
                f"{error:.1e}, KS op launches per forward {ksfx.stats() or 'none'}"
            )
            if error > 1e-3:
                raise AssertionError(f"{name} disagrees with eager: relative error {error:.1e}")

        # 3. Latency of one forward pass; three interleaved rounds, best kept (robust to background load).
        contenders = {"eager": model, **compiled}
        times = {}
        for _ in range(3):
            for name, fn in contenders.items():
                seconds = median_seconds(lambda fn=fn: fn(images), device)
                times[name] = min(times.get(name, seconds), seconds)
    print()
    for name, seconds in times.items():
        print(f"{name:>11}: {1e3 * seconds:7.2f} ms  ({times['Inductor'] / seconds:.2f}x Inductor's speed)")


if __name__ == "__main__":
    main()
