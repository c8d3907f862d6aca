"""Symbolic feature widths under ``dynamic=True``: specialise the ones a chain needs.

With ``torch.compile(..., dynamic=True)`` every size is symbolic, the feature widths of
the inputs included. A KS chain is only defined for the widths its weights fix (a
Monarch layer that reshapes ``x`` to ``(-1, m, m)`` computes something else, or fails,
at another width), so the digit analysis cannot split a symbolic width and refuses.

The widths a chain needs are found on a static copy of the graph, traced at the sizes of
this call (the hints): every chain found there says which dimensions of its root hold
feature digits. Those dimensions of the symbolic graph are specialised with
``guard_int``, which records the guard in Dynamo's shape environment, so the compiled
graph is reused only at these widths (another width recompiles). Batch sizes stay
symbolic. The two traces are matched node for node by their tensor-valued ops; when they
differ nothing is specialised.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import guard_int, is_concrete_int

try:  # the size at this call, without a guard: torch >= 2.12 renamed it
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as hint_int
except ImportError:
    from torch.fx.experimental.symbolic_shapes import hint_int

from ksfx.passes import chain_roots, drop_dead_code

log = logging.getLogger("ksfx.passes")


def _static_example(value, mode: FakeTensorMode):
    """``value`` at its hinted sizes, in a fake mode that knows no symbols."""
    if isinstance(value, torch.SymInt):
        return hint_int(value)
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(value, FakeTensor):
        sizes = [hint_int(s) for s in value.shape]
        strides = [hint_int(s) for s in value.stride()]
        with mode:
            return torch.empty_strided(sizes, strides, dtype=value.dtype, device=value.device)
    return mode.from_tensor(value)


def _trace_static(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [_static_example(x, mode) for x in example_inputs]
    with mode:
        return make_fx(gm, tracing_mode="real")(*inputs)


def _tensor_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]


def specialise_widths(
    gm: fx.GraphModule, example_inputs, aten_gm: fx.GraphModule, weights: list[int], known: dict[int, torch.Tensor]
) -> list[str]:
    """Guard the symbolic sizes that are feature widths of some chain of ``aten_gm``.

    ``gm`` is Dynamo's graph, ``aten_gm`` its symbolic aten trace; ``weights`` and
    ``known`` index placeholders. Returns the specialisations, e.g. ``["s27 = 16"]``;
    when it is not empty the caller traces ``gm`` again to get static widths.
    """
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    tensors = [n.meta["val"] for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    if all(is_concrete_int(s) for t in tensors for s in t.shape):
        return []
    try:
        static = _trace_static(gm, example_inputs)
    except Exception as err:  # noqa: BLE001 - no static trace: keep every size symbolic
        log.debug("ksfx: no static trace to find feature widths (%s: %s)", type(err).__name__, err)
        return []
    static_inputs = [n for n in static.graph.nodes if n.op == "placeholder"]
    roots = chain_roots(static, {static_inputs[k] for k in weights}, {static_inputs[k]: v for k, v in known.items()})
    if not roots:
        return []
    drop_dead_code(aten_gm)  # as chain_roots did to the static trace; the pass does it anyway
    ours, theirs = _tensor_nodes(static), _tensor_nodes(aten_gm)
    if [n.target for n in ours] != [n.target for n in theirs]:
        log.debug("ksfx: static and symbolic traces differ; feature widths stay symbolic")
        return []
    twin = dict(zip(ours, theirs, strict=True))
    done = []
    for root, dims in roots:
        shape = twin[root].meta["val"].shape
        for k in dims:
            size = shape[k]
            if not is_concrete_int(size):
                expr = str(size)
                done.append(f"{expr} = {guard_int(size)}")
    return sorted(set(done))
