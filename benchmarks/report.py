"""Turn every saved result under ``benchmarks/results/`` into the tables of ``benchmarks/README.md``.

The tables are regenerated between marker comments; the rest of the README is left as
written. ``python -m benchmarks.report --plots`` also redraws each result's PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks import common

README = Path(__file__).resolve().parent / "README.md"
BASELINES = ("bmm", "einsum", "dense", "bmm_inductor")


def load(results_dir: Path) -> list[tuple[Path, dict]]:
    """The timed result files (those with ``cases``); the static census files
    (``static_grid``, ``fused_census``) hold reports, not timings, and are cited by hand."""
    found = [(path, json.loads(path.read_text())) for path in sorted(results_dir.glob("*.json"))]
    return [(path, data) for path, data in found if "cases" in data and "environment" in data]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def pattern_table(results: list[tuple[Path, dict]]) -> str:
    """Per device/dtype/layout/batch: speedup of ksfx over the best baseline and over each baseline."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for _, data in results:
        if data.get("kind") != "patterns":
            continue
        env = data["environment"]
        for case in data["cases"]:
            if "speedup" in case:
                key = (
                    common.device_label(env),
                    env["float32_matmul_precision"],
                    case["dtype"],
                    case["layout"],
                    case["batch"],
                )
                groups[key].append(case)
    if not groups:
        return "_No pattern results yet._\n"
    head = (
        "| device | fp32 precision | dtype | layout | batch | patterns | ksfx correct | median speedup | Q1 – Q3 "
        "| ksfx wins | " + " | ".join(f"median vs {b}" for b in BASELINES) + " | bandwidth fraction (median) |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(groups, key=lambda k: (k[0], k[2], k[3], k[4])):
        cases = groups[key]
        speedups = [c["speedup"] for c in cases]
        q1, med, q3 = quartiles(speedups)
        wins = sum(s > 1.0 for s in speedups) / len(speedups)
        correct = sum(bool(c.get("correct")) for c in cases)
        per_baseline = []
        for b in BASELINES:
            vals = [c["speedups"][b] for c in cases if b in c.get("speedups", {})]
            per_baseline.append(fmt(statistics.median(vals), ".2f", "×") if vals else "–")
        fractions = [c["bandwidth_fraction"] for c in cases if c.get("bandwidth_fraction")]
        device, precision, dtype, layout, batch = key
        rows.append(
            f"| {device} | {precision} | {dtype} | {layout} | {batch} | {len(cases)} | {correct}/{len(cases)} "
            f"| {med:.2f}× | {q1:.2f}× – {q3:.2f}× | {100 * wins:.0f}% | "
            + " | ".join(per_baseline)
            + f" | {fmt(statistics.median(fractions), '.0%') if fractions else '–'} |"
        )
    return "\n".join(rows) + "\n"


def model_table(results: list[tuple[Path, dict]]) -> str:
    """Latency per model/dtype/mode with eager, Inductor and ksfx, and ksfx's change vs Inductor."""
    rows_data = []
    for _, data in results:
        if data.get("kind") != "models":
            continue
        for case in data["cases"]:
            rows_data.append((common.device_label(data["environment"]), case))
    if not rows_data:
        return "_No model results yet._\n"
    head = (
        "| device | model | size | dtype | mode | batch | eager ms | Inductor ms | ksfx ms | ksfx vs Inductor "
        "| ksfx always ms | always vs Inductor | chains rewritten (auto / always) | outputs match eager |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for device, case in sorted(rows_data, key=lambda r: (r[0], r[1]["model"], r[1]["size"], r[1]["dtype"])):
        times, ratios = case["times"], case.get("ratios", {})

        def ms(name: str, times=times, case=case) -> str:
            if name in times:
                return f"{1e3 * times[name]:.1f}"
            return "n/a" if name in case.get("unavailable", {}) else "–"

        def change(name: str, ratios=ratios) -> str:
            ratio = ratios.get(f"{name}/inductor")
            return "–" if ratio is None else f"{100 * (ratio - 1):+.1f}%"

        def rewritten(name: str, case=case) -> str:
            found = case.get("explain", {}).get(name, {})
            return f"{found['rewritten']}/{found['chains']}" if "chains" in found else "–"

        correct = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in case.get("correct", {}).items() if k != "eager")
        rows.append(
            f"| {device} | {case['model']} | {case['size']} | {case['dtype']} | {case['mode']} "
            f"| {case['batch']} | {ms('eager')} | {ms('inductor')} | {ms('ksfx')} | {change('ksfx')} "
            f"| {ms('ksfx_always')} | {change('ksfx_always')} | {rewritten('ksfx')} / {rewritten('ksfx_always')} "
            f"| {correct or '–'} |"
        )
    return "\n".join(rows) + "\n"


def relative(path: Path, readme: Path) -> str:
    return Path(os.path.relpath(path, readme.parent)).as_posix()


def sources(results: list[tuple[Path, dict]], readme: Path) -> str:
    lines = []
    for path, data in results:
        env = data["environment"]
        png = path.with_suffix(".png")
        plot = f", plot [{png.name}]({relative(png, readme)})" if png.exists() else ""
        rel = relative(path, readme)
        lines.append(
            f"- [{path.name}]({rel}): {len(data['cases'])} cases on {common.device_label(env)}, torch {env['torch']}, "
            f"triton {env['triton']}, ksfx {env['ksfx']} ({env.get('git_commit') or '?'}), {env['date'][:10]}{plot}"
        )
    return "\n".join(lines) + "\n" if lines else "_No results yet._\n"


def replace_between(text: str, name: str, body: str) -> str:
    start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"{README.name} lacks the markers {start} … {end}")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{body}{end}{after}"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR, help="folder of result JSON files")
    p.add_argument("--readme", type=Path, default=README, help="markdown file whose marked tables are regenerated")
    p.add_argument("--plots", action="store_true", help="redraw every result's PNG too")
    args = p.parse_args(argv)
    results = load(args.results)
    if args.plots:
        from benchmarks import plots

        for path, data in results:
            plots.plot(data, path.with_suffix(".png"))
    text = args.readme.read_text()
    text = replace_between(text, "patterns", pattern_table(results))
    text = replace_between(text, "models", model_table(results))
    text = replace_between(text, "sources", sources(results, args.readme))
    args.readme.write_text(text)
    print(f"updated {args.readme} from {len(results)} result files")
    return text


if __name__ == "__main__":
    main()
