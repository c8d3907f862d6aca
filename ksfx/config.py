"""Process-wide settings, read once from the environment at import (nowhere else)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _optional_float(name: str) -> float | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None


@dataclass
class Config:
    #: Run the generated Triton kernels on CPU tensors through Triton's interpreter.
    interpret: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
    #: Log every decision of the pass (also reachable through the ``ksfx`` logger).
    debug: bool = os.environ.get("KSFX_DEBUG", "0") == "1"
    #: Autotune the forward kernels' tiles (per pattern, layout, dtype and batch size)
    #: instead of using the heuristic config. GPU only; costs a few seconds per new shape.
    autotune: bool = os.environ.get("KSFX_AUTOTUNE", "0") == "1"
    #: Which implementation runs a factor step on CUDA: "auto" (the one the step's first
    #: call timed fastest, ksfx.ops.race; where nothing can be timed, the measured policy of
    #: ksfx.ops.dispatch), "triton" (always the generated kernels) or "torch" (cuBLAS bmm).
    dispatch: str = os.environ.get("KSFX_DISPATCH", "auto")
    #: Fuse runs of factors into one launch (ksfx.codegen.fusion): "auto" (under the
    #: interpreter every run that fits; on CUDA where the roofline says fusing pays and the
    #: segment's first call timed it faster than its steps one by one, ksfx.ops.race),
    #: "always" (on CUDA where the roofline says fusing pays, untimed) or "never".
    fuse: str = os.environ.get("KSFX_FUSE", "auto")
    #: On CUDA, the least roofline gain for which a run fuses (None: ksfx.codegen.fusion.MIN_GAIN;
    #: 0 fuses every run that fits, as the chains benchmark does to time the rule).
    fuse_min_gain: float | None = _optional_float("KSFX_FUSE_MIN_GAIN")
    #: Where generated kernel sources are written (``triton.jit`` needs real files).
    cache_dir: str = os.environ.get(
        "KSFX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ksfx", "kernels")
    )


config = Config()
