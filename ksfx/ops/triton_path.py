"""Launchers of the generated Triton kernels: one factor step per launch.

Same interface as :mod:`ksfx.ops.torch_path` (the reference semantics). CUDA tensors
run compiled kernels; CPU tensors run them through Triton's interpreter when
``ksfx.config.interpret`` is set (``TRITON_INTERPRET=1``). The kernels address ``x`` and
``y`` through runtime strides, so non-contiguous inputs and both layouts need no copy;
``values`` may be a strided view too (the backward passes a transposed one). Inside
:func:`traceable_launches` (the body of :mod:`ksfx.ops.triton_op`) every launch goes
through ``torch.library.wrap_triton``, so that AOT tracing records it as a graph node.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch

from ksfx.codegen import ChainKernelKey, KernelKey, TileConfig, get_autotuned, get_kernel, kernel_mode
from ksfx.codegen.fusion import fma_dots, fused_tile, merged_steps, table_in_tile_order
from ksfx.codegen.fusion import values_order as fused_values_order
from ksfx.codegen.tiling import (
    cdiv,
    forward_heuristic,
    forward_programs,
    grad_heuristic,
    grad_mode,
    grad_programs_per_split,
    values_order,
    values_rows,
)
from ksfx.codegen.tuning import forward_config_space
from ksfx.config import config
from ksfx.ops import torch_path
from ksfx.ops.thread_flag import ThreadFlag
from ksfx.pattern import FactorStep, IndexPerm, Perm

#: Offsets beyond this need 64-bit index arithmetic in the kernels.
INT32_LIMIT = 2**31 - 1
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Nominal SM count under the interpreter (only shapes the heuristic's grid).
INTERPRETER_SMS = 4


def apply_perm(x: torch.Tensor, perm: Perm | None, batch_last: bool) -> torch.Tensor:
    """A lone permutation is a gather: torch indexing already moves it at bandwidth."""
    return torch_path.apply_perm(x, perm, batch_last)


# ----------------------------------------------------------------------------- helpers
def _layout(t: torch.Tensor, batch_last: bool) -> tuple[int, int, int]:
    """``(n, batch stride, feature stride)`` of a 2-D activation."""
    if batch_last:
        return t.shape[1], t.stride(1), t.stride(0)
    return t.shape[0], t.stride(0), t.stride(1)


def _needs_int64(*tensors: torch.Tensor) -> bool:
    # Masked lanes may step up to one tile past the end: keep a margin below 2**31.
    span = max(sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1 for t in tensors)
    return bool(span + (1 << 20) > INT32_LIMIT)  # a guard on a symbolic batch


_INTERPRETER_LOCK = threading.Lock()


def _launch_guard(device: torch.device):
    """Serialise interpreted launches: Triton's interpreter patches ``triton.language``
    globally for each launch, so two threads interpreting at once break each other."""
    return _INTERPRETER_LOCK if device.type != "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- traced launches
_TRACEABLE = ThreadFlag()


def traceable_launches():
    """Launch through ``torch.library.wrap_triton`` (inside a ``triton_op``'s body).

    AOT tracing then records each launch as a graph node that Inductor compiles and
    launches itself; outside a trace ``wrap_triton`` hands back the kernel unchanged.
    """
    return _TRACEABLE.on()


def _launcher(kernel):
    return torch.library.wrap_triton(kernel) if _TRACEABLE else kernel


# ----------------------------------------------------------------------------- build failures
class KernelUnavailable(RuntimeError):
    """A generated kernel that Triton could not build or load for the device: a compiler
    error, or more shared memory or registers than the device has. The op then runs the
    step with the plain-torch path and says so (a warning, ``ksfx.stats()``)."""


#: Launches that failed to build, with their message: later calls fail fast, no recompile.
_UNAVAILABLE: dict[tuple, str] = {}


def _is_build_failure(error: Exception) -> bool:
    """Triton's errors for a kernel it cannot build or load (``CompilationError``,
    ``OutOfResources``, ``PTXASError``, and an MLIR pass failure, a bare ``RuntimeError``),
    never an error of the interpreter, which runs the kernels as Python and so tests them."""
    import triton

    if isinstance(error, triton.runtime.errors.InterpreterError):
        return False
    if isinstance(error, triton.runtime.errors.TritonError):
        return True
    return isinstance(error, RuntimeError) and str(error).startswith("PassManager::run failed")


def _named(kind: str, steps, batch_last: bool, x: torch.Tensor) -> str:
    layout = "batch-last" if batch_last else "batch-first"
    return f"{kind} kernel of {steps} ({layout}, {str(x.dtype).removeprefix('torch.')})"


def _failure_key(kernel, options: dict) -> tuple:
    return kernel, tuple(sorted((k, v) for k, v in options.items() if not isinstance(v, torch.Tensor)))


def _launch(kernel, grid, args: tuple, options: dict, device: torch.device, describe) -> None:
    """Launch ``kernel``; a build failure becomes :class:`KernelUnavailable`, its message
    naming the kernel by ``describe()`` (built only then: launches are the hot path)."""
    if _UNAVAILABLE and _failure_key(kernel, options) in _UNAVAILABLE:
        raise KernelUnavailable(_UNAVAILABLE[_failure_key(kernel, options)])
    try:
        with _launch_guard(device):
            _launcher(kernel)[grid](*args, **options)
    except Exception as error:  # re-raised unless Triton could not build the kernel
        if not _is_build_failure(error):
            raise
        first = (str(error).strip().splitlines() or [""])[0][:300]
        message = f"Triton could not build the {describe()} for {device}: {type(error).__name__}: {first}"
        _UNAVAILABLE[_failure_key(kernel, options)] = message
        raise KernelUnavailable(message) from error


def _unused(like: torch.Tensor) -> torch.Tensor:
    """What an unused pointer argument gets: ``like`` itself, or an empty tensor of its
    dtype in a trace, where aliasing the output would make it look read or written."""
    return like.new_empty(0) if _TRACEABLE else like


def _under_fake_mode() -> bool:
    return torch._guards.detect_fake_mode() is not None


#: Batch size assumed for a batch with no hint (unbacked): tiles for a large batch.
UNBACKED_HINT = 8192


def size_hint(n) -> int:
    """The batch size tiles are chosen for: ``n``, or the hint of a symbolic ``n`` (a traced
    launch, whose grid stays symbolic)."""
    if isinstance(n, int):
        return n
    hint = n.node.hint
    return UNBACKED_HINT if hint is None else int(hint)


@functools.lru_cache(maxsize=256)
def _cached_table(perm: IndexPerm, device: torch.device) -> torch.Tensor:
    return perm.indices().to(device=device, dtype=torch.int32)


def _table(perm: IndexPerm, device: torch.device) -> torch.Tensor:
    """Device copy of an index table (int32), made once per permutation and device; made
    afresh under a trace, whose fake tensor must not outlive it (the trace keeps it as a
    constant)."""
    return (_cached_table.__wrapped__ if _under_fake_mode() else _cached_table)(perm, device)


def _tables(step: FactorStep, device: torch.device, dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    store = None if step.out_perm is None else step.out_perm.inverse()
    in_table = _table(step.in_perm, device) if isinstance(step.in_perm, IndexPerm) else _unused(dummy)
    out_table = _table(store, device) if isinstance(store, IndexPerm) else _unused(dummy)
    return in_table, out_table


def dot_precision(dtype: torch.dtype) -> str:
    """The kernel key's precision: fp32 dots under ``ieee`` or ``tf32`` (as torch's matmul
    precision says); ``-`` for 16-bit dtypes."""
    if dtype != torch.float32:
        return "-"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclass(frozen=True)
class Target:
    """What a launch is specialised for: the GPU (or the interpreter) it runs on."""

    capability: tuple[int, int] | None
    sms: int
    interpret: bool


@functools.lru_cache(maxsize=16)
def _device_info(device: torch.device) -> tuple[tuple[int, int] | None, int]:
    """``(compute capability, SM count)``; nominal values under the interpreter."""
    if device.type != "cuda":
        return None, INTERPRETER_SMS
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count


def device_target(device: torch.device) -> Target:
    """The target of tensors on ``device``.

    ``config.interpret`` mirrors TRITON_INTERPRET, which makes triton.jit interpret even
    CUDA tensors; the interpreted source differs (bf16 dots are upcast). It is read at
    each call (tests switch it), so only the device properties are cached.
    """
    capability, sms = _device_info(device)
    return Target(capability, sms, config.interpret or device.type != "cuda")


def kernel_key(kind: str, step: FactorStep, dtype: torch.dtype, batch_last: bool, target: Target) -> KernelKey:
    """The kernel a launch of ``kind`` (``forward`` | ``grad``) runs for this step."""
    return KernelKey(
        kind=kind,
        step=step,
        mode=(grad_mode if kind == "grad" else kernel_mode)(step.pattern, batch_last),
        batch_last=batch_last,
        dtype=str(dtype).removeprefix("torch."),
        interpret=target.interpret,
        precision=dot_precision(dtype),
        capability=target.capability,
    )


def _key(kind: str, step: FactorStep, t: torch.Tensor, batch_last: bool) -> KernelKey:
    return kernel_key(kind, step, t.dtype, batch_last, device_target(t.device))


def _check(x: torch.Tensor, values: torch.Tensor | None, step: FactorStep, batch_last: bool) -> None:
    """Sizes, dtype and device of an activation (and of the values when given)."""
    if x.ndim != 2:
        raise ValueError(f"{step}: the Triton path takes a 2-D input, got shape {tuple(x.shape)}")
    features = x.shape[0] if batch_last else x.shape[1]
    if features != step.pattern.in_features:
        raise ValueError(f"{step}: input has {features} features, the factor takes {step.pattern.in_features}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{step}: the Triton kernels take {', '.join(map(str, KERNEL_DTYPES))}, got {x.dtype}")
    if values is not None:
        step.pattern.check_values(values)
        if values.dtype != x.dtype or values.device != x.device:
            raise TypeError(f"{step}: values ({values.dtype}, {values.device}) must match x ({x.dtype}, {x.device})")
    if x.device.type != "cuda" and not config.interpret:
        raise ValueError(f"{step}: Triton kernels need CUDA tensors or ksfx.config.interpret (TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------- launches
def factor_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    step: FactorStep,
    batch_last: bool,
    bias: torch.Tensor | None = None,
    tile: TileConfig | None = None,
) -> torch.Tensor:
    """``out_perm(K(in_perm(x))) (+ bias)`` in one launch; a new contiguous tensor.

    ``tile`` overrides the configuration (tests, benchmarks); by default the heuristic
    picks it, or Triton's autotuner when ``ksfx.config.autotune`` is set (a GPU
    tunes over :func:`~ksfx.codegen.tuning.forward_config_space`).
    """
    _check(x, values, step, batch_last)
    pattern = step.pattern
    n = _layout(x, batch_last)[0]
    shape = (pattern.out_features, n) if batch_last else (n, pattern.out_features)
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    args, flags = forward_arguments(x, values, y, step, batch_last, bias)
    if tile is None and config.autotune:
        key = _key("forward", step, x, batch_last)
        kernel = _autotuned(key, size_hint(n), x.element_size(), x.device, config.cache_dir)
        grid = lambda meta: (forward_programs(pattern, n, _meta_tile(meta), key.mode),)  # noqa: E731
        _launch(kernel, grid, args, flags, x.device, lambda: _named("autotuned forward", step, batch_last, x))
        return y
    launch = _forward_launch if isinstance(n, int) else _forward_launch.__wrapped__  # a symbolic n is unhashable
    kernel, grid, meta = launch(
        step, batch_last, x.dtype, x.device, n, tile, torch.get_float32_matmul_precision(), config.interpret
    )
    _launch(kernel, grid, args, {**flags, **meta}, x.device, lambda: _named("forward", step, batch_last, x))
    return y


def _laid_out(values: torch.Tensor, order: tuple[int, ...], rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``values`` (same shape) stored in dimension ``order``; a copy only when they are not.

    ``rows`` (:func:`~ksfx.codegen.tiling.values_rows`): ``(dimension, length)``, that
    dimension, the innermost of ``order``, padded with zeros to ``length``, which the kernel
    reads up to (its mask, or its δ tile).
    """
    stored = values.permute(order)
    inverse = tuple(order.index(dim) for dim in range(len(order)))
    if rows is not None and values.shape[rows[0]] != rows[1]:
        inner = order.index(rows[0])
        sizes = list(stored.shape)
        padded = stored.new_zeros(sizes[:inner] + [rows[1]] + sizes[inner + 1 :])
        return padded.narrow(inner, 0, sizes[inner]).copy_(stored).permute(inverse)
    if stored.is_contiguous():
        return values
    return stored.contiguous().permute(inverse)


