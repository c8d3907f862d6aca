"""FX pass: detect Kronecker-sparse chains in aten graphs and rewrite them to the KS op.

Layers inside: ``atoms`` (digit algebra) → ``weights`` / ``detect`` (abstract
interpretation of the graph) → ``structure`` (chains, factors, permutations) →
``verify`` / ``cost`` → ``rewrite`` (the pass). Imports ``pattern`` and ``ops`` only.
"""

from ksfx.passes.inline import INLINE_ON_CPU
from ksfx.passes.rewrite import ChainReport, chain_roots, drop_dead_code, find_chains, run_pass

__all__ = ["INLINE_ON_CPU", "ChainReport", "chain_roots", "drop_dead_code", "find_chains", "run_pass"]
