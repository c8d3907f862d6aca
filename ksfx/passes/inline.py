"""What the backend puts in place of the rewritten chain op before the inner compiler.

On a CPU the chain is traced once more into plain aten ops (:mod:`ksfx.ops.aten_chain`),
so that Inductor sees and fuses them. On CUDA the call is pointed at the ``triton_op``
twin (:mod:`ksfx.ops.triton_op`), which AOT decomposes into the kernel launches Inductor
generates itself. The ``ks_chain`` call stays for the Triton interpreter.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import ksfx.ops.triton_op  # noqa: F401 - registers ksfx::ks_chain_triton
from ksfx.ops.aten_chain import chain_as_aten

INLINE_ON_CPU = {torch.ops.ksfx.ks_chain.default: chain_as_aten}

#: The chain op's twins of the same schema, one way and back (overloads in aten graphs,
#: packets in Dynamo's: ``ks_matmul`` calls the packet).
LAUNCHED_BY_INDUCTOR = {
    torch.ops.ksfx.ks_chain.default: torch.ops.ksfx.ks_chain_triton.default,
    torch.ops.ksfx.ks_chain: torch.ops.ksfx.ks_chain_triton,
}
AS_CUSTOM_OP = {twin: op for op, twin in LAUNCHED_BY_INDUCTOR.items()}


def retarget(gm: fx.GraphModule, targets: dict) -> int:
    """Point the calls of ``targets``' keys at their values (ops of the same schema); how many."""
    calls = [node for node in gm.graph.nodes if node.op == "call_function" and node.target in targets]
    for node in calls:
        node.target = targets[node.target]
    if calls:
        gm.recompile()
    return len(calls)
