"""Errors that help: ksfx's messages name the pattern and the sizes; the pass logs every decision."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ksfx
from ksfx import Chain, KSPattern
from ksfx.config import config
from tests.reliability.compare import compile_ks
from tests.reliability.models import Factor, ModelSpec, RandomKSModel

ROOT = Path(__file__).resolve().parents[2]
W = torch.randn(2, 3, 4, 2)  # KS(2, 3, 4, 2): 16 -> 12
SPEC = Chain((KSPattern(2, 3, 4, 2),)).to_spec()

CASES = [
    pytest.param(
        lambda: ksfx.ks_matmul(torch.randn(3, 10), [W]),
        ValueError,
        ["(3, 10)", "10 features", "16", "KS(2, 3, 4, 2)"],
        id="width-batch-first",
    ),
    pytest.param(
        lambda: ksfx.ks_matmul(torch.randn(10, 3), [W], batch_last=True),
        ValueError,
        ["10 features", "16", "KS(2, 3, 4, 2)", "batch-last"],
        id="width-batch-last",
    ),
    pytest.param(
        lambda: ksfx.ks_matmul(torch.randn(3, 16), [W, torch.randn(2, 2, 2, 2)]),
        ValueError,
        ["factors 0 and 1", "KS(2, 3, 4, 2)", "KS(2, 2, 2, 2)", "16", "8"],
        id="factors-do-not-chain",
    ),
    pytest.param(
        lambda: ksfx.ks_matmul(torch.randn(3, 16), [W.double()]),
        TypeError,
        ["factor 0", "KS(2, 3, 4, 2)", "torch.float64", "torch.float32"],
        id="factor-dtype",
    ),
    pytest.param(
        lambda: ksfx.ks_matmul(torch.randn(3, 16), [torch.randn(2, 3, 4)]),
        ValueError,
        ["factor 0", "4 dims", "(2, 3, 4)"],
        id="factor-ndim",
    ),
    pytest.param(
        lambda: ksfx.ks_matmul(torch.randn(3, 16), [W], bias=torch.randn(5)),
        ValueError,
        ["bias", "(12,)", "(5,)", "KS(2, 3, 4, 2)"],
        id="bias-shape",
    ),
    pytest.param(
        lambda: torch.ops.ksfx.ks_chain(torch.randn(3, 16), [W.double()], SPEC, False, None, 0),
        TypeError,
        ["factor 0", "KS(2, 3, 4, 2)", "torch.float64", "torch.float32"],
        id="op-dtype",
    ),
    pytest.param(
        lambda: torch.ops.ksfx.ks_chain(torch.randn(3, 16), [torch.randn(2, 3, 5, 2)], SPEC, False, None, 0),
        ValueError,
        ["factor 0", "KS(2, 3, 4, 2)", "(2, 3, 4, 2)", "(2, 3, 5, 2)"],
        id="op-values-shape",
    ),
    pytest.param(
        lambda: torch.ops.ksfx.ks_chain(torch.randn(3, 12), [W], SPEC, False, None, 0),
        ValueError,
        ["12 features", "KS(2, 3, 4, 2)", "16"],
        id="op-width",
    ),
]


@pytest.mark.parametrize(("call", "error", "needles"), CASES)
def test_error_messages_name_pattern_and_sizes(call, error, needles):
    with pytest.raises(error) as info:
        call()
    missing = [needle for needle in needles if needle not in str(info.value)]
    assert not missing, f"{missing} not in: {info.value}"


def test_error_under_compile_keeps_the_message():
    compiled = torch.compile(lambda x: ksfx.ks_matmul(x, [W]), backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"has 10 features; the chain KS\(2, 3, 4, 2\) takes 16"):
        compiled(torch.randn(3, 10))


# ----------------------------------------------------------------------------- pass decisions logged
def rewritten_and_refused() -> torch.nn.Module:
    """A KS layer (rewritten), a ReLU, then a dense layer (kept: no Kronecker structure)."""
    generator = torch.Generator().manual_seed(0)
    return torch.nn.Sequential(
        RandomKSModel(ModelSpec((Factor((2, 3, 4, 2), "einsum"),), 16, False), generator),
        torch.nn.ReLU(),
        RandomKSModel(ModelSpec((Factor((1, 5, 12, 1), "bmm"),), 12, False), generator),
    )


def test_pass_decisions_at_debug_level(caplog):
    model = rewritten_and_refused()
    with caplog.at_level(logging.DEBUG, logger="ksfx.passes"):
        compile_ks(model)(torch.randn(3, 16))
    messages = [r.getMessage() for r in caplog.records if r.name == "ksfx.passes"]
    rewritten = [m for m in messages if "REWRITTEN" in m]
    kept = [m for m in messages if "kept" in m or "not rewritten" in m]
    assert rewritten and "KS(2, 3, 4, 2)" in rewritten[0] and "rewrite='always'" in rewritten[0], messages
    assert kept and "dense matrix product" in " ".join(kept), messages


def test_debug_config_logs_decisions_without_logging_setup(caplog, monkeypatch):
    """``KSFX_DEBUG=1`` (read into ``config.debug``) raises the decisions to WARNING: visible by default."""
    monkeypatch.setattr(config, "debug", True)
    model = rewritten_and_refused()
    with caplog.at_level(logging.WARNING, logger="ksfx.passes"):
        compile_ks(model)(torch.randn(3, 16))
    assert any("REWRITTEN" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)


def test_ksfx_debug_environment_variable(tmp_path):
    code = textwrap.dedent(
        """
        import torch, ksfx
        w = torch.nn.Parameter(torch.randn(2, 3, 4, 2))
        def f(x):
            return torch.einsum("nacd,abcd->nabd", x.reshape(-1, 2, 4, 2), w).reshape(-1, 12)
        y = torch.compile(f, backend=ksfx.backend(rewrite="always", inner="eager"))(torch.randn(3, 16))
        """
    )
    env = {"KSFX_DEBUG": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REWRITTEN" in result.stderr and "KS(2, 3, 4, 2)" in result.stderr, result.stderr[-3000:]
