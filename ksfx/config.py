"""Process-wide settings, read once from the environment at import (nowhere else)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Config:
    #: Run the generated Triton kernels on CPU tensors through Triton's interpreter.
    interpret: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
    #: Log every decision of the pass (also reachable through the ``ksfx`` logger).
    debug: bool = os.environ.get("KSFX_DEBUG", "0") == "1"


config = Config()
