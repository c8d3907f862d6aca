"""Fused segments: the planner, and the one-launch kernel against dense float64 products."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import ksfx
from ksfx.backend import KsfxCompiler
from ksfx.codegen.chain_source import chain_forward_source
from ksfx.codegen.devices import DEVICES
from ksfx.codegen.fusion import MAX_WIDTH, MIN_GAIN, Ceilings, Segment, ceilings, on_chip_steps, roofline_gain, segments
from ksfx.config import config
from ksfx.ops import dispatch, triton_path
from ksfx.pattern import Chain, DigitPerm, FactorStep, IndexPerm, KSPattern, split_chain
from tests.realworld.layers import MonarchLinear
from tests.test_kernels import dense_step, perm_matrix, random_index_perm
from tests.test_ks_matmul import dense_of, random_factors
from tests.test_properties_op import dense_reference

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def butterfly(n: int) -> list[tuple[int, int, int, int]]:
    """Leftmost first: ``(2^{l-1}, 2, 2, n / 2^l)``."""
    return [(2 ** (level - 1), 2, 2, n >> level) for level in range(1, int(math.log2(n)) + 1)]


def plan_of(patterns) -> list[FactorStep]:
    return split_chain(Chain(tuple(KSPattern(*p) if isinstance(p, tuple) else p for p in patterns)))


# ----------------------------------------------------------------------------- the planner
def test_a_butterfly_is_one_segment():
    assert segments(plan_of(butterfly(1024)), batch_last=False) == [Segment(0, 10, True)]


def test_segments_end_where_the_on_chip_vectors_overflow_and_at_dense_steps():
    # tensor-core and small-block factors fuse together
    mixed = plan_of([(1, 2, 2, 8), (2, 2, 2, 4), (1, 16, 16, 1), (8, 2, 2, 1)])  # applied right to left
    assert segments(mixed, batch_last=False) == [Segment(0, 4, True)]
    # a 2048-wide intermediate leaves a tensor-core tile under 16 rows; small blocks hold 4096
    blocks = plan_of([(1, 4, 4, 256), (64, 16, 32, 1), (128, 16, 16, 1)])
    cut = segments(blocks, batch_last=False)
    assert [(s.start, s.stop, s.fused) for s in cut] == [(0, 1, False), (1, 3, True)]
    assert cut[0].why == "with step 2, a 2048-wide vector on chip leaves under 16 rows for tensor cores"
    assert segments(plan_of(butterfly(MAX_WIDTH)), batch_last=False) == [Segment(0, 12, True)]
    dense = segments(plan_of(butterfly(16)), batch_last=True, dense=[False, True, False, False])
    assert [(s.start, s.stop, s.fused) for s in dense] == [(0, 1, False), (1, 2, False), (2, 4, True)]
    assert dense[1].why == "stands for a dense product" and dense[0].why == "no fusable neighbour"
    wide = plan_of([(1, 2, 2, MAX_WIDTH), (MAX_WIDTH, 2, 2, 1)])
    assert not any(s.fused for s in segments(wide, batch_last=False))


def test_the_planner_counts_the_input_a_strided_first_factor_reads_whole():
    """Batch-first, a tensor-core first factor with d > 1 loads its input tile whole."""
    plan = plan_of([(64, 16, 16, 1), (1, 16, 32, 64)])  # 2048 -> 1024 -> 1024
    assert segments(plan, batch_last=True) == [Segment(0, 2, True)]  # reads γ tiles from memory
    assert not segments(plan, batch_last=False)[0].fused


def test_on_a_gpu_a_run_fuses_only_where_the_roofline_says_fusing_pays():
    h100 = DEVICES["H100"]
    fp32 = ceilings(h100, "float32", "ieee")
    # ten 2x2 factors each move 1024 features in and out; fused, the chain moves them once
    assert roofline_gain(tuple(plan_of(butterfly(1024))), False, fp32) == pytest.approx(10.0)
    assert segments(plan_of(butterfly(1024)), False, ceil=fp32) == [Segment(0, 10, True)]
    # ViT-S/16 MLP-up, 384 -> 384 -> 1536 features: under IEEE its FLOPs on FMA outlast its bytes
    up = plan_of([(1, 768, 192, 2), (6, 64, 64, 1)])
    flops = 2 * 6 * 64 * 64, 2 * 768 * 192 * 2  # per batch row
    bandwidth, ffma = h100.bandwidth, h100.rates["ffma"].flops
    alone = max(768 * 4 / bandwidth, flops[0] / ffma) + max(1920 * 4 / bandwidth, flops[1] / ffma)
    fused = max(1920 * 4 / bandwidth, sum(flops) / ffma)
    assert roofline_gain(tuple(up), True, fp32) == pytest.approx(alone / fused) == pytest.approx(1.03, abs=0.005)
    cut = segments(up, True, ceil=fp32)
    assert [(s.start, s.stop, s.fused) for s in cut] == [(0, 1, False), (1, 2, False)]
    assert cut[0].why == f"fusing steps 1-2 gains 1.03x by the roofline on H100, under {MIN_GAIN}x"
    # on tensor cores (TF32, bf16) its bytes bound it, and the intermediate is a fifth of them
    for dtype, precision in (("float32", "tf32"), ("bfloat16", "-")):
        assert roofline_gain(tuple(up), True, ceilings(h100, dtype, precision)) == pytest.approx(1.4)
        assert segments(up, True, ceil=ceilings(h100, dtype, precision)) == [Segment(0, 2, True)]
    assert segments(up, True) == [Segment(0, 2, True)]  # the interpreter fuses wherever a run fits
    assert segments(up, True, ceil=ceilings(h100, "float32", "ieee", min_gain=0.0)) == [Segment(0, 2, True)]


def test_a_stretch_that_does_not_pay_whole_fuses_the_runs_that_do():
    """Two memory-bound butterfly factors after two FMA-bound ones: fused whole the stretch
    gains under the bar, its last three (or two) steps fused gain over it."""
    plan = plan_of([(512, 2, 2, 1), (256, 2, 2, 2), (1, 1024, 1024, 1), (1, 1024, 1024, 1)])  # applied: heavy twice
    fp32 = ceilings(DEVICES["H100"], "float32", "ieee")
    whole, tail = roofline_gain(tuple(plan), True, fp32), roofline_gain(tuple(plan[1:]), True, fp32)
    assert whole < MIN_GAIN <= tail
    cut = segments(plan, True, ceil=fp32)
    assert [(s.start, s.stop, s.fused) for s in cut] == [(0, 1, False), (1, 4, True)]
    assert (
        cut[0].why
        == f"fusing steps 1-4 gains {whole:.2f}x by the roofline on H100, under {MIN_GAIN}x; steps 2-4 {tail:.2f}x"
    )
    strict = ceilings(DEVICES["H100"], "float32", "ieee", min_gain=1.5)  # only the butterfly pair pays 1.5x
    assert [(s.start, s.stop, s.fused) for s in segments(plan, True, ceil=strict)] == [
        (0, 1, False),
        (1, 2, False),
        (2, 4, True),
    ]
    assert segments(plan, True, ceil=ceilings(DEVICES["H100"], "float32", "ieee", min_gain=0.0)) == [
        Segment(0, 4, True)
    ]


@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_a_chain_cut_between_fused_runs_matches_dense_with_gradients(triton_interpret, monkeypatch, batch_last):
    """The op runs the cut the planner makes on a GPU (ceilings where the 16x16 factor is
    FMA-bound): butterfly pairs fused on either side of it, forward and dx."""
    toy = Ceilings("toy", bandwidth=1e12, ffma=1e14, dots=4e11, itemsize=4, min_gain=1.5)
    monkeypatch.setattr(dispatch, "fusion_ceilings", lambda x: toy)
    patterns = [(1, 2, 2, 8), (2, 2, 2, 4), (1, 16, 16, 1), (4, 2, 2, 2), (8, 2, 2, 1)]
    assert [(s.start, s.stop, s.fused) for s in segments(plan_of(patterns), batch_last, ceil=toy)] == [
        (0, 2, True),
        (2, 3, False),
        (3, 5, True),
    ]
    factors = random_factors(patterns, torch.float32, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((16, 7) if batch_last else (7, 16), generator=g, requires_grad=True)
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(x, factors, batch_last=batch_last)
    assert ksfx.stats() == {"triton-interpret.forward_chain": 2, "triton-interpret.forward": 1}
    _assert_fp32_matches_float64(y, x, factors, dense_of, batch_last, g)


def test_explain_shows_the_cut_under_the_interpreter_and_on_a_gpu(monkeypatch):
    """A 384 -> 1536 Monarch layer: fused under the interpreter; on an H100 fused in bf16,
    per factor in fp32 under IEEE, where FMA bounds it fused or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    layer = MonarchLinear(384, 1536, 6)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        (fp32,) = [line for line in str(ksfx.explain(layer, torch.randn(4, 384))).splitlines() if "kernels:" in line]
    finally:
        torch.set_float32_matmul_precision(saved)
    layer, x = layer.to(torch.bfloat16), torch.randn(4, 384, dtype=torch.bfloat16)
    (bf16,) = [line for line in str(ksfx.explain(layer, x)).splitlines() if "kernels:" in line]
    fused = "steps 1-2 fused in one launch under the interpreter"
    apart = "step 1 alone (fusing steps 1-2 gains 1.08x by the roofline on H100, under 1.1x)"
    assert fp32.split("generated kernels: ")[1].startswith(f"{fused}; on H100 in float32 (matmul precision 'highest')")
    timed = "(each fused segment timed at its first call)"
    assert f"by the roofline: {apart}; step 2 alone" in fp32 and fp32.endswith(timed)
    assert bf16.endswith(f"{fused}; on H100 in bfloat16 by the roofline: the same {timed}")


