"""The example models and the benchmark scripts in their smallest settings (no timing asserted)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks import cpu_grid, models, patterns, report
from examples import ks_models
from ksfx import Chain, KSPattern
from ksfx.passes import cost

GENERAL_CHAINS = [
    ((2, 3, 4, 5), (5, 8, 6, 1)),  # general (a, b, c, d) factors, widths 30 -> 40 -> 30
    ks_models.VIT_S16.qkv,
    ks_models.VIT_S16.mlp_down,
    ks_models.monarch_patterns(64, 256, 4),
]


def values_of(layer: ks_models.BmmKSLinear) -> list[torch.Tensor]:
    """The ``(a, b, c, d)`` values of each bmm weight ``(a*d, b, c)``."""
    return [
        w.detach().reshape(a, d, b, c).permute(0, 2, 3, 1)
        for (a, b, c, d), w in zip(layer.patterns, layer.weights, strict=True)
    ]


@pytest.mark.parametrize("patterns", GENERAL_CHAINS)
def test_bmm_ks_linear_matches_dense_chain(patterns):
    torch.manual_seed(0)
    layer = ks_models.BmmKSLinear(patterns).double()
    dense = Chain.of_factors(list(patterns)).to_dense(values_of(layer))
    torch.testing.assert_close(ks_models.dense_weight(layer), dense)
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias)


def test_paper_vit_chain_widths_and_bad_chains():
    cfg = ks_models.VIT_S16
    assert ks_models.chain_widths(cfg.qkv) == (384, 384)
    assert ks_models.chain_widths(cfg.mlp_up) == (384, 1536)
    assert ks_models.chain_widths(cfg.mlp_down) == (1536, 384)
    assert ks_models.chain_widths(ks_models.GPT2_MEDIUM.mlp_up) == (1024, 4096)
    # listed in application order, the Q/K/V factors make a different (96 -> 96) chain ...
    assert ks_models.chain_widths(cfg.qkv[::-1]) == (96, 96)
    # ... and the MLP up factors no chain at all
    with pytest.raises(ValueError, match="do not chain"):
        ks_models.chain_widths(cfg.mlp_up[::-1])
    with pytest.raises(ValueError, match="do not fit"):
        ks_models.ViTConfig(dim=192)


@pytest.mark.parametrize("pattern", [(1, 4, 6, 1), (2, 3, 4, 5), (3, 8, 2, 2)])
@pytest.mark.parametrize("batch_last", [False, True])
def test_baseline_formulations_match_dense(pattern, batch_last):
    torch.manual_seed(0)
    a, b, c, d = pattern
    values = torch.randn(pattern, dtype=torch.float64)
    dense = KSPattern(*pattern).to_dense(values)
    x = torch.randn((a * c * d, 7) if batch_last else (7, a * c * d), dtype=torch.float64)
    expected = dense @ x if batch_last else x @ dense.T
    w_bmm = values.permute(0, 3, 1, 2).reshape(a * d, b, c)
    torch.testing.assert_close(patterns.bmm_formulation(x, w_bmm, pattern, batch_last), expected)
    torch.testing.assert_close(patterns.einsum_formulation(x, values, pattern, batch_last), expected)


def test_pattern_sweep_writes_valid_json_and_resumes(tmp_path):
    out = tmp_path / "results" / "patterns.json"
    argv = ["--quick", "--limit", "2", "--batch", "32", "--baselines", "bmm,einsum,dense", "--device", "cpu"]
    argv += ["--cpu-min-time", "0.002", "--rounds", "1", "--out", str(out)]
    patterns.main(argv)
    data = json.loads(out.read_text())
    assert data["environment"]["float32_matmul_precision"] == "highest"
    assert len(data["cases"]) == 4  # 2 patterns x 2 layouts
    assert {c["layout"] for c in data["cases"]} == {"batch-first", "batch-last"}
    for case in data["cases"]:
        assert set(case["times"]) == {"ksfx", "bmm", "einsum", "dense"}
        assert all(t > 0 for t in case["times"].values())
        assert case["errors"]["ksfx"] <= 1e-5 and case["correct"]
        best = min(t for name, t in case["times"].items() if name != "ksfx")
        assert case["speedup"] == pytest.approx(best / case["times"]["ksfx"])
        a, b, c, d = case["pattern"]
        assert case["min_bytes"] == 4 * (32 * (a * c * d + a * b * d) + a * b * c * d)
    assert out.with_suffix(".png").stat().st_size > 0
    patterns.main(argv)  # everything is already there: nothing is measured again
    assert len(json.loads(out.read_text())["cases"]) == 4
    assert len(json.loads(out.read_text())["runs"]) == 2


def test_model_benchmark_and_report(tmp_path):
    results = tmp_path / "results"
    argv = ["--quick", "--model", "gpt2", "--batch", "1", "--contenders", "eager", "--train", "--device", "cpu"]
    argv += ["--cpu-min-time", "0.01", "--rounds", "1", "--out", str(results / "models.json")]
    models.main(argv)
    data = json.loads((results / "models.json").read_text())
    assert [c["mode"] for c in data["cases"]] == ["inference", "train"]
    for case in data["cases"]:
        assert case["times"]["eager"] > 0
        assert case["errors"]["eager"] == 0.0  # eager against itself, gradients included when training
        assert case["config"]["dim"] == ks_models.GPT2_SMALL.dim

    # a static census beside them holds reports, not timings: the report leaves it out
    (results / "fused_census.json").write_text(json.dumps({"triton": "3.6.0", "reports": []}))
    (results / "static_grid.json").write_text(json.dumps({"kind": "static_grid", "environment": {}, "reports": []}))
    readme = tmp_path / "README.md"
    shutil.copy(report.README, readme)
    text = report.main(["--results", str(results), "--readme", str(readme)])
    assert "fused_census.json" not in text and "static_grid.json" not in text
    models_table = text.split("<!-- report:models -->")[1].split("<!-- /report:models -->")[0]
    assert models_table.count("| gpt2 | quick | fp32 |") == 2
    assert "[models.json](results/models.json)" in text


@pytest.mark.slow
def test_cpu_grid_writes_json_with_the_spread(tmp_path):
    out = tmp_path / "grid.json"
    argv = ["--case", "monarch_256", "--rows", "17", "--thread-list", "1", "--mode", "inference"]
    cpu_grid.main([*argv, "--rounds", "2", "--cpu-min-time", "0.01", "--out", str(out), "--no-plot"])
    (case,) = json.loads(out.read_text())["cases"]
    assert case["key"] == "monarch_256/17/1/inference" and len(case["spread"]["ksfx"]) == 2
    assert case["errors"]["ksfx"] < 1e-5 and case["errors"]["inductor"] < 1e-5
    (chain,) = case["rewritten"]
    assert chain["patterns"] == [[1, 16, 16, 16], [16, 16, 16, 1]] and chain["rewritten"]


def test_cost_model_quotes_the_committed_cpu_grid():
    data = json.loads((report.README.parent.parent / cost.CPU_INLINE_SOURCE).read_text())
    assert cost.CPU_INLINE_MEASURED == cpu_grid.summary(data)


@pytest.mark.parametrize("n", [4, 16])
def test_mul_sum_butterfly_is_the_dense_butterfly(n):
    torch.manual_seed(0)
    layer = cpu_grid.MulSumButterfly(n)
    x = torch.randn(3, n, dtype=torch.float64)
    layer = layer.double()
    dense = torch.eye(n, dtype=torch.float64)
    for level in range(layer.log_n):  # factor `level` pairs i with i ^ stride, values twiddle[level, pair, out, in]
        stride, factor = 1 << level, torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            block, offset = divmod(i, 2 * stride)
            pair, side = block * stride + offset % stride, offset // stride
            for other in (0, 1):
                j = block * 2 * stride + other * stride + offset % stride
                factor[i, j] = layer.twiddle[level, pair, side, other]
        dense = factor @ dense
    torch.testing.assert_close(layer(x), x @ dense.T)
    assert cpu_grid.butterfly_patterns(n)[0] == (1, 2, 2, n // 2)


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    """Every step of the GPU suite on tiny shapes through the interpreter; the summary reads them."""
    from benchmarks import gpu_suite

    assert gpu_suite.main(["--dry-run", "--budget", "400", "--out-dir", str(tmp_path)]) == 0
    (state_path,) = tmp_path.glob("gpu_suite_cpu-dry-run_*.json")
    state = json.loads(state_path.read_text())
    assert set(state["steps"]) == {"tests", "patterns", "chains", "models", "launch", "tiles"}
    assert all(step["returncode"] == 0 for step in state["steps"].values())
    groups = state["patterns"]["groups"]
    assert set(groups) == {f"{dt} {lay}" for dt in ("fp32", "bf16") for lay in ("batch-first", "batch-last")}
    assert all(g["cases"] == 2 and g["out_of_tolerance"] == 0 and g["fell_back"] == 0 for g in groups.values())
    (patterns,) = tmp_path.glob("gpu_suite_patterns_*.json")  # the implementation each ksfx case ran
    assert all(
        case["ksfx_launches"] == {"triton-interpret.forward": 1} for case in json.loads(patterns.read_text())["cases"]
    )
    # every case once in a kernel family, with the policy's choice for it
    assert sum(row["cases"] for row in state["dispatch"]) == 8
    assert all(row["policy"] in ("triton", "torch") and row["median_speedup_vs_torch_path"] > 0
               for row in state["dispatch"])  # fmt: skip
    assert {row["mode"] for row in state["dispatch"]} <= {"dot", "dot3", "fma", "window"}
    assert [row["key"].split("|")[0] for row in state["models"]] == ["gpt2"]
    (launch,) = state["launch"]  # torch.compile(backend="ksfx", mode="reduce-overhead"), checked against eager
    assert set(launch["ms"]) == {"eager", "ksfx_cudagraphs"} and not launch["wrong"] and not launch["unavailable"]
    (tiled,) = state["tiles"]["cases"]  # the heuristic's tile and one other, both checked against bmm
    assert set(tiled["best_tile"]) >= {"block_m", "block_n"} and tiled["gain"] > 0 and not tiled["wrong_tiles"]
    chains = {row["key"].rsplit("|", 1)[0] for row in state["chains"]}
    assert chains == {f"{c}|{dt}|{lay}" for c in ("butterfly-16", "dot-pair") for dt in ("fp32", "bf16")
                      for lay in ("batch-first", "batch-last")}  # fmt: skip
    assert all(not row["failed"] and row["fused_bytes"] < row["per_factor_bytes"] for row in state["chains"])
    assert state["environment"]["dry_run"] and state["environment"]["fp32_precision"] == "highest"
    # resumes: finished steps are not run again
    assert gpu_suite.main(["--dry-run", "--budget", "400", "--out-dir", str(tmp_path)]) == 0
    assert json.loads(state_path.read_text())["steps"] == state["steps"]


def test_gpu_suite_summaries_leave_out_cases_that_fell_back(tmp_path):
    """A case whose kernel Triton could not build timed the op's torch path: it is counted
    apart, and neither the speedups nor the dispatch table take it as the kernel's."""
    from benchmarks import gpu_suite

    def case(ksfx_s, launches):
        return {"pattern": [4, 2, 2, 1], "dtype": "bf16", "layout": "batch-first", "correct": True,
                "times": {"ksfx": ksfx_s, "einsum": 2.0}, "speedup": 2.0 / ksfx_s, "ksfx_launches": launches,
                "min_bytes": 1, "flops": 1}  # fmt: skip

    path = tmp_path / "patterns.json"
    cases = [case(1.0, {"triton.forward": 1}), case(4.0, {"torch-cuda.fallback": 1, "torch-cuda.forward": 1})]
    path.write_text(json.dumps({"environment": {"device": "cpu"}, "cases": cases}))
    (group,) = gpu_suite.summarise_patterns(path)["groups"].values()
    assert group["cases"] == 1 and group["fell_back"] == 1 and group["median_speedup_vs_best"] == 2.0
    (row,) = gpu_suite.summarise_dispatch(path)
    assert row["cases"] == 1 and row["median_speedup_vs_torch_path"] == 2.0
    assert (row["mode"], row["policy"], row["agrees"]) == ("window", "triton", True)


