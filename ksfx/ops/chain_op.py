"""The ``ksfx::ks_chain`` torch op: runtime dispatch, fake kernel and autograd.

Registered with ``torch.library.custom_op`` so compiled graphs keep it as one opaque
call (Inductor compiles everything around it), its fake kernel propagates symbolic
batch sizes, and ``register_autograd`` gives it a backward made of the same kernels.

Dispatch per factor step (:mod:`ksfx.ops.dispatch`): CUDA tensors run the generated
Triton kernels where they measurably beat cuBLAS bmm, else the plain-torch path; CPU
tensors run the plain-torch path, or the Triton kernels through the interpreter when
``TRITON_INTERPRET=1`` (that is how CI tests the kernels).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from ksfx.codegen.fusion import backward_plan, on_chip_steps
from ksfx.ops import race, stats, torch_path
from ksfx.ops.dispatch import chain_implementation, chain_segments, step_implementation, torch_path_name
from ksfx.pattern import Chain, FactorStep, PermStep, split_chain

log = logging.getLogger("ksfx.ops")


# ----------------------------------------------------------------------------- validation
def validate(x: torch.Tensor, factors: list[torch.Tensor], chain: Chain, batch_last: bool, bias, dense: int) -> None:
    """Check sizes and dtypes; every message names the factor and the expected sizes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"the ks_chain op takes a 2-D input, got shape {tuple(x.shape)}")
    features = x.shape[0] if batch_last else x.shape[1]
    layout = "batch-last (in_features, n)" if batch_last else "batch-first (n, in_features)"
    if features != chain.in_features:
        raise ValueError(f"input has {features} features but the chain {chain} takes {chain.in_features} ({layout})")
    patterns = chain.patterns
    if len(factors) != len(patterns):
        raise ValueError(f"chain {chain} has {len(patterns)} factors but {len(factors)} value tensors were given")
    for k, (pattern, values) in enumerate(zip(patterns, factors, strict=True)):
        pattern.check_values(values, name=f"factor {k}")
        if values.dtype != x.dtype:
            raise TypeError(f"factor {k} {pattern} has dtype {values.dtype} but the input has dtype {x.dtype}")
        if values.device != x.device:
            raise ValueError(f"factor {k} {pattern} is on {values.device} but the input is on {x.device}")
    if not 0 <= dense < 1 << len(patterns):
        raise ValueError(f"dense factor mask {dense} out of range for the {len(patterns)} factors of the chain {chain}")
    if bias is not None and (tuple(bias.shape) != (chain.out_features,) or bias.dtype != x.dtype):
        raise ValueError(
            f"bias of the chain {chain} must have shape ({chain.out_features},) and dtype {x.dtype}, "
            f"got {tuple(bias.shape)} and {bias.dtype}"
        )


# ----------------------------------------------------------------------------- running a plan
@functools.lru_cache(maxsize=1024)
def _plan(chain: Chain) -> list[FactorStep] | PermStep:
    """Launch plan of a chain, built once: the op runs it on every call."""
    return split_chain(chain)


#: Messages of the build failures already warned about (one warning a kernel).
_WARNED: set[str] = set()


def _fall_back(x: torch.Tensor, error: Exception) -> tuple[str, ModuleType]:
    """The plain-torch path for a step whose kernel Triton could not build (warned once a
    kernel, counted as ``<implementation>.fallback`` in ``ksfx.stats()``)."""
    if str(error) not in _WARNED:
        _WARNED.add(str(error))
        log.warning("%s; running it with the plain-torch path instead", error)
    name = torch_path_name(x)
    stats.record(f"{name}.fallback")
    return name, torch_path


