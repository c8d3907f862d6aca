"""Triton source of a fused segment: several factor steps in one launch (see :mod:`~ksfx.codegen.fusion`).

``forward_chain``: program = one batch tile. It loads the tile's input features once
(runtime strides, so both layouts and strided inputs, like the per-factor kernels), then
for each factor computes output row ``(α, β, δ)`` as ``Σ_γ values[α, β, γ, δ] · h[col]``
with ``h`` the previous factor's output held on chip (``tl.gather`` along the features)
and ``col`` the index map of the per-factor kernels (permutations included), and
stores the last factor's output through its store map. Widths are padded to powers of
two; padded rows are masked to zero. Accumulation is fp32 throughout: intermediates are
not rounded to the input dtype between factors.
"""

from __future__ import annotations

from ksfx.codegen import index_maps as im
from ksfx.codegen.source import FORWARD_EPILOGUE, HEADER, gamma_loop
from ksfx.codegen.tiling import next_pow2
from ksfx.pattern import ROW, FactorStep

CHAIN_KERNEL = '''
@triton.jit
def forward_chain(
    x_ptr, y_ptr, bias_ptr, {value_ptrs}, {table_ptrs}, out_table_ptr,
    n, stride_xm, stride_xf, stride_ym, stride_yf,
    HAS_BIAS: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """{count} factor steps, program = batch tile, the feature vector on chip between them:
{listing}
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    if INT64:
        offs_m = offs_m.to(tl.int64)
    feature = tl.arange(0, {width_in})
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + feature[None, :] * stride_xf
    h = tl.load(x_ptrs, mask={x_mask}, other=0.0).to(tl.float32)
{factors}
{epilogue}'''

FACTOR = """    # step {k}: {step}
    row = tl.arange(0, {width})
    mask_r = row < {rows}
    alpha = {alpha}
    beta = {beta}
    delta = {delta}
    acc = tl.full((BLOCK_M, {width}), 0.0, tl.float32)
    for gamma in {gamma_range}:
        col = {col}
        w = tl.load(v{k}_ptr + {v_offset}{w_mask}).to(tl.float32)
        acc += tl.gather(h, tl.broadcast_to(col[None, :], (BLOCK_M, {width})), 1) * w[None, :]
    h = acc
"""


def _factor(k: int, step: FactorStep) -> str:
    p = step.pattern
    width = next_pow2(p.out_features)
    full = width == p.out_features
    alpha, beta, delta = im.row_digits(step)
    col = im.code(im.through(step.in_perm, p.col_expr, f"in_table{k}_ptr"), mask=None if full else "mask_r")
    return FACTOR.format(
        k=k,
        step=step,
        width=width,
        rows=p.out_features,
        alpha=im.code(alpha),
        beta=im.code(beta),
        delta=im.code(delta),
        gamma_range=gamma_loop(p.c),
        # Padded rows read column 0: any in-range index, their weight is masked to zero.
        col=col if full else f"tl.where(mask_r, {col}, 0)",
        v_offset=im.code(im.value_offset(step, strided=False)),
        w_mask="" if full else ", mask=mask_r, other=0.0",
    )


def chain_forward_source(steps: tuple[FactorStep, ...]) -> str:
    """Module source of ``forward_chain`` for ``steps`` (application order, from
    :func:`~ksfx.codegen.fusion.on_chip_steps`: only the last step has an ``out_perm``)."""
    if len(steps) < 2 or any(s.out_perm is not None for s in steps[:-1]):
        raise ValueError("a fused segment takes two or more steps, with permutations moved to the loads")
    for before, after in zip(steps, steps[1:], strict=False):
        if before.pattern.out_features != after.pattern.in_features:
            raise ValueError(f"{before} gives {before.pattern.out_features} features, {after} takes another count")
    first, last = steps[0].pattern, steps[-1].pattern
    width_in = next_pow2(first.in_features)
    rows = last.out_features
    full = next_pow2(rows) == rows
    epilogue = FORWARD_EPILOGUE.format(
        y_feature=im.code(im.through(im.store_perm(steps[-1]), ROW, "out_table_ptr"), mask=None if full else "mask_r"),
        mask="mask_r",
        full=str(full),
    )
    x_mask = "mask_m[:, None]"
    if width_in != first.in_features:
        x_mask += f" & (feature < {first.in_features})[None, :]"
    body = CHAIN_KERNEL.format(
        value_ptrs=", ".join(f"v{k}_ptr" for k in range(len(steps))),
        table_ptrs=", ".join(f"in_table{k}_ptr" for k in range(len(steps))),
        count=len(steps),
        listing="\n".join(f"    {k}: {s}" for k, s in enumerate(steps)),
        width_in=width_in,
        x_mask=x_mask,
        factors="".join(_factor(k, s) for k, s in enumerate(steps)),
        epilogue=epilogue,
    )
    return HEADER.format(step=f"a fused segment of {len(steps)} steps") + body
