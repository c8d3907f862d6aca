"""FX pass: detect Kronecker-sparse chains in aten graphs and rewrite them to the KS op.

Layers inside: ``atoms`` (digit algebra) → ``weights`` / ``detect`` (abstract
interpretation of the graph) → ``structure`` (chains, factors, permutations) →
``verify`` / ``cost`` → ``rewrite`` (the pass). Imports ``pattern`` and ``ops`` only.
"""

from ksfx.passes.inline import AS_CUSTOM_OP, INLINE_ON_CPU, LAUNCHED_BY_INDUCTOR, retarget
from ksfx.passes.rewrite import ChainReport, chain_roots, drop_dead_code, find_chains, run_pass

__all__ = [
    "AS_CUSTOM_OP",
    "INLINE_ON_CPU",
    "LAUNCHED_BY_INDUCTOR",
    "ChainReport",
    "chain_roots",
    "drop_dead_code",
    "find_chains",
    "retarget",
    "run_pass",
]