def test_permutations_move_to_the_next_loads_without_changing_the_product():
    torch.manual_seed(0)
    steps = [
        FactorStep(KSPattern(2, 2, 2, 2), DigitPerm((2, 4), (1, 0)), random_index_perm(8, seed=3)),
        FactorStep(KSPattern(1, 2, 2, 4), random_index_perm(8, seed=4), None),
        FactorStep(KSPattern(2, 2, 2, 2), None, DigitPerm((4, 2), (1, 0))),
    ]
    values = [torch.randn(s.pattern.as_tuple(), dtype=torch.float64) for s in steps]
    moved = on_chip_steps(steps)
    assert all(s.out_perm is None for s in moved[:-1]) and moved[-1].out_perm == steps[-1].out_perm

    def product(chain_steps):
        w = torch.eye(8, dtype=torch.float64)
        for step, v in zip(chain_steps, values, strict=True):
            w = dense_step(step, v) @ w
        return w

    torch.testing.assert_close(product(moved), product(steps), rtol=0, atol=1e-12)


def test_source_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="two or more steps"):
        chain_forward_source((FactorStep(KSPattern(1, 2, 2, 1)),))
    with pytest.raises(ValueError, match="two or more steps"):
        chain_forward_source(tuple(FactorStep(KSPattern(1, 2, 2, 1), None, DigitPerm((1, 2), (1, 0))) for _ in "ab"))