def forward_arguments(x, values, y, step: FactorStep, batch_last: bool, bias=None) -> tuple[tuple, dict]:
    """Positional arguments and flags of a forward launch (any device, ``meta`` included)."""
    pattern = step.pattern
    if bias is not None:
        bias = bias.contiguous()
    values = _laid_out(values, values_order(pattern, batch_last), values_rows(pattern, batch_last))
    n, stride_xm, stride_xf = _layout(x, batch_last)
    _, stride_ym, stride_yf = _layout(y, batch_last)
    in_table, out_table = _tables(step, x.device, y)
    args = (
        x, values, y, _unused(y) if bias is None else bias, in_table, out_table,
        n, stride_xm, stride_xf, stride_ym, stride_yf, *values.stride(),
    )  # fmt: skip
    return args, {"HAS_BIAS": bias is not None, "INT64": _needs_int64(x, y)}


def forward_plan(step, batch_last, dtype, n, target: Target, tile=None) -> tuple[KernelKey, TileConfig, int]:
    """Kernel key, tile config and grid size of a forward launch."""
    key = kernel_key("forward", step, dtype, batch_last, target)
    if tile is None:
        tile = forward_heuristic(step.pattern, size_hint(n), dtype.itemsize, batch_last, target.sms)
    return key, tile, forward_programs(step.pattern, n, tile, key.mode)


