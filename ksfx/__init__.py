"""ksfx: a torch.compile backend that runs Kronecker-sparse chains as fused Triton kernels.

Layers, each importing only those before it: ``pattern`` (symbolic descriptors) →
``codegen`` (Triton kernel generation) → ``ops`` (the torch op) → ``passes`` (FX
detection and rewrite) → ``backend`` (torch.compile glue).
"""

from ksfx.backend import Report, backend, explain, export  # the function `ksfx.backend` shadows the subpackage name
from ksfx.nn import KSLinear
from ksfx.ops import ks_matmul, races, stats
from ksfx.passes.graph_breaks import make_traceable, trace_autograd_functions
from ksfx.pattern import Chain, DigitPerm, IndexPerm, KSPattern

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "DigitPerm",
    "IndexPerm",
    "KSLinear",
    "KSPattern",
    "Report",
    "backend",
    "explain",
    "export",
    "ks_matmul",
    "make_traceable",
    "races",
    "stats",
    "trace_autograd_functions",
]
