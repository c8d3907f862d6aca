"""Write generated kernels to a cache directory, import them, and keep them in-process.

``triton.jit`` reads a kernel's source from its file (``inspect.getsource``), so
generated source must live in a real module. Files are named by the hash of their
source and written atomically, so concurrent processes share them safely; the
in-process cache is keyed by everything that changes the code or its compilation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ksfx.codegen.chain_source import chain_forward_source
from ksfx.codegen.source import forward_source, grad_source
from ksfx.codegen.tiling import TileConfig
from ksfx.pattern import FactorStep


@dataclass(frozen=True)
class KernelKey:
    """Everything a compiled kernel depends on."""

    kind: str  # "forward" | "grad"
    step: FactorStep
    mode: str  # "dot" | "fma"
    batch_last: bool
    dtype: str  # torch dtype name without the "torch." prefix
    interpret: bool
    precision: str  # fp32 dot precision: "ieee" | "tf32" (other dtypes: "-")
    capability: tuple[int, int] | None

    def source(self) -> str:
        if self.kind == "forward":
            return forward_source(
                self.step, self.mode, self.dtype, self.interpret, self.precision, batch_last=self.batch_last
            )
        if self.kind == "grad":
            return grad_source(self.step, self.mode, self.dtype, self.interpret, self.precision)
        raise ValueError(f"unknown kernel kind {self.kind!r} (expected 'forward' or 'grad')")

    @property
    def function_name(self) -> str:
        return f"{self.kind}_{self.mode}"


@dataclass(frozen=True)
class ChainKernelKey:
    """The kernel of a fused segment (:mod:`ksfx.codegen.fusion`)."""

    steps: tuple[FactorStep, ...]
    batch_last: bool  # whether a tensor-core first factor reads its input whole
    dtype: str  # the tensor-core factors' operands
    interpret: bool
    precision: str  # fp32 dot precision: "ieee" | "tf32" (other dtypes: "-")
    capability: tuple[int, int] | None
    taps: bool = False  # every step's output stored (the backward's recomputed intermediates)
    kind: str = "forward_chain"
    function_name: str = "forward_chain"

    def source(self) -> str:
        return chain_forward_source(self.steps, self.batch_last, self.dtype, self.interpret, self.precision, self.taps)


_lock = threading.Lock()
_kernels: dict[KernelKey | ChainKernelKey, object] = {}
_autotuned: dict[tuple[KernelKey, tuple[TileConfig, ...]], object] = {}


def _write_module(source: str, cache_dir: Path) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = cache_dir / f"ksfx_kernel_{digest}.py"
    if not path.exists() or path.read_text() != source:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".py.tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(source)
        os.replace(tmp, path)
    return path


def _import(path: Path, key: KernelKey | ChainKernelKey):
    # A distinct module per (file, interpret flag): triton.jit picks the interpreter at
    # decoration time, so the same file is imported once per mode.
    name = f"ksfx_generated.{path.stem}_{'interp' if key.interpret else 'jit'}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, key.function_name)


def get_kernel(key: KernelKey | ChainKernelKey, cache_dir: str | os.PathLike):
    """The ``@triton.jit`` function for ``key``, generated and imported on first use."""
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _kernels.get(key)
        if kernel is None:
            kernel = _import(_write_module(key.source(), Path(cache_dir)), key)
            _kernels[key] = kernel
    return kernel


def get_autotuned(key: KernelKey, cache_dir: str | os.PathLike, configs: list[TileConfig]):
    """``triton.autotune`` over ``configs`` for the kernel of ``key``.

    Tuning is keyed on the batch size and the input/output strides (the layout), so a
    new batch size tunes again and later calls with the same one reuse the winner.
    """
    import triton

    cache_key = (key, tuple(configs))
    tuned = _autotuned.get(cache_key)
    if tuned is not None:
        return tuned
    kernel = get_kernel(key, cache_dir)
    with _lock:
        tuned = _autotuned.get(cache_key)
        if tuned is None:
            triton_configs = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
            tuned = triton.autotune(triton_configs, key=["n", "stride_xm", "stride_xf", "stride_ym", "stride_yf"])(
                kernel
            )
            _autotuned[cache_key] = tuned
    return tuned


def cached_kernels() -> list[KernelKey | ChainKernelKey]:
    """Keys of the kernels generated in this process (for tests and ``explain``)."""
    with _lock:
        return list(_kernels)
