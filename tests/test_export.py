"""``ksfx.export``: exported programs with the chains rewritten, and AOTInductor packages of them.

The model is plain PyTorch written as public Monarch code writes it (reshape / transpose /
bmm, ``tests/realworld/layers.py``) followed by a masked dense layer; eager execution of
that model is the reference. One AOTInductor package is built for the whole module (CPU
compile takes tens of seconds) and loaded in fresh processes.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ksfx
from tests.realworld.layers import MaskedLinear, MonarchLinear, ks_mask

ROOT = Path(__file__).resolve().parents[1]
KS_CHAIN = torch.ops.ksfx.ks_chain.default
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2)}
FEATURES = 16


class MonarchMLP(nn.Module):
    """Monarch up-projection (two bmm's), GELU, then a block-diagonal masked down-projection."""

    def __init__(self):
        super().__init__()
        self.up = MonarchLinear(FEATURES, 2 * FEATURES, 4)
        self.down = MaskedLinear(ks_mask(2, FEATURES // 2, FEATURES, 1))

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


def _model(dtype=torch.float32) -> MonarchMLP:
    torch.manual_seed(0)
    return MonarchMLP().to(dtype)


def _dynamic():
    """Batch and token counts both symbolic: the rewrite reads them from the input at run time."""
    return ({0: torch.export.Dim("batch", min=2, max=64), 1: torch.export.Dim("tokens", min=2, max=64)},)


def _ops(ep) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def _assert_matches_eager(ep, model, dtype, shapes) -> None:
    rtol, atol = TOLERANCES[dtype]
    for shape in shapes:
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_always_puts_every_chain_in_the_op_and_matches_eager(dtype):
    model = _model(dtype)
    ep = ksfx.export(model, (torch.randn(3, 5, FEATURES, dtype=dtype),), dynamic_shapes=_dynamic(), rewrite="always")
    ops = _ops(ep)
    assert ops.count(KS_CHAIN) == 2
    assert not {torch.ops.aten.bmm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default} & set(ops)
    _assert_matches_eager(ep, model, dtype, [(3, 5, FEATURES), (7, 2, FEATURES), (2, 9, FEATURES)])


@pytest.mark.parametrize(
    ("mode", "rewritten", "reason"),
    [
        ("never", 0, "rewrite='never'"),
        # on CPU the cost model leaves bmm chains to Inductor and takes the masked dense product
        ("auto", 1, "auto: the original computes 2.0x the chain's FLOPs"),
    ],
)
def test_modes_and_report(mode, rewritten, reason):
    model = _model()
    report = ksfx.Report()
    ep = ksfx.export(model, (torch.randn(3, 5, FEATURES),), dynamic_shapes=_dynamic(), rewrite=mode, report=report)
    assert _ops(ep).count(KS_CHAIN) == rewritten
    assert len(report.chains) == 2 and sum(c.rewritten for c in report.chains) == rewritten
    assert any(c.reason.startswith(reason) for c in report.chains)
    text = str(report)
    assert f"2 chain(s), {rewritten} rewritten" in text and "torch.export captures the whole model" in text
    assert ("torch.ops.ksfx.ks_chain.default" in text) == bool(rewritten)
    _assert_matches_eager(ep, model, torch.float32, [(4, 3, FEATURES)])


def test_changed_mask_raises_in_the_program_and_a_shrunk_one_is_read():
    model = _model()
    ep = ksfx.export(model, (torch.randn(3, 5, FEATURES),), rewrite="always")
    assert torch.ops.aten._assert_async.msg in _ops(ep)
    x = torch.randn(3, 5, FEATURES)
    program = ep.module()
    shrunk = model.down.mask.clone()
    shrunk[0, :4] = 0  # inside the support: values are read at run time, the rewrite stays valid
    program.down.mask, model.down.mask = shrunk.clone(), shrunk.clone()
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5)
    grown = shrunk.clone()
    grown[0, -1] = 1.0  # outside the block-diagonal support the exported chain assumes
    program.down.mask = grown
    with pytest.raises(RuntimeError, match="ksfx: down.mask has a nonzero outside the support"):
        program(x)


def test_a_failing_pass_returns_the_plain_export_and_says_why(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(importlib.import_module("ksfx.backend.export"), "run_pass", broken)
    model, report = _model(), ksfx.Report()
    ep = ksfx.export(model, (torch.randn(3, 5, FEATURES),), rewrite="always", report=report)
    assert KS_CHAIN not in _ops(ep) and torch.ops.aten.bmm.default in _ops(ep)
    assert "pass failed" in report.graphs[0].note and "planted bug" in report.graphs[0].note
    assert "planted bug" in caplog.text
    _assert_matches_eager(ep, model, torch.float32, [(3, 5, FEATURES)])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, x: ksfx.export(lambda t: t, (x,)), TypeError, "model must be a torch.nn.Module"),
        (lambda m, x: ksfx.export(m, x), TypeError, "args must be a tuple"),
        (lambda m, x: ksfx.export(m, (x,), [x]), TypeError, "kwargs must be a dict or None"),
        (lambda m, x: ksfx.export(m, (x,), rewrite="sometimes"), ValueError, "rewrite must be one of"),
        (lambda m, x: ksfx.export(m, (x,), report=[]), TypeError, "report must be a ksfx.backend.Report"),
    ],
    ids=["model", "args", "kwargs", "rewrite", "report"],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(_model(), torch.randn(3, FEATURES))


# ----------------------------------------------------------------------------- AOTInductor
LOADER = textwrap.dedent(
    """
    import sys
    import torch

    package, data, root = sys.argv[1:]
    try:
        torch._inductor.aoti_load_package(package)
    except RuntimeError as err:
        assert "Could not find schema for ksfx::ks_chain" in str(err), err
    else:
        raise AssertionError("the package loaded before ksfx registered its op")
    import ksfx  # registers ksfx::ks_chain, which the package calls through its proxy executor

    assert ksfx.__file__.startswith(root), ksfx.__file__
    runner = torch._inductor.aoti_load_package(package)
    data = torch.load(data)
    for x, expected in data["cases"]:
        torch.testing.assert_close(runner(x), expected, rtol=1e-5, atol=1e-5)
    calls = ksfx.stats().get("cpu.forward", 0)
    assert calls >= 2 * len(data["cases"]), ksfx.stats()  # the op ran, in this process
    runner.load_constants({"down.mask": data["grown_mask"]}, check_full_update=False)
    try:
        runner(data["cases"][0][0])
    except RuntimeError as err:
        assert "down.mask has a nonzero outside the support" in str(err), err
    else:
        raise AssertionError("a grown mask ran without error")
    print("OK", calls)
    """
)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """One AOTInductor package of the rewritten program, plus inputs at other batch sizes."""
    directory = tmp_path_factory.mktemp("aoti")
    model = _model()
    ep = ksfx.export(model, (torch.randn(3, 5, FEATURES),), dynamic_shapes=_dynamic(), rewrite="always")
    assert _ops(ep).count(KS_CHAIN) == 2
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(directory / "monarch_mlp.pt2"))
    torch.manual_seed(1)
    with torch.no_grad():
        cases = [(x, model(x)) for x in (torch.randn(6, 4, FEATURES), torch.randn(2, 11, FEATURES))]
    grown = model.down.mask.clone()
    grown[0, -1] = 1.0
    torch.save({"cases": cases, "grown_mask": grown}, directory / "data.pt")
    (directory / "load.py").write_text(LOADER)
    return directory, Path(path)


def test_aoti_package_needs_import_ksfx_in_a_fresh_process_then_equals_eager(package):
    """Loading fails until ``import ksfx``; then other batch and token counts equal eager and
    a mask swapped into the package's constants that breaks the support raises."""
    directory, path = package
    result = subprocess.run(
        [sys.executable, "load.py", str(path), "data.pt", str(ROOT)],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's ksfx, not an installed one
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")