def _run_step(x, step: FactorStep, batch_last: bool, kind: str, run, variant: tuple = ()):
    """``run(impl)`` on the implementation dispatch picks for the step (on CUDA the one its
    first call timed fastest, :mod:`~ksfx.ops.race`), counted as ``<impl>.<kind>``; on the
    plain-torch path where Triton could not build the kernel. ``variant``: what else tells
    the step's calls apart (a bias)."""
    name, impl = step_implementation(x, step, batch_last)
    generated_name, generated = chain_implementation(x)
    if generated is not torch_path and race.dispatch_applies(x):

        def generated_side():
            try:
                return run(generated)
            except generated.KernelUnavailable:
                return None

        sides = {"generated kernel": generated_side, "torch": lambda: run(torch_path)}
        subject = lambda: f"{kind.replace('_', ' ')} of {step}"  # noqa: E731
        key = race.race_key(("step", kind, step, variant), batch_last, x)
        default = "generated kernel" if impl is generated else "torch"
        winner = race.decide(key, x, sides, subject, batch_last, default)
        name, impl = (generated_name, generated) if winner == "generated kernel" else (torch_path_name(x), torch_path)
    if impl is not torch_path:
        try:
            out = run(impl)
            stats.record(f"{name}.{kind}")
            return out
        except impl.KernelUnavailable as error:
            name, impl = _fall_back(x, error)
    stats.record(f"{name}.{kind}")
    return run(impl)


def _forward_step(x, values, step: FactorStep, batch_last: bool, bias) -> torch.Tensor:
    return _run_step(
        x,
        step,
        batch_last,
        "forward",
        lambda impl: impl.factor_forward(x, values, step, batch_last, bias),
        (bias is not None,),
    )


def _grad_step(dy, x, step: FactorStep, batch_last: bool) -> torch.Tensor:
    return _run_step(dy, step, batch_last, "grad_values", lambda impl: impl.factor_grad_values(dy, x, step, batch_last))


def _fused(x, values, steps, batch_last: bool, bias=None, taps: bool = False):
    """A fused segment in one launch, or None where Triton could not build it (the caller
    then runs its steps one by one)."""
    name, impl = chain_implementation(x)
    try:
        out = impl.chain_forward(x, values, steps, batch_last, bias, taps=taps)
    except impl.KernelUnavailable as error:
        _fall_back(x, error)
        return None
    stats.record(f"{name}.forward_chain")
    return out


def _nonfinite_as_dense(x: torch.Tensor, y: torch.Tensor, step: FactorStep, batch_last: bool) -> torch.Tensor:
    """``y`` with the NaNs a dense product by the factor's matrix would have.

    A masked dense weight is multiplied with its structural zeros too: an infinite or
    NaN input entry then turns every output outside its ``(α, δ)`` block into NaN
    (``inf · 0``). Output block ``(α, δ)`` is NaN where some *other* input block holds a
    non-finite entry. A block's float64 sum is non-finite exactly when it holds one (no
    float32/16 input can overflow it); one reduction over ``x`` and one broadcast add of
    0/NaN onto ``y``, no host sync, any device.
    """
    p = step.pattern
    if p.a * p.d == 1:  # one block: no structural zero meets an input entry
        return y
    x_in = torch_path.apply_perm(x, step.in_perm, batch_last)
    n = x.shape[1] if batch_last else x.shape[0]
    if batch_last:  # blocks (a, c, d) over the rows, batch last
        bad = ~torch.isfinite(x_in.reshape(p.a, p.c, p.d, n).sum(1, dtype=torch.float64))  # (a, d, n)
        others = (bad.sum(dim=(0, 1), keepdim=True) - bad.int()) > 0
        others, blocks = others[:, None], (p.a, p.b, p.d, n)
    else:
        bad = ~torch.isfinite(x_in.reshape(n, p.a, p.c, p.d).sum(2, dtype=torch.float64))  # (n, a, d)
        others = (bad.sum(dim=(1, 2), keepdim=True) - bad.int()) > 0
        others, blocks = others[:, :, None], (n, p.a, p.b, p.d)
    poison = torch.zeros(others.shape, dtype=y.dtype, device=y.device).masked_fill_(others, float("nan"))
    if step.out_perm is None and y.is_contiguous():
        y.view(blocks).add_(poison)  # y is this step's fresh output
        return y
    full = poison.expand(blocks).reshape(y.shape)  # in the factor's own output order
    return y + torch_path.apply_perm(full, step.out_perm, batch_last)