# ----------------------------------------------------------------------------- the kernel
def _reference(steps, values, x, batch_last, bias):
    w = None
    for step, v in zip(steps, values, strict=True):
        m = dense_step(step, v)
        w = m if w is None else m @ w
    x64 = x.double()
    y = w @ x64 if batch_last else x64 @ w.T
    if bias is not None:
        y = y + (bias.double()[:, None] if batch_last else bias.double())
    return y


def _assert_close(actual, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected).abs().max() / scale
    assert err < TOL[dtype], f"max error {err:.3g} > {TOL[dtype]} ({dtype})"


def _assert_fp32_matches_float64(y, x, factors, dense, batch_last, generator):
    """``y`` (fp32, from ``x`` and ``factors``) and the gradients of ``(y * probe).sum()``
    in ``x`` and ``factors`` equal float64 autograd through ``dense(factors)``."""
    x64 = x.detach().double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in factors]
    w = dense(f64)
    want = w @ x64 if batch_last else x64 @ w.T
    _assert_close(y.detach(), want.detach(), torch.float32)
    probe = torch.randn(y.shape, generator=generator)
    grads = torch.autograd.grad((y * probe).sum(), [x, *factors])
    expected = torch.autograd.grad((want * probe.double()).sum(), [x64, *f64])
    for got, ref in zip(grads, expected, strict=True):
        _assert_close(got, ref, torch.float32)


