"""Time each chain's choices before Inductor traces the graph.

Inductor traces a ``ksfx::ks_chain_triton`` call with fake tensors and launches the
kernels the trace records: nothing can be timed there, so a fused segment would run one
launch per step and a step as the dispatch policy says (:mod:`ksfx.ops.race`). Before
handing the graph over, the backend runs each chain once, forward and (with grad mode on)
backward, on random CUDA tensors of the traced shapes: that times every choice, and the
trace then finds each decision.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ksfx.ops import race
from ksfx.ops.chain_op import run_backward, run_forward
from ksfx.ops.stats import paused
from ksfx.passes import LAUNCHED_BY_INDUCTOR
from ksfx.pattern import Chain

log = logging.getLogger("ksfx.passes")

_CHAIN_OPS = set(LAUNCHED_BY_INDUCTOR) | set(LAUNCHED_BY_INDUCTOR.values())


def _input_meta(node) -> tuple[torch.Tensor | None, torch.dtype | None]:
    """The traced value nearest above a chain's input (the rewrite's reshapes and casts have
    none) and the dtype of the nearest cast on the way (``None``: no cast)."""
    cast = None
    while isinstance(node, fx.Node):
        value = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(value, torch.Tensor):
            return value, cast
        if node.target is torch.ops.aten._to_copy.default and cast is None:
            cast = node.kwargs.get("dtype")
        node = node.args[0] if node.args else None
    return None, cast


def time_chains(gm: fx.GraphModule, backward: bool | None = None) -> int:
    """Run every chain call of ``gm`` that lands on CUDA once so that its fused segments
    and steps are timed (:mod:`ksfx.ops.race`); how many distinct chains were. ``backward`` (default: grad mode
    is on) also times the backward's. A symbolic batch is timed at its hint. A chain that
    cannot be run so (no hint, an error) is skipped: its choices then take their defaults."""
    backward = torch.is_grad_enabled() if backward is None else backward
    timed: set[tuple] = set()  # the blocks of a model repeat their chains: time each once
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CHAIN_OPS:
            continue
        try:
            _time_call(node, backward, timed)
        except Exception as err:  # noqa: BLE001 - timing only informs a choice; never break the compile
            log.warning("ksfx: could not time the kernels of %s (%s: %s)", node.name, type(err).__name__, err)
    return len(timed)


def _time_call(node: fx.Node, backward: bool, timed: set[tuple]) -> None:
    x_node, _, spec, batch_last, bias_node, dense = node.args[:6]
    chain = Chain.from_spec(spec)
    source, cast = _input_meta(x_node)
    if source is None or not race.applies(source):
        return
    n = race.batch_hint(source.numel() // chain.in_features)
    if n is None:
        return  # a symbolic batch without a hint: the trace finds no decision either
    dtype, device = cast or source.dtype, source.device
    signature = (spec, batch_last, bias_node is None, dense, n, dtype, str(device))
    if signature in timed:
        return
    timed.add(signature)
    with torch._subclasses.fake_tensor.unset_fake_temporarily(), paused(), torch.no_grad():
        x = torch.randn((chain.in_features, n) if batch_last else (n, chain.in_features), dtype=dtype, device=device)
        factors = [torch.randn(p.as_tuple(), dtype=dtype, device=device) for p in chain.patterns]
        bias = None if bias_node is None else torch.randn(chain.out_features, dtype=dtype, device=device)
        y = run_forward(x, factors, chain, batch_last, bias, dense)
        if backward:
            run_backward(torch.randn_like(y), x, factors, chain, batch_last, need_x=True)
