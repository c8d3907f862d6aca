"""No stale state: kernels keyed on everything that changes their code, thread safety, run-time weights.

Kernel tests run the generated Triton kernels through the interpreter (``triton_interpret``)
and compare with the dense matrix of the chain (``Chain.to_dense``) in float64.
"""

from __future__ import annotations

import threading

import pytest
import torch

import ksfx
from ksfx import Chain, DigitPerm, IndexPerm, KSPattern
from tests.reliability.compare import TOL, assert_same, compile_ks
from tests.reliability.models import Factor, ModelSpec, RandomKSModel

#: Chains of the same width (16 -> 16): a kernel reused for the wrong one would not fail on shapes.
SAME_WIDTH = [
    Chain((KSPattern(2, 4, 4, 2),)),
    Chain((KSPattern(4, 2, 2, 2),)),
    Chain((KSPattern(1, 4, 4, 4),)),
    Chain((KSPattern(2, 4, 4, 2), DigitPerm((4, 4), (1, 0)))),
    Chain(
        (
            IndexPerm(tuple(torch.randperm(16, generator=torch.Generator().manual_seed(5)).tolist())),
            KSPattern(4, 4, 4, 1),
        )
    ),  # fmt: skip
    Chain((KSPattern(4, 4, 4, 1), KSPattern(2, 4, 4, 2))),
]


def run_and_check(chain: Chain, dtype: torch.dtype, batch_last: bool, seed: int, n: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(p.as_tuple(), generator=generator, dtype=torch.float64) for p in chain.patterns]
    x = torch.randn((chain.in_features, n) if batch_last else (n, chain.in_features), generator=generator)
    x = x.double()
    dense = chain.to_dense(values)
    expected = dense @ x if batch_last else x @ dense.T
    y = ksfx.ks_matmul(x.to(dtype), [v.to(dtype) for v in values], chain=chain, batch_last=batch_last)
    assert y.dtype == dtype and y.shape == expected.shape
    scale = {"atol": TOL[dtype]["atol"] * 4, "rtol": TOL[dtype]["rtol"]}  # fp16/bf16 inputs are rounded first
    torch.testing.assert_close(y.double(), expected, **scale, msg=lambda m: f"{chain} {dtype} bl={batch_last}: {m}")


def test_kernel_cache_keeps_patterns_layouts_and_dtypes_apart(triton_interpret):
    cases = [(chain, torch.float32, batch_last) for chain in SAME_WIDTH for batch_last in (False, True)]
    cases += [(SAME_WIDTH[3], dtype, False) for dtype in (torch.float16, torch.bfloat16)]
    cases += [(SAME_WIDTH[1], torch.float16, True)]
    ksfx.stats(reset=True)
    for k, case in enumerate(cases + cases[::-1]):  # and again in reverse: cached kernels are reused
        run_and_check(*case, seed=k)
    launches = ksfx.stats()  # per factor, or per fused segment of small-block factors
    assert launches.get("triton-interpret.forward", 0) + launches.get("triton-interpret.forward_chain", 0) >= 2 * len(
        cases
    )


@pytest.mark.parametrize(
    "interpret",
    [
        pytest.param(False, id="cpu"),
        pytest.param(True, id="interpreter"),
    ],
)
def test_concurrent_calls_with_different_patterns(interpret, request):
    """Threads generating and running kernels at once (fresh patterns: the cache fills concurrently)."""
    if interpret:
        request.getfixturevalue("triton_interpret")
    jobs = [
        (Chain((KSPattern(3, 2, 5, 1),)), torch.float32, False),
        (Chain((KSPattern(1, 5, 3, 2),)), torch.float32, True),
        (Chain((KSPattern(5, 3, 2, 1), DigitPerm((5, 2), (1, 0)))), torch.float32, False),
        (Chain((KSPattern(2, 5, 3, 1),)), torch.float16, False),
        (Chain((KSPattern(3, 2, 5, 1),)), torch.float16, True),
    ]
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def work(k, job):
        try:
            barrier.wait()
            for repeat in range(2):
                run_and_check(*job, seed=10 * k + repeat)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k, job)) for k, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- weights at run time
FROZEN = ModelSpec((Factor((2, 3, 4, 2), "einsum"), Factor((3, 2, 4, 1), "bmm")), 16, False)


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu", "interpreter"])
def test_frozen_weights_are_read_at_run_time(interpret, request):
    """Inference weights (requires_grad=False) shape nothing and are not folded: updates are seen."""
    if interpret:
        request.getfixturevalue("triton_interpret")
    model = RandomKSModel(FROZEN, torch.Generator().manual_seed(0)).requires_grad_(False)
    reports = []
    compiled = compile_ks(model, reports)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), model(x), **TOL[torch.float32])
    assert any(c.rewritten for g in reports for c in g.chains)
    for update in (
        lambda: model.step0_w.mul_(-2),  # values change, support kept
        lambda: model.step1_w[0].zero_(),  # support shrinks
        lambda: model.step0_w.copy_(torch.randn_like(model.step0_w)),
    ):
        with torch.no_grad():
            update()
        ksfx.stats(reset=True)
        torch.testing.assert_close(compiled(x), model(x), **TOL[torch.float32])
        assert sum(v for k, v in ksfx.stats().items() if k.endswith((".forward", ".forward_chain"))) >= 1, (
            "left the rewritten chain"
        )


def test_replaced_parameter_object_is_used():
    model = RandomKSModel(FROZEN, torch.Generator().manual_seed(0))
    compiled = compile_ks(model)
    x = torch.randn(3, 16)
    compiled(x)
    model.step0_w = torch.nn.Parameter(torch.randn_like(model.step0_w))
    assert_same(model, compiled, x)
