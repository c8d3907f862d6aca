"""``ks_matmul``: the user-facing functional form of the KS chain op."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ksfx.pattern import Chain, KSPattern


def chain_of(factors: Sequence[torch.Tensor]) -> Chain:
    """The chain of factors given by their value tensors, checking that widths match."""
    return Chain.from_spec(_spec_of(factors)[0])


def _spec_of(factors: Sequence[torch.Tensor]) -> tuple[str, int, int]:
    if isinstance(factors, torch.Tensor) or len(factors) == 0:
        raise TypeError("factors must be a non-empty list of value tensors of shapes (a, b, c, d)")
    for k, values in enumerate(factors):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"factor {k} must be a torch.Tensor of shape (a, b, c, d), got {type(values).__name__}")
        if values.ndim != 4:
            raise ValueError(f"factor {k} must have 4 dims (a, b, c, d), got shape {tuple(values.shape)}")
    return _spec_of_shapes(tuple(tuple(int(s) for s in values.shape) for values in factors))


_SPECS: dict[tuple, tuple[str, int, int]] = {}


@torch.compiler.assume_constant_result
def _spec_of_shapes(shapes: tuple[tuple[int, int, int, int], ...]) -> tuple[str, int, int]:
    """``(spec, in_features, out_features)`` of a plain product of factors, memoised.

    Factor shapes are static, so compiled code treats the result as a constant; it is
    made of plain values because Dynamo cannot read properties of a constant object.
    (A dict, not ``functools.lru_cache``: Dynamo ignores the mark on the cache wrapper.)
    """
    if shapes not in _SPECS:
        _SPECS[shapes] = _build_spec(shapes)
    return _SPECS[shapes]


_NAMES: dict[str, str] = {}


@torch.compiler.assume_constant_result
def _chain_name(spec: str) -> str:
    """The printed chain (``KS(2, 3, 4, 2) @ …``) for error messages, also under Dynamo."""
    if spec not in _NAMES:
        _NAMES[spec] = str(Chain.from_spec(spec))
    return _NAMES[spec]


def _build_spec(shapes: tuple[tuple[int, int, int, int], ...]) -> tuple[str, int, int]:
    patterns = [KSPattern(*shape) for shape in shapes]
    for k in range(len(patterns) - 1):
        left, right = patterns[k], patterns[k + 1]
        if left.in_features != right.out_features:
            raise ValueError(
                f"factors {k} and {k + 1} do not chain: factor {k} {left} takes a*c*d = {left.in_features} "
                f"features but factor {k + 1} {right} produces a*b*d = {right.out_features}"
            )
    chain = Chain(tuple(patterns))
    return chain.to_spec(), chain.in_features, chain.out_features


def ks_matmul(
    x: torch.Tensor,
    factors: Sequence[torch.Tensor],
    *,
    batch_last: bool = False,
    bias: torch.Tensor | None = None,
    chain: Chain | None = None,
) -> torch.Tensor:
    """Multiply by ``W = K_1 @ … @ K_L`` (``factors[0]`` is ``K_1``, leftmost first).

    Batch-first (default): ``y = x @ W.T`` over the last dimension of ``x`` (any leading
    shape). Batch-last: ``y = W @ x`` for ``x`` of shape ``(in_features, n)``.
    ``chain`` may describe permutations between the factors; by default it is the plain
    product of the factors. Differentiable in ``x``, every factor and ``bias``. Factor
    sizes and dtypes are checked by the op itself (also at compile time, by its fake).
    Under ``backend="ksfx"`` with CUDA inputs the call becomes the ``triton_op`` form,
    whose kernels Inductor launches (:mod:`ksfx.ops.triton_op`).
    """
    factors = list(factors)
    if chain is None:
        spec, in_features, out_features = _spec_of(factors)
    else:
        spec, in_features, out_features = chain.to_spec(), chain.in_features, chain.out_features
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if batch_last:
        if x.ndim != 2:
            raise ValueError(
                f"batch-last input must have shape (in_features={in_features}, n) for the chain "
                f"{_chain_name(spec)}, got {tuple(x.shape)}"
            )
        x2d = x
    else:
        if x.ndim < 1 or x.shape[-1] != in_features:
            raise ValueError(
                f"input of shape {tuple(x.shape)} has {x.shape[-1] if x.ndim else 'no'} features; "
                f"the chain {_chain_name(spec)} takes {in_features} (batch-first: last dimension)"
            )
        x2d = x.reshape(-1, in_features)
    y = torch.ops.ksfx.ks_chain(x2d, factors, spec, batch_last, bias, 0)
    return y if batch_last else y.reshape(*x.shape[:-1], out_features)