SEGMENTS = {
    "butterfly-16": [FactorStep(KSPattern(*p)) for p in reversed(butterfly(16))],
    # widths 6 -> 12 -> 12 -> 6 (padded to powers of two), an index table and digit permutations between
    "tables-and-odd-widths": [
        FactorStep(KSPattern(3, 4, 2, 1), DigitPerm((2, 3), (1, 0)), None),
        FactorStep(KSPattern(2, 3, 3, 2), random_index_perm(12, seed=5), None),
        FactorStep(KSPattern(1, 3, 6, 2), None, random_index_perm(6, seed=6)),
    ],
    "wide-gamma-loop": [FactorStep(KSPattern(1, 2, 20, 1)), FactorStep(KSPattern(1, 3, 2, 1))],  # c > unroll limit
    # tensor-core factors between small-block ones, a d > 1 one first (read whole batch-first)
    "mixed-blocks": [FactorStep(KSPattern(*p)) for p in reversed([(2, 16, 16, 8), (8, 2, 2, 16), (1, 32, 16, 8)])],
    # 24x24 / 24x20 / 20x24 blocks: masked β and γ tiles, an index table into a tensor-core factor
    "masked-dot-tiles": [
        FactorStep(KSPattern(1, 20, 24, 3)),
        FactorStep(KSPattern(3, 24, 20, 1), random_index_perm(60, seed=7), None),
        FactorStep(KSPattern(1, 24, 24, 3), None, random_index_perm(72, seed=8)),
    ],
}


@pytest.mark.parametrize("name", SEGMENTS)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_segment_matches_dense(triton_interpret, name, batch_last, dtype):
    steps = on_chip_steps(SEGMENTS[name])
    g = torch.Generator().manual_seed(0)
    values = [(torch.randn(s.pattern.as_tuple(), generator=g) / s.pattern.c**0.5).to(dtype) for s in steps]
    n, width_in, width_out = 37, steps[0].pattern.in_features, steps[-1].pattern.out_features
    x = torch.randn((width_in, n) if batch_last else (n, width_in), generator=g).to(dtype)
    bias = torch.randn(width_out, generator=g).to(dtype)
    y = triton_path.chain_forward(x, values, steps, batch_last, bias)
    assert y.shape == ((width_out, n) if batch_last else (n, width_out)) and y.dtype == dtype
    _assert_close(y, _reference(steps, values, x, batch_last, bias), dtype)


def test_fused_segment_reads_strided_inputs(triton_interpret):
    steps = on_chip_steps(SEGMENTS["butterfly-16"])
    values = [torch.randn(s.pattern.as_tuple()) for s in steps]
    x = torch.randn(16, 40)[:, ::2]  # batch-last (16, 20) with strides (40, 2); its transpose batch-first
    for batch_last, xin in ((True, x), (False, x.t())):
        y = triton_path.chain_forward(xin, values, steps, batch_last)
        _assert_close(y, _reference(steps, values, xin, batch_last, None), torch.float32)


@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_butterfly_1024_runs_in_one_forward_launch_with_gradients(triton_interpret, batch_last):
    patterns = butterfly(1024)
    factors = random_factors(patterns, torch.float32, requires_grad=True)
    dense = dense_of([f.detach().double() for f in factors])
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1024, 5) if batch_last else (5, 1024), generator=g, requires_grad=True)
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(x, factors, batch_last=batch_last)
    assert ksfx.stats() == {"triton-interpret.forward_chain": 1}
    want = dense @ x.double() if batch_last else x.double() @ dense.T
    _assert_close(y.detach(), want.detach(), torch.float32)
    probe = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad((y * probe).sum(), [x, *factors])
    # the 9 intermediates recomputed in one launch, dx's transposed chain in another
    assert ksfx.stats() == {"triton-interpret.forward_chain": 3, "triton-interpret.grad_values": 10}
    x64 = x.detach().double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in factors]
    w = dense_of(f64)
    ref = (w @ x64 if batch_last else x64 @ w.T) * probe.double()
    expected = torch.autograd.grad(ref.sum(), [x64, *f64])
    for got, want in zip(grads, expected, strict=True):
        _assert_close(got, want, torch.float32)


