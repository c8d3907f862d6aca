"""Random KS models written the way users write them, built from a drawn description.

A :class:`ModelSpec` lists steps in application order: KS factors (each with the
formulation user code would use) and feature permutations (reshape/transpose shuffles,
or indexing with a constant index buffer). :class:`RandomKSModel` is plain PyTorch: it
never imports ksfx, so eager execution is an independent reference for the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

FORMULATIONS = ("bmm", "einsum", "masked", "matmul_left")


@dataclass(frozen=True)
class Factor:
    """KS factor ``(a, b, c, d)`` mapping ``a*c*d`` features to ``a*b*d``."""

    pattern: tuple[int, int, int, int]
    formulation: str
    bias: bool = False


@dataclass(frozen=True)
class Shuffle:
    """``x.reshape(radices).permute(order).reshape(width)`` over the features."""

    radices: tuple[int, ...]
    order: tuple[int, ...]


@dataclass(frozen=True)
class Gather:
    """``x[..., table]`` (batch-first) / ``x[table]`` (batch-last), table a constant buffer."""

    table: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    steps: tuple
    in_features: int
    batch_last: bool


def ks_support(a: int, b: int, c: int, d: int) -> torch.Tensor:
    """Dense ``(a*b*d, a*c*d)`` 0/1 mask of ``I_a ⊗ 1_{b×c} ⊗ I_d``, built with ``torch.kron``."""
    return torch.kron(torch.kron(torch.eye(a), torch.ones(b, c)), torch.eye(d))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@st.composite
def factors_from(draw, width: int, max_width: int):
    a = draw(st.sampled_from(_divisors(width)))
    d = draw(st.sampled_from(_divisors(width // a)))
    c = width // (a * d)
    b = draw(st.integers(1, max(1, min(5, max_width // (a * d)))))
    return Factor((a, b, c, d), draw(st.sampled_from(FORMULATIONS)), draw(st.integers(0, 4)) == 0)


@st.composite
def permutations_of(draw, width: int):
    if draw(st.booleans()):
        return Gather(tuple(draw(st.permutations(range(width)))))
    radices, rest = [], width
    while rest > 1 and len(radices) < 3:
        radix = draw(st.sampled_from(_divisors(rest)[1:]))
        radices.append(radix)
        rest //= radix
    if rest > 1:
        radices.append(rest)
    radices = radices or [width]
    return Shuffle(tuple(radices), tuple(draw(st.permutations(range(len(radices))))))


@st.composite
def model_specs(draw, max_width: int = 48, max_factors: int = 4, max_in: int = 24):
    """1 to ``max_factors`` KS factors, random permutations between and around them."""
    width = in_features = draw(st.integers(1, max_in))
    steps = []
    for _ in range(draw(st.integers(1, max_factors))):
        if draw(st.integers(0, 2)) == 0:
            steps.append(draw(permutations_of(width)))
        factor = draw(factors_from(width, max_width))
        steps.append(factor)
        a, b, _, d = factor.pattern
        width = a * b * d
    if draw(st.integers(0, 3)) == 0:
        steps.append(draw(permutations_of(width)))
    return ModelSpec(tuple(steps), in_features, draw(st.booleans()))


class RandomKSModel(nn.Module):
    """The model a :class:`ModelSpec` describes; ``x`` is ``(*lead, in)`` or ``(in, n)`` (batch-last)."""

    def __init__(self, spec: ModelSpec, generator: torch.Generator, dtype=torch.float32) -> None:
        super().__init__()
        self.spec = spec
        self.names: list[str] = []
        for k, step in enumerate(spec.steps):
            name = f"step{k}"
            self.names.append(name)
            if isinstance(step, Gather):
                self.register_buffer(f"{name}_table", torch.tensor(step.table, dtype=torch.long))
            if not isinstance(step, Factor):
                continue
            a, b, c, d = step.pattern
            scale = 1.0 / math.sqrt(c)
            if step.formulation == "bmm":
                shape = (a * d, b, c)
            elif step.formulation == "einsum":
                shape = (a, b, c, d)
            else:
                shape = (a * b * d, a * c * d)
                self.register_buffer(f"{name}_mask", ks_support(a, b, c, d).to(dtype))
            weight = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
            self.register_parameter(f"{name}_w", nn.Parameter(weight.to(dtype)))
            if step.bias:
                bias = torch.randn(a * b * d, generator=generator, dtype=torch.float64)
                self.register_parameter(f"{name}_b", nn.Parameter(bias.to(dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_last = self.spec.batch_last
        lead = x.shape[1:] if batch_last else x.shape[:-1]
        n = math.prod(lead)
        for name, step in zip(self.names, self.spec.steps, strict=True):
            if isinstance(step, Gather):
                table = getattr(self, f"{name}_table")
                x = x[table] if batch_last else x[..., table]
            elif isinstance(step, Shuffle):
                x = _shuffle(x, step, n, lead, batch_last)
            else:
                x = _factor(self, name, x, step, n, lead, batch_last)
        return x


def _shuffle(x, step: Shuffle, n: int, lead, batch_last: bool) -> torch.Tensor:
    width = math.prod(step.radices)
    k = len(step.radices)
    if batch_last:
        x = x.reshape(*step.radices, n).permute(*step.order, k)
        return x.reshape(width, *lead)
    x = x.reshape(n, *step.radices).permute(0, *(o + 1 for o in step.order))
    return x.reshape(*lead, width)


def _factor(module, name: str, x, step: Factor, n: int, lead, batch_last: bool) -> torch.Tensor:
    a, b, c, d = step.pattern
    w = getattr(module, f"{name}_w")
    bias = getattr(module, f"{name}_b", None)
    out = a * b * d
    if step.formulation == "bmm":  # ksmm's (a*d, b, c) blocks
        if batch_last:
            h = x.reshape(a, c, d, n).transpose(1, 2).reshape(a * d, c, n)
            y = torch.bmm(w, h).reshape(a, d, b, n).transpose(1, 2).reshape(out, n)
        else:
            h = x.reshape(n, a, c, d).permute(1, 3, 0, 2).reshape(a * d, n, c)
            y = torch.bmm(h, w.transpose(1, 2)).reshape(a, d, n, b).permute(2, 0, 3, 1).reshape(n, out)
    elif step.formulation == "einsum":
        if batch_last:
            y = torch.einsum("acdn,abcd->abdn", x.reshape(a, c, d, n), w).reshape(out, n)
        else:
            y = torch.einsum("nacd,abcd->nabd", x.reshape(n, a, c, d), w).reshape(n, out)
    else:
        mask = getattr(module, f"{name}_mask")
        dense = w * mask
        x2d = x.reshape(a * c * d, n) if batch_last else x.reshape(n, a * c * d)
        if step.formulation == "masked":
            y = F.linear(x2d.T, dense).T if batch_last else F.linear(x2d, dense)
        else:  # W on the left, as batch-last code writes it
            y = dense @ x2d if batch_last else (dense @ x2d.T).T
    if bias is not None:
        y = y + (bias[:, None] if batch_last else bias)
    return y.reshape(out, *lead) if batch_last else y.reshape(*lead, out)
