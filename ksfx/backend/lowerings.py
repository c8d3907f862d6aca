"""Inductor lowerings of ksfx's helper ops, registered when the backend first runs Inductor."""

from __future__ import annotations

import functools

import torch


@functools.cache
def register() -> None:
    """``ksfx::as_buffer``: ``t`` stored as a contiguous buffer, the readers then load that buffer."""
    from torch._inductor.ir import as_storage_and_layout, is_contiguous_storage_and_layout
    from torch._inductor.lowering import clone, register_lowering

    @register_lowering(torch.ops.ksfx.as_buffer.default, type_promotion_kind=None)
    def _as_buffer(t):
        if not is_contiguous_storage_and_layout(t):  # a view that moves data, or a computation
            t = clone(t)
            t.realize()
        # Fixed now: a flexible layout may later be given the strides of the producer's input.
        as_storage_and_layout(t, freeze=True, want_contiguous=True)
        return t
