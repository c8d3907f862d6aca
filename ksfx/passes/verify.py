"""Numerical check of a planned chain against the region it replaces.

The region (every node between the root and the chain end) is evaluated in float64, on
the model's device so that GPU models check real batch sizes quickly, with a random
root, random values for the learnable weights and the real values of the tensors that
shaped supports (masks, index tables, frozen weights). Random tensors get the strides
the trace recorded: the region's ``view`` ops are only valid on the real layout (an
attention output is a transposed view of its storage, for instance). The planned chain, with its
values gathered from the same tensors, must reproduce it. A plan that fails is never
rewritten: this catches any gap between the index algebra and the real ops.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ksfx.passes.structure import ChainPlan, ValueSource

#: Multiply-adds a re-evaluation may cost, per device type (float64); larger regions are skipped.
MAX_VERIFY_FLOPS = {"cpu": 1 << 28, "cuda": 1 << 38}
MAX_VERIFY_ELEMENTS = 1 << 26


class _Skip(Exception):
    pass


def _hint(value) -> int:
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    return int(value)


def _concrete_shape(val) -> list[int]:
    return [_hint(s) for s in val.shape]


def _random_like(val, generator: torch.Generator, device) -> torch.Tensor:
    """Random float64 tensor with ``val``'s shape and strides (storage offset dropped).

    Built as a strided view of a random storage, so overlapping or broadcast layouts
    (stride 0) alias exactly as the real tensor does.
    """
    shape = _concrete_shape(val)
    strides = [_hint(s) for s in val.stride()]
    if 0 in shape:
        return torch.empty(shape, dtype=torch.float64, device=device)
    storage = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
    flat = torch.randn(storage, generator=generator, dtype=torch.float64).to(device)
    return flat.as_strided(shape, strides)


def verify(plan: ChainPlan, learnable: set[fx.Node], known: dict[fx.Node, torch.Tensor], gm) -> tuple[str, str]:
    """``(status, message)``: status is ``"verified"``, ``"skipped"`` (too large) or ``"failed"``."""
    root_val = plan.root.meta["val"]
    root_shape = _concrete_shape(root_val)
    end_shape = _concrete_shape(plan.end.meta["val"])
    device = root_val.device
    rows = math.prod(root_shape) // max(plan.chain.in_features, 1)
    budget = MAX_VERIFY_FLOPS.get(device.type, MAX_VERIFY_FLOPS["cpu"])
    largest = max(math.prod(root_shape), math.prod(end_shape), plan.chain.in_features * plan.chain.out_features)
    if rows * plan.source_flops > budget or largest > MAX_VERIFY_ELEMENTS:  # the check materialises W densely
        return "skipped", "region too large to re-evaluate; structure from the index algebra only"
    generator = torch.Generator().manual_seed(0)

    def real(tensor):
        tensor = tensor.detach().to(device)
        return tensor.to(torch.float64) if tensor.is_floating_point() else tensor

    env: dict[fx.Node, object] = {plan.root: _random_like(root_val, generator, device)}

    def value(node):
        if not isinstance(node, fx.Node):
            return node
        if node in env:
            return env[node]
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.SymInt | int):
                out = _hint(val)
            elif node in known:
                out = real(known[node])
            elif node in learnable:
                out = _random_like(val, generator, device)
            else:
                raise _Skip(f"the region reads the activation {node.name}")
        elif node.op == "get_attr":
            out = real(getattr(gm, node.target))
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, value)
            kwargs = dict(fx.node.map_arg(node.kwargs, value))
            if "device" in kwargs:
                kwargs["device"] = device
            if "dtype" in kwargs and isinstance(kwargs["dtype"], torch.dtype) and kwargs["dtype"].is_floating_point:
                kwargs["dtype"] = torch.float64
            target = node.target
            if target is torch.ops.aten._to_copy.default:
                out = args[0].clone()
            else:
                out = target(*args, **kwargs)
        else:
            raise _Skip(f"cannot evaluate {node.op}")
        env[node] = out
        return out

    try:
        with torch.no_grad():
            expected = value(plan.end)
            values = [_values(v, value) for v in plan.values]
            bias = _gather(value(plan.bias.source), plan.bias) if plan.bias is not None else None
    except _Skip as skip:
        return "skipped", f"not re-evaluated ({skip})"
    dense = plan.chain.to_dense(values) if plan.chain.patterns else None
    x = env[plan.root] if plan.root_order is None else env[plan.root].permute(plan.root_order)
    fin = plan.chain.in_features
    if plan.inner_dims:  # (outer, in, inner): the features in the middle
        inner = math.prod(root_shape[len(root_shape) - plan.inner_dims :])
        y = torch.einsum("of,bfi->boi", dense, x.reshape(-1, fin, inner))
        y = y + bias[:, None] if bias is not None else y
    elif plan.batch_last:
        y = dense @ x.reshape(fin, -1)
        y = y + bias[:, None] if bias is not None else y
    else:
        y = x.reshape(-1, fin) @ dense.T
        y = y + bias if bias is not None else y
    y = y.reshape(expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not torch.allclose(y, expected, rtol=1e-9, atol=1e-9 * max(scale, 1.0)):
        err = float((y - expected).abs().max())
        return "failed", f"the planned chain does not reproduce the original ops (max error {err:.3g})"
    return "verified", "reproduces the original ops on random weights"


def _gather(source: torch.Tensor, spec: ValueSource) -> torch.Tensor:
    flat = torch.cat([source.new_zeros(1), source.reshape(-1)])
    return flat[spec.ids.to(source.device)]


def _values(spec: ValueSource, value) -> torch.Tensor:
    """The factor's values: one gather per term (``value`` evaluates a source node)."""
    return sum(_gather(value(term.source), term) for term in spec.terms())
