"""Shared checks for the pass tests: detection through ``explain``, numerics through compile.

The reference is always the eager model (the user's own code), never ksfx: compiled
outputs and gradients (input and every parameter) must match it.
"""

from __future__ import annotations

import torch

import ksfx

TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-10}}


def rewritten_patterns(model, *inputs, rewrite: str = "always", dynamic=False) -> list[list[tuple[int, int, int, int]]]:
    """Patterns (leftmost first) of the chains the backend rewrites, in graph order."""
    report = ksfx.explain(model, *inputs, rewrite=rewrite, dynamic=dynamic)
    return [list(chain.patterns) for chain in report.chains if chain.rewritten]


def compile_ks(model, dynamic=None, **options):
    torch._dynamo.reset()
    options = {"rewrite": "always", "inner": "aot_eager", "cpu": "op", **options}  # "op": launches are counted
    return torch.compile(model, backend=ksfx.backend(**options), dynamic=dynamic)


def _grads(model, x, y):
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, [x, *params])


def assert_compiled_matches_eager(model, x: torch.Tensor, compiled=None, min_launches: int = 1) -> None:
    """Forward and backward (input and parameter gradients) of the compiled model equal eager's,
    and the KS op really ran (at least ``min_launches`` forward launches)."""
    compiled = compiled if compiled is not None else compile_ks(model)
    tol = TOL[x.dtype]
    x_eager = x.detach().clone().requires_grad_()
    x_comp = x.detach().clone().requires_grad_()
    expected = model(x_eager)
    ksfx.stats(reset=True)
    actual = compiled(x_comp)
    launches = sum(v for k, v in ksfx.stats().items() if k.endswith(".forward"))
    assert launches >= min_launches, f"the KS op did not run (stats {ksfx.stats()})"
    torch.testing.assert_close(actual, expected, **tol)
    for got, want in zip(_grads(model, x_comp, actual), _grads(model, x_eager, expected), strict=True):
        torch.testing.assert_close(got, want, **tol)
