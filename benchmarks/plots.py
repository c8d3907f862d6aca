"""Plots of saved results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from benchmarks.common import device_label  # noqa: E402


def plot(data: dict, path: Path) -> Path | None:
    """The plot of a result file's ``kind`` (:func:`plot_patterns`, :func:`plot_models`); None for other kinds."""
    draw = {"patterns": plot_patterns, "models": plot_models, "cpu_grid": plot_cpu_grid}.get(data["kind"])
    return draw(data, path) if draw else None


def plot_patterns(data: dict, path: Path) -> Path:
    """ECDF of ksfx's speedup over the best baseline, one panel per dtype, a line per layout/batch.

    Like the paper's figure: the fraction of patterns (y) whose speedup is at most x;
    everything right of the vertical line at 1 is a pattern where ksfx wins.
    """
    series: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for case in data["cases"]:
        if "speedup" in case:
            series[case["dtype"]][(case["layout"], case["batch"])].append(case["speedup"])
    dtypes = sorted(series) or ["fp32"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for (layout, batch), speedups in sorted(series[dtype].items()):
            xs = sorted(speedups)
            ys = [0.0, *((i + 1) / len(xs) for i in range(len(xs)))]
            ax.step([xs[0], *xs], ys, where="post", label=f"{layout}, n={batch} ({len(xs)} patterns)")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("speedup of ksfx over the best baseline")
        ax.set_ylabel("fraction of patterns")
        ax.set_title(f"{dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"KS patterns — {device_label(data['environment'])}, torch {data['environment']['torch']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_models(data: dict, path: Path) -> Path:
    """Grouped bars: latency of each contender per model/dtype/mode, in ms."""
    cases = [c for c in data["cases"] if c.get("times")]
    order = ("eager", "inductor", "inductor_cudagraphs", "ksfx", "ksfx_always", "ksfx_op", "ksfx_epilogue")
    order += ("ksfx_cudagraphs",)
    contenders = [n for n in order if any(n in c["times"] for c in cases)]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.2 * len(cases)), 4))
    width = 0.8 / len(contenders)
    for k, name in enumerate(contenders):
        xs = [i + (k - (len(contenders) - 1) / 2) * width for i in range(len(cases))]
        ms = [1e3 * c["times"].get(name, float("nan")) for c in cases]
        bars = ax.bar(xs, ms, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c['model']}\n{c['dtype']} {c['mode']} b={c['batch']}" for c in cases], fontsize=8)
    ax.set_ylabel("latency (ms, lower is better)")
    ax.set_title(f"End-to-end — {device_label(data['environment'])}, torch {data['environment']['torch']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cpu_grid(data: dict, path: Path) -> Path:
    """ksfx's speedup over Inductor against the rows, a line per case, a panel per threads × mode.

    Error bars span the ratio of the slowest to the fastest round of each contender (the
    spread of repeated runs); the line at 1 is parity with Inductor.
    """
    cases = [c for c in data["cases"] if "ksfx" in c.get("times", {})]
    panels = sorted({(c["threads"], c["mode"]) for c in cases})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.8 * max(len(panels), 1), 4), squeeze=False)
    for ax, (threads, mode) in zip(axes[0], panels, strict=False):
        series: dict[str, list] = defaultdict(list)
        for c in cases:
            if (c["threads"], c["mode"]) == (threads, mode):
                ind, ks = c["spread"]["inductor"], c["spread"]["ksfx"]
                series[c["case"]].append(
                    (c["rows"], c["times"]["inductor"] / c["times"]["ksfx"], min(ind) / max(ks), max(ind) / min(ks))
                )
        for name, points in sorted(series.items()):
            points.sort()
            rows, ratio, low, high = zip(*points, strict=True)
            err = [
                [r - lo for r, lo in zip(ratio, low, strict=True)],
                [hi - r for r, hi in zip(ratio, high, strict=True)],
            ]
            ax.errorbar(rows, ratio, yerr=err, marker="o", capsize=2, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("rows (tokens)")
        ax.set_ylabel("Inductor time / ksfx time")
        ax.set_title(f"{mode}, {threads} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(
        f"KS blocks vs Inductor — {device_label(data['environment'])}, torch {data['environment']['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