def factor_steps(factors, plan: list[FactorStep], dense: int) -> list[tuple[torch.Tensor, FactorStep, bool]]:
    """``(values, step, stands for a dense product)`` per step, in application order.

    ``factors`` and the bits of ``dense`` are in chain order (leftmost first); the plan
    runs the rightmost factor first.
    """
    last = len(plan) - 1
    return [(factors[last - k], step, bool(dense >> (last - k) & 1)) for k, step in enumerate(plan)]


def run_forward(x, factors, chain: Chain, batch_last: bool, bias=None, dense: int = 0) -> torch.Tensor:
    """``dense``: bit mask of the factors that stand for dense products (see :func:`_nonfinite_as_dense`).

    Runs of small-block factors go in one fused launch where the implementation has one
    (:func:`~ksfx.ops.dispatch.chain_segments`); the other steps one launch each.
    """
    plan = _plan(chain)
    if isinstance(plan, PermStep):
        name, impl = chain_implementation(x)
        stats.record(f"{name}.perm")
        y = impl.apply_perm(x, plan.perm, batch_last)
        if bias is not None:
            return y + (bias[:, None] if batch_last else bias)
        return y.clone()  # op outputs must never alias the input
    steps = factor_steps(factors, plan, dense)
    for segment in chain_segments(x, plan, batch_last, [as_dense for *_, as_dense in steps]):
        run = slice(segment.start, segment.stop)
        if segment.fused:
            segment_bias = bias if segment.stop == len(plan) else None
            values, fused = [v for v, *_ in steps[run]], on_chip_steps(plan[run])
            one_by_one = functools.partial(_one_by_one, x, values, plan[run], batch_last, segment_bias)
            if _runs_fused(x, values, fused, batch_last, segment_bias, False, one_by_one):
                y = _fused(x, values, fused, batch_last, segment_bias)
                if y is not None:
                    x = y
                    continue
        for k in range(segment.start, segment.stop):
            values, step, as_dense = steps[k]
            y = _forward_step(x, values, step, batch_last, bias if k == len(plan) - 1 else None)
            x = _nonfinite_as_dense(x, y, step, batch_last) if as_dense else y
    return x


def _one_by_one(x, values, steps, batch_last: bool, bias=None) -> list[torch.Tensor]:
    """Every step's output, the steps one launch each (``bias`` added by the last)."""
    outputs: list[torch.Tensor] = []
    for k, (v, step) in enumerate(zip(values, steps, strict=True)):
        last = k == len(steps) - 1
        outputs.append(_forward_step(outputs[-1] if outputs else x, v, step, batch_last, bias if last else None))
    return outputs


def _runs_fused(x, values, steps, batch_last: bool, bias, taps: bool, one_by_one) -> bool:
    """Whether a fused segment runs fused: always, but on CUDA under ``fuse = "auto"``,
    where its first call timed it faster than its steps one by one (:mod:`~ksfx.ops.race`)."""
    if not race.fusion_applies(x):
        return True
    sides = {"fused": lambda: _fused(x, values, steps, batch_last, bias, taps=taps), "one by one": one_by_one}
    subject = lambda: "fusing " + " -> ".join(map(str, steps)) + (", storing every step" if taps else "")  # noqa: E731
    key = race.race_key(("fused", steps, taps, bias is not None), batch_last, x)
    return race.decide(key, x, sides, subject, batch_last, default="one by one") == "fused"


def run_steps(x, values: list[torch.Tensor], steps: tuple[FactorStep, ...], batch_last: bool) -> list[torch.Tensor]:
    """Every step's output, for ``steps`` whose permutations are on the loads (only the last
    may store through one): fused segments store their intermediates as they go."""
    outputs: list[torch.Tensor] = []
    for segment in chain_segments(x, list(steps), batch_last, [False] * len(steps)):
        run = slice(segment.start, segment.stop)
        one_by_one = functools.partial(_one_by_one, x, values[run], steps[run], batch_last)
        fused = None
        if segment.fused and _runs_fused(x, values[run], steps[run], batch_last, None, True, one_by_one):
            fused = _fused(x, values[run], steps[run], batch_last, taps=True)
        outputs += one_by_one() if fused is None else fused
        x = outputs[-1]
    return outputs


