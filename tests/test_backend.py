"""The backend as users reach it: ``backend="ksfx"`` without import, Inductor, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ksfx
from ksfx.backend import compile as compile_module

ROOT = Path(__file__).resolve().parents[1]

MONARCH_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Monarch(nn.Module):
        def __init__(self, m=4):
            super().__init__()
            self.m = m
            self.w1 = nn.Parameter(torch.randn(m, m, m) / m ** 0.5)
            self.w2 = nn.Parameter(torch.randn(m, m, m) / m ** 0.5)

        def forward(self, x):
            m, lead = self.m, x.shape[:-1]
            h = torch.bmm(x.reshape(-1, m, m).transpose(0, 1), self.w1.transpose(-1, -2))
            h = h.transpose(0, 1).reshape(-1, m, m).permute(2, 0, 1)
            return torch.bmm(h, self.w2.transpose(-1, -2)).permute(1, 2, 0).reshape(*lead, m * m)

    def factory():
        torch.manual_seed(0)
        return Monarch(), torch.randn(3, 16)
    """
)


def _run(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args] if args else [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_backend_string_works_without_importing_ksfx(tmp_path):
    (tmp_path / "user_model.py").write_text(MONARCH_SOURCE)
    code = textwrap.dedent(
        """
        import sys, torch
        from user_model import factory
        model, x = factory()
        torch._inductor.config.fx_graph_cache = False
        y = torch.compile(model, backend="ksfx")(x)
        assert "ksfx" in sys.modules, "the entry point did not load ksfx"
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
        print("OK", sorted(torch._dynamo.list_backends(exclude_tags=())).count("ksfx"))
        """
    )
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 1" in result.stdout


def test_cli_inspect_prints_report(tmp_path):
    (tmp_path / "user_model.py").write_text(MONARCH_SOURCE)
    result = _run("", tmp_path, "-m", "ksfx", "inspect", "user_model:factory", "--rewrite", "always")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "1 chain(s), 1 rewritten" in out and "(1, 4, 4, 4), (4, 4, 4, 1)" in out
    assert "torch.ops.ksfx.ks_chain.default" in out  # the rewritten graph is printed


class MaskedMonarchBlock(nn.Module):
    """LayerNorm → KS layer (bmm) → GELU → masked dense KS layer: work for Inductor around the op."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.w1, self.w2 = nn.Parameter(torch.randn(4, 4, 4) / 2), nn.Parameter(torch.randn(4, 4, 4) / 2)
        self.out = nn.Linear(16, 16)
        self.register_buffer("mask", ksfx.KSPattern(2, 8, 8, 1).support().float())

    def forward(self, x):
        h = self.norm(x)
        h = torch.bmm(h.reshape(-1, 4, 4).transpose(0, 1), self.w1).transpose(0, 1).reshape(x.shape)
        h = torch.nn.functional.gelu(h)
        return nn.functional.linear(h, self.out.weight * self.mask, self.out.bias)


@pytest.mark.parametrize("cpu", ["aten", "op"])
def test_inductor_forward_backward_matches_eager(cpu):
    torch.manual_seed(0)
    model, x = MaskedMonarchBlock(), torch.randn(2, 5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ksfx.backend(rewrite="always", cpu=cpu))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ksfx.stats(reset=True)
    ya, yb = compiled(xa), model(xb)
    assert ksfx.stats().get("cpu.forward", 0) == (2 if cpu == "op" else 0)  # "aten": inlined, no op call
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


def test_bad_options():
    with pytest.raises(ValueError, match="rewrite must be one of"):
        ksfx.backend(rewrite="sometimes")
    with pytest.raises(ValueError, match="inner must be one of"):
        ksfx.backend(inner="tvm")
    with pytest.raises(ValueError, match="cuda must be one of"):
        ksfx.backend(cuda="cutlass")


def test_torch_compile_mode_and_options_configure_the_inner_inductor(monkeypatch):
    """``torch.compile(model, backend="ksfx", mode="reduce-overhead")`` reaches Inductor as
    its own configuration (CUDA graphs), on rewritten graphs and on the others alike."""
    patches = []

    def inductor(gm, example_inputs, config_patches=None):
        patches.append(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_module, "_inner_compiler", lambda inner: inductor)
    torch.manual_seed(0)
    model, x = MaskedMonarchBlock(), torch.randn(2, 5, 16)
    torch._dynamo.reset()
    y = torch.compile(model, backend="ksfx", mode="reduce-overhead")(x)
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    torch.compile(nn.Linear(4, 4), backend="ksfx", options={"max_autotune": True})(torch.randn(2, 4))
    assert patches == [{"triton.cudagraphs": True}, {"max_autotune": True}]
    with pytest.raises(ValueError, match="configure Inductor, but this ksfx backend's inner compiler is 'eager'"):
        ksfx.backend(inner="eager")(torch.fx.symbolic_trace(nn.Linear(4, 4)), [torch.randn(2, 4)], mode="max-autotune")


def test_rewritten_chain_runs_the_triton_kernels_under_the_interpreter(triton_interpret):
    torch.manual_seed(0)
    model = MaskedMonarchBlock()
    x = torch.randn(2, 3, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=ksfx.backend(rewrite="always", inner="aot_eager"))
    ksfx.stats(reset=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert ksfx.stats().get("triton-interpret.forward", 0) >= 2
