"""Triton kernel generation from the symbolic descriptors (imports only ``ksfx.pattern``).

``index_maps`` derives every address expression from :mod:`ksfx.pattern`; ``source``
(one factor step) and ``chain_source`` (a fused segment) turn them into kernel source;
``loader`` writes, imports and caches the kernels; ``tiling`` picks tile
configurations; ``fusion`` cuts a chain into fused segments; ``traffic`` counts the
bytes a configuration moves.
"""

from ksfx.codegen import traffic
from ksfx.codegen.loader import ChainKernelKey, KernelKey, cached_kernels, get_autotuned, get_kernel
from ksfx.codegen.tiling import TileConfig, forward_heuristic, grad_heuristic, kernel_mode

__all__ = [
    "ChainKernelKey",
    "KernelKey",
    "TileConfig",
    "cached_kernels",
    "forward_heuristic",
    "get_autotuned",
    "get_kernel",
    "grad_heuristic",
    "kernel_mode",
    "traffic",
]