def run_backward(grad, x, factors, chain: Chain, batch_last: bool, need_x: bool):
    """``(dx, [dvalues...])`` with factor gradients in chain order (leftmost first).

    The intermediates are recomputed, and ``dx`` runs as the transposed chain, both in
    fused segments where the implementation has them (:func:`~ksfx.codegen.fusion.backward_plan`);
    one weight-gradient launch per factor reads them.
    """
    plan = _plan(chain)
    if isinstance(plan, PermStep):
        name, impl = chain_implementation(grad)
        stats.record(f"{name}.perm")
        return impl.apply_perm(grad, plan.perm.inverse(), batch_last), []
    values = list(reversed(factors))
    last = len(plan) - 1
    steps = backward_plan(plan, need_x)
    inputs = [x, *run_steps(x, values[:last], steps.recompute, batch_last)]
    transposed_values = [values[k].permute(0, 2, 1, 3) for k in steps.transposed_steps]
    loads = run_steps(grad, transposed_values, steps.transposed, batch_last)  # gradients at steps L-1 .. 0
    grads = []
    for k, step in enumerate(steps.grads):
        dy = grad if k == last else loads[last - 1 - k]
        grads.append(_grad_step(dy, inputs[k], step, batch_last))
    dx = loads[-1].contiguous() if need_x else grad.new_empty(0)
    # contiguous like the fake kernel's outputs: Inductor asserts the strides it was promised
    return dx, [g.contiguous() for g in reversed(grads)]


# ----------------------------------------------------------------------------- the ops
@torch.library.custom_op("ksfx::ks_chain", mutates_args=())
def ks_chain(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    spec: str,
    batch_last: bool,
    bias: torch.Tensor | None,
    dense: int,
) -> torch.Tensor:
    """``y = x @ W.T`` (batch-first) or ``y = W @ x`` (batch-last), ``W`` given by ``spec``.

    ``dense`` is a bit mask over the factors (bit ``k``: factor ``k``, chain order) that replace
    a dense product by a matrix with structural zeros: their outputs keep the NaNs that
    product makes of non-finite inputs. (An int, not a list: autograd handles it as a scalar.)
    """
    chain = Chain.from_spec(spec)
    validate(x, factors, chain, batch_last, bias, dense)
    return run_forward(x, factors, chain, batch_last, bias, dense).contiguous()  # the fake promises contiguous


@ks_chain.register_fake
def _(x, factors, spec, batch_last, bias, dense):
    chain = Chain.from_spec(spec)
    validate(x, factors, chain, batch_last, bias, dense)
    n = x.shape[1] if batch_last else x.shape[0]
    shape = (chain.out_features, n) if batch_last else (n, chain.out_features)
    return x.new_empty(shape)


@torch.library.custom_op("ksfx::ks_chain_backward", mutates_args=())
def ks_chain_backward(
    grad: torch.Tensor, x: torch.Tensor, factors: list[torch.Tensor], spec: str, batch_last: bool, need_x: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return run_backward(grad.contiguous(), x, factors, Chain.from_spec(spec), batch_last, need_x)


@ks_chain_backward.register_fake
def _(grad, x, factors, spec, batch_last, need_x):
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    return dx, [f.new_empty(f.shape) for f in factors]


def setup_context(ctx, inputs, output):
    x, factors, spec, batch_last, bias, _ = inputs
    ctx.save_for_backward(x, *factors)
    ctx.spec, ctx.batch_last, ctx.has_bias = spec, batch_last, bias is not None


def backward_through(backward_op):
    """The autograd formula of a chain op whose backward is ``backward_op`` (same schema
    as ``ksfx::ks_chain_backward``)."""

    def backward(ctx, grad):
        x, *factors = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        dx, dfactors = backward_op(grad, x, factors, ctx.spec, ctx.batch_last, need_x)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[4]:
            dbias = grad.sum(dim=1 if ctx.batch_last else 0)
        return (dx if need_x else None), list(dfactors), None, None, dbias, None

    return backward


ks_chain.register_autograd(backward_through(torch.ops.ksfx.ks_chain_backward), setup_context=setup_context)
