"""One chain's trouble stays with that chain: strided roots are re-checked on their real
layout, and an error while planning or checking one chain refuses only that chain."""

from __future__ import annotations

import pytest
import torch
from ksfx_checks import assert_compiled_matches_eager, rewritten_patterns
from torch import nn

import ksfx
import ksfx.passes.rewrite as rewrite_module
from examples.ks_models import BmmKSLinear, monarch_patterns


class TransposedInput(nn.Module):
    """A KS layer on ``x.transpose(1, 2).reshape(n, -1)``: the reshape is a ``view`` that is
    only valid because ``x`` itself is a transposed tensor (like an attention output)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.ks = BmmKSLinear(monarch_patterns(rows * cols, rows * cols, 4))

    def forward(self, x):
        return self.ks(x.transpose(1, 2).reshape(x.shape[0], -1))


def _transposed_input() -> torch.Tensor:
    return torch.randn(2, 6, 8).transpose(1, 2)  # shape (2, 8, 6), strides (48, 1, 8)


def test_strided_root_is_verified_on_its_real_layout():
    torch.manual_seed(0)
    model, x = TransposedInput(6, 8), _transposed_input()
    report = ksfx.explain(model, x, rewrite="always")
    assert not any(graph.note for graph in report.graphs), [graph.note for graph in report.graphs]
    assert [c.patterns for c in report.chains if c.rewritten] == [[(1, 12, 12, 4), (4, 12, 12, 1)]]
    assert report.chains[0].verification.startswith("reproduces")
    assert_compiled_matches_eager(model, x, min_launches=2)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = BmmKSLinear(monarch_patterns(16, 16, 4))
        self.second = BmmKSLinear(monarch_patterns(16, 16, 2))

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def _fail_on_first_layer(original):
    """``original`` (plan_chain or verify), raising for the chain that reads the model's input."""

    def wrapped(first, *args, **kwargs):
        if first.root.op == "placeholder":
            raise RuntimeError("injected failure")
        return original(first, *args, **kwargs)

    return wrapped


@pytest.mark.parametrize("stage", ["plan_chain", "verify"])
def test_failure_in_one_chain_refuses_only_that_chain(monkeypatch, stage):
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(3, 16)
    monkeypatch.setattr(rewrite_module, stage, _fail_on_first_layer(getattr(rewrite_module, stage)))
    report = ksfx.explain(model, x, rewrite="always")
    assert not any(graph.note for graph in report.graphs)
    assert [c.rewritten for c in report.chains] == [False, True]
    assert "RuntimeError: injected failure" in report.chains[0].reason
    assert report.chains[1].patterns == [(1, 8, 8, 2), (2, 8, 8, 1)]
    monkeypatch.undo()
    assert rewritten_patterns(model, x) == [[(1, 4, 4, 4), (4, 4, 4, 1)], [(1, 8, 8, 2), (2, 8, 8, 1)]]


class TransposedOutput(nn.Module):
    """The chain ends at a transpose; ``sin`` keeps that layout and the final ``view`` is
    only valid on it: the rewritten chain must return the traced strides, not its own."""

    def __init__(self) -> None:
        super().__init__()
        self.ks = BmmKSLinear(monarch_patterns(16, 16, 4))

    def forward(self, x):
        y = self.ks(x).view(-1, 4, 4).transpose(1, 2)
        return torch.sin(y).transpose(1, 2).reshape(-1, 16)


def test_chain_output_keeps_the_traced_layout():
    torch.manual_seed(0)
    model, x = TransposedOutput(), torch.randn(3, 16)
    report = ksfx.explain(model, x, rewrite="always")
    assert [(c.patterns, c.end.startswith("transpose")) for c in report.chains if c.rewritten] == [
        ([(1, 4, 4, 4), (4, 4, 4, 1)], True)
    ]
    assert_compiled_matches_eager(model, x, min_launches=2)