#: Chains (leftmost first; a permutation between factors as a chain step) that run in one launch.
ONE_LAUNCH = {
    "monarch-1024": [(1, 32, 32, 32), (32, 32, 32, 1)],
    "vit-qkv": [(1, 192, 48, 2), (2, 48, 192, 1)],
    "vit-mlp-up": [(1, 768, 192, 2), (6, 64, 64, 1)],
    "vit-mlp-down": [(1, 128, 128, 3), (6, 64, 256, 1)],
    "table-between": [(4, 16, 16, 2), random_index_perm(128, seed=9), (2, 16, 16, 4)],
    "monarch-256": [(1, 16, 16, 16), (16, 16, 16, 1)],  # 16-bit: blocks merged in δ pairs and α pairs
}


@pytest.mark.parametrize("dtype, precision", [(torch.float16, "highest"), (torch.float32, "high"),
                                              (torch.float32, "highest")], ids=["fp16", "tf32", "ieee"])  # fmt: skip
def test_small_tensor_core_blocks_run_merged_into_zero_padded_ones(triton_interpret, monkeypatch, dtype, precision):
    """The fused kernel of a 16x16-block Monarch pair multiplies 32x32 blocks on tensor
    cores (δ pairs, α pairs, zeros between), FMA dots under IEEE keep theirs; the product
    is the same (the one-launch test above checks values and gradients)."""
    launched = []
    real = triton_path.chain_plan
    monkeypatch.setattr(
        triton_path, "chain_plan", lambda steps, *a, **k: launched.append(steps) or real(steps, *a, **k)
    )
    patterns = ONE_LAUNCH["monarch-256"]
    factors = [torch.randn(p).to(dtype) / 4 for p in patterns]
    x = torch.randn(5, 256).to(dtype)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        y = ksfx.ks_matmul(x, factors)
    finally:
        torch.set_float32_matmul_precision(saved)
    merged = [(8, 32, 32, 1), (1, 32, 32, 8)] if precision != "highest" or dtype != torch.float32 else None
    assert [s.pattern.as_tuple() for s in launched[0]] == (merged or [p for p in reversed(patterns)])
    want = x.double() @ dense_of([f.double() for f in factors]).T
    tol = 2e-2 if precision == "high" else TOL[dtype] * 4  # TF32 rounds the operands to 10 bits
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def _dense_chain(steps, factors):
    """Leftmost-first dense product of KS factors (``dense_of``) and permutation matrices."""
    w, values = None, iter(factors)
    for step in steps:
        m = perm_matrix(step) if isinstance(step, IndexPerm) else dense_of([next(values)])
        w = m if w is None else w @ m
    return w


@pytest.mark.parametrize("name", ONE_LAUNCH)
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_tensor_core_chains_run_in_one_forward_launch_with_gradients(triton_interpret, name, batch_last, dtype):
    steps = [s if isinstance(s, IndexPerm) else KSPattern(*s) for s in ONE_LAUNCH[name]]
    chain = Chain(tuple(steps))
    g = torch.Generator().manual_seed(2)
    factors = [
        (torch.randn(s.as_tuple(), generator=g) / s.c**0.5).to(dtype).requires_grad_()
        for s in steps
        if isinstance(s, KSPattern)
    ]
    shape = (chain.in_features, 5) if batch_last else (5, chain.in_features)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(x, factors, batch_last=batch_last, chain=chain)
    assert ksfx.stats() == {"triton-interpret.forward_chain": 1}
    probe = torch.randn(y.shape, generator=g).to(dtype)
    grads = torch.autograd.grad((y * probe).sum(), [x, *factors])
    if name in ("monarch-1024", "table-between"):  # (the ViT chains' transposed first factors are wider)
        # backward: one launch recomputes the intermediate, one runs dx's transposed chain
        want_stats = {"forward_chain": 2, "forward": 1, "grad_values": 2}
        assert ksfx.stats() == {f"triton-interpret.{k}": v for k, v in want_stats.items()}
    x64 = x.detach().double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in factors]
    w = _dense_chain(steps, f64)
    want = w @ x64 if batch_last else x64 @ w.T
    _assert_close(y.detach(), want.detach(), dtype)
    expected = torch.autograd.grad((want * probe.double()).sum(), [x64, *f64])
    for got, ref in zip(grads, expected, strict=True):
        _assert_close(got, ref, dtype)


