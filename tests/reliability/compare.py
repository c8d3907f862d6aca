"""Compiled vs eager: per-dtype tolerances, forward and gradients (input and parameters)."""

from __future__ import annotations

import torch

from ksfx.backend.compile import KsfxCompiler

TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.float16: {"rtol": 2e-2, "atol": 2e-2},
    torch.bfloat16: {"rtol": 8e-2, "atol": 8e-2},
}


def compile_ks(model, reports=None, inner="aot_eager", dynamic=None, cpu="op"):
    """A fresh compile: Dynamo's caches are keyed on ``forward``'s code, shared by every model."""
    torch._dynamo.reset()
    backend = KsfxCompiler(rewrite="always", inner=inner, reports=reports, cpu=cpu)
    return torch.compile(model, backend=backend, dynamic=dynamic)


def outputs_and_grads(model, x, probe):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * probe).sum(), [x, *params], allow_unused=True) if y.numel() else []
    return y, grads


def assert_same(model, compiled, x, generator=None):
    """Compiled output and gradients (input and every trainable parameter) equal eager's."""
    dtype = x.dtype
    generator = generator or torch.Generator().manual_seed(1)
    with torch.no_grad():
        shape = model(x).shape
    probe = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    expected, expected_grads = outputs_and_grads(model, x, probe)
    actual, actual_grads = outputs_and_grads(compiled, x, probe)
    torch.testing.assert_close(actual, expected, **TOL[dtype])
    assert len(actual_grads) == len(expected_grads)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got, want, **TOL[dtype])