@functools.lru_cache(maxsize=4096)
def _forward_launch(step, batch_last, dtype, device, n, tile, fp32_precision, interpret):
    """Kernel, grid and launch options of one call signature, decided once.

    Keyed on everything the decision reads (fp32 precision and interpretation too, since
    they change the generated source), so the per-call host cost is one cache lookup.
    """
    key, tile, programs = forward_plan(step, batch_last, dtype, n, device_target(device), tile)
    kernel = get_kernel(key, config.cache_dir)
    return kernel, (programs,), {**tile.meta(), "num_warps": tile.num_warps, "num_stages": tile.num_stages}


def tuned_config(x: torch.Tensor, step: FactorStep, batch_last: bool) -> TileConfig | None:
    """The config Triton's autotuner kept for ``x``'s shape (None before it tuned one)."""
    key = _key("forward", step, x, batch_last)
    tuner = _autotuned(key, _layout(x, batch_last)[0], x.element_size(), x.device, config.cache_dir)
    best = getattr(tuner, "best_config", None)
    if best is None:
        return None
    return TileConfig(**{name.lower(): v for name, v in best.kwargs.items()}, num_warps=best.num_warps,
                      num_stages=best.num_stages)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _autotuned(key: KernelKey, n: int, itemsize: int, device: torch.device, cache_dir):
    """The autotuned kernel of one call signature, built once.

    The space is ranked by the traffic model (10-30 ms of host time), so it must not be
    recomputed per call; Triton's autotuner then tunes once per batch size and layout.
    Only the heuristic's config under the interpreter (nothing to time).
    """
    sms = device_target(device).sms
    if key.interpret:
        space = [forward_heuristic(key.step.pattern, n, itemsize, key.batch_last, sms)]
    else:
        space = forward_config_space(key.step, n, itemsize, key.batch_last, sms)
    return get_autotuned(key, cache_dir, space)