def test_fused_segments_keep_the_per_factor_launches_non_finite_values(triton_interpret, monkeypatch):
    """inf / nan reach the same outputs, fused or not: the γ tiles of the 24x20 blocks
    overhang c, and those lanes must add zero, not 0 x a non-finite feature of another block."""
    factors = random_factors([(4, 24, 20, 1), (4, 20, 20, 1)], torch.float32)  # block-diagonal twice
    x = torch.randn(3, 80)
    x[0, 3], x[1, 45] = float("inf"), float("nan")  # blocks 0 and 2
    ksfx.stats(reset=True)
    fused = ksfx.ks_matmul(x, factors)
    assert ksfx.stats() == {"triton-interpret.forward_chain": 1}
    monkeypatch.setattr(config, "fuse", "never")
    apart = ksfx.ks_matmul(x, factors)
    finite = apart.isfinite()
    assert finite[0].sum() == finite[1].sum() == 72 and finite[2].all()  # only the blocks they touch
    assert torch.equal(fused.isnan(), apart.isnan()) and torch.equal(fused.isinf(), apart.isinf())
    torch.testing.assert_close(fused[finite], apart[finite], rtol=1e-5, atol=1e-5)


def test_fusion_can_be_switched_off(triton_interpret, monkeypatch):
    monkeypatch.setattr(config, "fuse", "never")
    factors = random_factors(butterfly(16), torch.float32)
    ksfx.stats(reset=True)
    ksfx.ks_matmul(torch.randn(3, 16), factors)
    assert ksfx.stats() == {"triton-interpret.forward": 4}
    monkeypatch.setattr(config, "fuse", "sometimes")
    with pytest.raises(ValueError, match="fuse must be"):
        ksfx.ks_matmul(torch.randn(3, 16), factors)


def test_index_tables_are_read_in_the_fused_kernel():
    source = chain_forward_source(on_chip_steps(SEGMENTS["tables-and-odd-widths"]))
    assert "in_table1_ptr +" in source and "out_table_ptr +" in source and "in_table0_ptr +" not in source
    assert isinstance(SEGMENTS["tables-and-odd-widths"][1].in_perm, IndexPerm)


@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_a_tensor_core_factor_looks_its_table_up_in_gamma_runs(batch_last):
    """The γ tile of one (α, δ) is one contiguous run of the table (feature order has the
    entries d = 32 apart); a small-block factor keeps feature order (its rows run along δ)."""
    steps = on_chip_steps(plan_of([(1, 32, 32, 32), random_index_perm(1024, seed=9), (32, 32, 32, 1)]))
    source = chain_forward_source(steps, batch_last, "bfloat16", False, "-")
    assert "tl.load(in_table1_ptr + 1024*alpha_1 + 32*delta_1 + gamma_1)" in source
    small = on_chip_steps(plan_of([(1, 2, 2, 8), random_index_perm(16, seed=9), (8, 2, 2, 1)]))
    assert "in_table1_ptr + 16*alpha_1 + delta_1 + 8*gamma_1" in chain_forward_source(small, batch_last)


# ----------------------------------------------------------------------------- through torch.compile
class MonarchMLP(nn.Module):
    """``x + down(gelu(up(x)))`` with Monarch layers written as m2 writes them (reshape, bmm, transpose)."""

    def __init__(self, features: int, hidden: int, nblocks: int):
        super().__init__()
        self.up = MonarchLinear(features, hidden, nblocks)
        self.down = MonarchLinear(hidden, features, nblocks)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


def test_a_compiled_ks_mlp_block_runs_each_chain_in_one_launch(triton_interpret):
    """backend="ksfx" through the custom_op path (the interpreter): each 16x16-block Monarch
    chain is one fused launch forward, and outputs and gradients equal eager's."""
    torch.manual_seed(0)
    model = MonarchMLP(256, 512, 16)
    x = torch.randn(6, 256)
    reports: list = []
    compiled = torch.compile(model, backend=KsfxCompiler(rewrite="always", inner="aot_eager", reports=reports))
    ksfx.stats(reset=True)
    y = compiled(x.clone().requires_grad_())
    assert ksfx.stats() == {"triton-interpret.forward_chain": 2}
    assert [len(c.patterns) for graph in reports for c in graph.chains if c.rewritten] == [2, 2]
    assert_matches_eager(y, model(x.clone().requires_grad_()), list(model.parameters()))