def test_static_grid_rechecks_the_selected_cases_in_place(tmp_path):
    """A bogus failing report is replaced by a real sm_90 check; the other case, the
    grid's duplicate reports and the environment stay; the re-check is recorded."""
    import triton

    from benchmarks import static_grid

    def report(kind, pattern, problems):
        return {"kind": kind, "pattern": pattern, "step": f"KS{tuple(pattern)}", "mode": "fma", "dtype": "float32",
                "layout": "batch-last", "problems": problems}  # fmt: skip

    bogus = [report("forward", [4, 2, 2, 4], ["bogus"])] * 2  # listed twice in the grid
    other = report("forward", [2, 2, 2, 8], ["kept as it was"])
    path = tmp_path / "grid.json"
    environment = {"triton": triton.__version__, "date": "2026-01-01"}
    data = {"kind": "static_grid", "environment": environment, "patterns": 2, "backward": False,
            "summary": {}, "compile_aborts": [], "kernels": [*bogus, other]}  # fmt: skip
    path.write_text(json.dumps(data))
    assert static_grid.main(["--out", str(path), "--recheck", "--failing", "--pattern", "4,2,2,4", "--note", "t"]) == 0
    data = json.loads(path.read_text())
    fresh = [r for r in data["kernels"] if r["pattern"] == [4, 2, 2, 4]]
    assert len(fresh) == 2 and all(r["problems"] == [] and r["spills"] == 0 and r["registers"] > 0 for r in fresh)
    assert other in data["kernels"] and data["summary"]["kernels"] == 3 and data["summary"]["passing"] == 2
    (entry,) = data["environment"]["rechecks"]
    assert (
        entry["cases"] == 1 and entry["selection"] == {"failing": True, "pattern": "4,2,2,4"} and entry["note"] == "t"
    )
    assert data["environment"]["date"] == "2026-01-01"
    with pytest.raises(SystemExit, match="no case of the file matches"):
        static_grid.main(["--out", str(path), "--recheck", "--mode", "dot3"])
    data["environment"]["triton"] = "0.0"
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="written by triton 0.0"):
        static_grid.main(["--out", str(path), "--recheck", "--failing"])


def test_static_grid_files_dx_reports_under_their_case():
    """A dx kernel reports the transposed pattern; the re-check finds its case from it."""
    from benchmarks.static_grid import _case_of

    dx = {"kind": "dx", "pattern": [16, 256, 1869, 1], "dtype": "bfloat16", "layout": "batch-first"}
    assert _case_of(dx) == ((16, 1869, 256, 1), "bf16", "batch-first")
    assert _case_of({**dx, "kind": "grad"}) == ((16, 256, 1869, 1), "bf16", "batch-first")