def _meta_tile(meta: dict) -> TileConfig:
    return TileConfig(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"])


def factor_grad_values(
    dy: torch.Tensor, x: torch.Tensor, step: FactorStep, batch_last: bool, tile: TileConfig | None = None
) -> torch.Tensor:
    """``dvalues[α,β,γ,δ] = Σ_m dy'[m, row(α,β,δ)] · x'[m, col(α,γ,δ)]`` (fp32 accumulation).

    The batch is cut into ``tile.splits`` chunks; each writes fp32 partials that are
    summed afterwards, so large batches over few values still fill the GPU.
    """
    pattern = step.pattern
    _check(x, None, step, batch_last)
    n = _layout(x, batch_last)[0]
    expected = (pattern.out_features, n) if batch_last else (n, pattern.out_features)
    if tuple(dy.shape) != expected:
        raise ValueError(f"{step}: dy of shape {tuple(dy.shape)} does not match x of shape {tuple(x.shape)}")
    if dy.dtype != x.dtype or dy.device != x.device:
        raise TypeError(f"{step}: dy ({dy.dtype}, {dy.device}) must match x ({x.dtype}, {x.device})")
    if n == 0:
        return torch.zeros(pattern.as_tuple(), dtype=x.dtype, device=x.device)
    launch = _grad_launch if isinstance(n, int) else _grad_launch.__wrapped__
    kernel, chunk, splits, grid, meta = launch(
        step, batch_last, x.dtype, x.device, n, tile, torch.get_float32_matmul_precision(), config.interpret
    )
    partials = torch.empty((splits, *pattern.as_tuple()), dtype=torch.float32, device=x.device)
    args, flags = grad_arguments(dy, x, partials, chunk, step, batch_last)
    _launch(kernel, grid, args, {**flags, **meta}, x.device, lambda: _named("weight-gradient", step, batch_last, x))
    return partials.sum(0).to(x.dtype)


def grad_arguments(dy, x, partials, chunk: int, step: FactorStep, batch_last: bool) -> tuple[tuple, dict]:
    """Positional arguments and flags of a weight-gradient launch (any device, ``meta`` included)."""
    n, stride_xm, stride_xf = _layout(x, batch_last)
    _, stride_dm, stride_df = _layout(dy, batch_last)
    in_table, out_table = _tables(step, x.device, partials)
    args = (dy, x, partials, in_table, out_table, n, chunk, stride_dm, stride_df, stride_xm, stride_xf)
    return args, {"INT64": _needs_int64(dy, x)}


def grad_plan(step, batch_last, dtype, n, target: Target, tile=None) -> tuple[KernelKey, TileConfig, int, int]:
    """Kernel key, tile config, batch chunk and grid size of a weight-gradient launch."""
    key = kernel_key("grad", step, dtype, batch_last, target)
    if tile is None:
        tile = grad_heuristic(step.pattern, size_hint(n), dtype.itemsize, batch_last, target.sms)
    chunk = cdiv(cdiv(n, tile.splits), tile.block_m) * tile.block_m
    return key, tile, chunk, cdiv(n, chunk) * grad_programs_per_split(step.pattern, tile, key.mode)


@functools.lru_cache(maxsize=4096)
def _grad_launch(step, batch_last, dtype, device, n, tile, fp32_precision, interpret):
    """Kernel, batch chunking, grid and launch options of one weight-gradient call signature."""
    key, tile, chunk, programs = grad_plan(step, batch_last, dtype, n, device_target(device), tile)
    meta = {**tile.meta(), "num_warps": tile.num_warps, "num_stages": tile.num_stages}
    return get_kernel(key, config.cache_dir), chunk, cdiv(n, chunk), (programs,), meta


def chain_plan(steps: tuple[FactorStep, ...], batch_last, dtype, n, target: Target, taps: bool = False):
    """Kernel key, tile and grid size of a fused segment's launch."""
    name = str(dtype).removeprefix("torch.")
    key = ChainKernelKey(steps, batch_last, name, target.interpret, dot_precision(dtype), target.capability, taps)
    tile = fused_tile(steps, size_hint(n), batch_last, key.dtype, key.precision)
    return key, tile, cdiv(n, tile.block_m)


def _fused_in_table(step: FactorStep, batch_last: bool, device: torch.device, dummy: torch.Tensor) -> torch.Tensor:
    """``step``'s input table as a fused segment reads it (:func:`~ksfx.codegen.fusion.table_in_tile_order`)."""
    if not table_in_tile_order(step, batch_last):
        return _tables(step, device, dummy)[0]
    return (_cached_tile_table.__wrapped__ if _under_fake_mode() else _cached_tile_table)(step, device)


@functools.lru_cache(maxsize=256)
def _cached_tile_table(step: FactorStep, device: torch.device) -> torch.Tensor:
    p = step.pattern
    tile_order = torch.arange(p.in_features).reshape(p.a, p.c, p.d).transpose(1, 2).reshape(-1)
    # entry (α, δ, γ) holds the one of feature col(α, γ, δ)
    return step.in_perm.indices()[tile_order].to(device=device, dtype=torch.int32)


def chain_arguments(x, values, y, steps: tuple[FactorStep, ...], batch_last: bool, bias=None, taps=()) -> tuple:
    """Positional arguments and flags of a fused segment's launch (any device, ``meta`` included).

    ``taps``: the tensors receiving every step's output but the last (or none).
    """
    n, stride_xm, stride_xf = _layout(x, batch_last)
    _, stride_ym, stride_yf = _layout(y, batch_last)
    tables = [_fused_in_table(s, batch_last, x.device, y) for s in steps]
    out_table = _tables(steps[-1], x.device, y)[1]
    # the kernel indexes them with the strides of fusion.values_order
    values = [_laid_out(v, fused_values_order(s, batch_last)) for v, s in zip(values, steps, strict=True)]
    tap_strides = [stride for tap in taps for stride in _layout(tap, batch_last)[1:]]
    args = (x, y, _unused(y) if bias is None else bias.contiguous(), *values, *tables, out_table, *taps,
            n, stride_xm, stride_xf, stride_ym, stride_yf, *tap_strides)  # fmt: skip
    return args, {"HAS_BIAS": bias is not None, "INT64": _needs_int64(x, y, *taps)}


def merged_segment(steps: tuple[FactorStep, ...], values: list[torch.Tensor], batch_last: bool, dtype):
    """The segment as its kernel runs it: small tensor-core blocks merged into larger ones
    padded with zeros (:func:`~ksfx.codegen.fusion.merged_steps`), and their values so laid out."""
    dots = fma_dots(str(dtype).removeprefix("torch."), dot_precision(dtype))
    merged, merges = merged_steps(steps, batch_last, dots)
    return merged, [_merged_values(v, *g) for v, g in zip(values, merges, strict=True)]


def _merged_values(values: torch.Tensor, ga: int, gd: int) -> torch.Tensor:
    """``values`` of ``(a, b, c, d)`` as those of ``(a/ga, b·g, c·g, d/gd)``, ``g = ga·gd``:
    each group of ``g`` blocks on the diagonal of one block, zeros elsewhere (written, not
    multiplied: a non-finite value stays in its own block)."""
    if ga == gd == 1:
        return values
    a, b, c, d = values.shape
    if ga > 1:
        merged = values.new_zeros(a // ga, ga, b, ga, c, d)
        diagonal = torch.arange(ga, device=values.device)
        merged[:, diagonal, :, diagonal] = values.reshape(a // ga, ga, b, c, d).transpose(0, 1)
        return merged.reshape(a // ga, ga * b, ga * c, d)
    merged = values.new_zeros(a, b, gd, c, gd, d // gd)
    diagonal = torch.arange(gd, device=values.device)
    merged[:, :, diagonal, :, diagonal] = values.reshape(a, b, c, gd, d // gd).permute(3, 0, 1, 2, 4)
    return merged.reshape(a, b * gd, c * gd, d // gd)


def chain_forward(
    x: torch.Tensor,
    values: list[torch.Tensor],
    steps: tuple[FactorStep, ...],
    batch_last: bool,
    bias: torch.Tensor | None = None,
    taps: bool = False,
):
    """A fused segment (:func:`ksfx.codegen.fusion.on_chip_steps`) in one launch; a new contiguous tensor.

    ``values[k]`` are the values of ``steps[k]`` (application order). With ``taps``, the
    list of every step's output (before the permutation moved onto the next step's loads),
    the last one being the segment's output.
    """
    if len(values) != len(steps):
        raise ValueError(f"a fused segment of {len(steps)} steps got {len(values)} value tensors")
    _check(x, None, steps[0], batch_last)
    for step, v in zip(steps, values, strict=True):
        step.pattern.check_values(v)
        if v.dtype != x.dtype or v.device != x.device:
            raise TypeError(f"{step}: values ({v.dtype}, {v.device}) must match x ({x.dtype}, {x.device})")
    n = _layout(x, batch_last)[0]

    def output(features: int) -> torch.Tensor:
        return torch.empty((features, n) if batch_last else (n, features), dtype=x.dtype, device=x.device)

    outs = [output(s.pattern.out_features) for s in (steps if taps else steps[-1:])]
    if n > 0:
        steps, values = merged_segment(steps, values, batch_last, x.dtype)
        key, tile, programs = chain_plan(steps, batch_last, x.dtype, n, device_target(x.device), taps)
        kernel = get_kernel(key, config.cache_dir)
        args, flags = chain_arguments(x, values, outs[-1], steps, batch_last, bias, outs[:-1])
        options = {**flags, **tile.meta(), "num_warps": tile.num_warps, "num_stages": tile.num_stages}
        _launch(
            kernel,
            (programs,),
            args,
            options,
            x.device,
            lambda: _named("fused", " -> ".join(map(str, steps)), batch_last, x),
        )
    return outs if taps else outs[0]