def assert_matches_eager(y, y_eager, params, tol=1e-4, grad_tol=1e-4):
    """``y`` and the gradients of ``(y * probe).sum()`` in ``params`` equal eager's."""
    torch.testing.assert_close(y, y_eager, rtol=tol, atol=tol)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y)
    got = torch.autograd.grad((y * probe).sum(), params)
    want = torch.autograd.grad((y_eager * probe).sum(), params)
    for g_got, g_want in zip(got, want, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=grad_tol, atol=grad_tol)


# ----------------------------------------------------------------------------- any cut, any chain
#: Width-32 patterns of every kernel mode: small blocks, tensor-core blocks (d > 1 too).
WIDTH_32 = [
    (16, 2, 2, 1),
    (4, 2, 2, 4),
    (1, 2, 2, 16),
    (8, 4, 4, 1),
    (2, 4, 4, 4),
    (2, 16, 16, 1),
    (1, 32, 32, 1),
    (1, 16, 16, 2),
]


#: Tensor-core factors FMA-bound 40-80x over their bytes, the bar at 1.8x: they run alone.
SLOW_DOTS = Ceilings("toy", 1e12, 1e14, 1e11, 4, 1.8)
#: Small-block pairs on either side of an FMA-bound tensor-core factor, a permutation at one cut.
MIDDLE = Chain(
    (KSPattern(16, 2, 2, 1), DigitPerm((4, 8), (1, 0)), KSPattern(2, 4, 4, 4), KSPattern(1, 16, 16, 2))
    + (KSPattern(8, 4, 4, 1), KSPattern(1, 2, 2, 16))
)


@st.composite
def cut_chains(draw):
    """2-5 width-32 factors, a digit permutation sometimes between them, and toy ceilings
    (FMA-bound or memory-bound tensor-core factors, memory-bound small blocks, a bar) that
    make the planner cut the chain anywhere."""
    steps = []
    for k in range(draw(st.integers(2, 5))):
        if k and draw(st.integers(0, 3)) == 0:
            steps.append(DigitPerm((4, 8), (1, 0)))
        steps.append(KSPattern(*draw(st.sampled_from(WIDTH_32))))
    # per batch row a factor moves 256 bytes (0.26 ns); a 32x32 block's 2048 FLOPs take 0.02-20 ns
    dots = draw(st.sampled_from([1e11, 1e12, 1e13, 1e14]))
    toy = Ceilings("toy", 1e12, 1e14, dots, 4, draw(st.sampled_from([0.0, 1.3, 1.8])))
    return Chain(tuple(steps)), toy


@settings(max_examples=max(8, settings().max_examples // 2))
@given(case=cut_chains(), batch_last=st.booleans())
@example(
    case=(Chain(tuple(KSPattern(*p) for p in [(16, 2, 2, 1), (4, 2, 2, 4), (1, 32, 32, 1)])), SLOW_DOTS),
    batch_last=False,
)
@example(case=(MIDDLE, SLOW_DOTS), batch_last=True)
@example(case=(MIDDLE, SLOW_DOTS), batch_last=False)
def test_every_cut_the_planner_makes_on_a_gpu_matches_dense_with_gradients(
    triton_interpret, monkeypatch, case, batch_last
):
    """Whatever runs fuse (their first factor in the middle of the chain, a permutation at
    the cut), the op equals the float64 product, forward and backward."""
    chain, toy = case
    monkeypatch.setattr(dispatch, "fusion_ceilings", lambda x: toy)
    fused = sum(s.fused for s in segments(split_chain(chain), batch_last, ceil=toy))
    generator = torch.Generator().manual_seed(len(chain.steps))
    factors = [torch.randn(p.as_tuple(), generator=generator).requires_grad_() for p in chain.patterns]
    x = torch.randn((32, 5) if batch_last else (5, 32), generator=generator, requires_grad=True)
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(x, factors, chain=chain, batch_last=batch_last)
    assert ksfx.stats().get("triton-interpret.forward_chain", 0) == fused
    _assert_fp32_matches_float64(y, x, factors, lambda f64: dense_reference(chain, f64), batch_last, generator)
