"""On CUDA under ``fuse = "auto"``, a fused segment runs fused only where its first call
timed it faster than its steps one by one (:mod:`ksfx.ops.fusion_race`). Here the clock
is a stand-in: the interpreter runs both sides, and the test says which one was faster."""

from __future__ import annotations

import pytest
import torch

import ksfx
from ksfx.config import config
from ksfx.ops import fusion_race
from ksfx.pattern import FactorStep, KSPattern
from tests.test_fusion import _assert_fp32_matches_float64, butterfly
from tests.test_ks_matmul import dense_of, random_factors


@pytest.fixture
def clock(triton_interpret, monkeypatch):
    """Races on CPU tensors; ``clock.fused_wins`` says which side the stand-in clock favours.
    Each race checks that both sides compute the same outputs."""

    class Clock:
        fused_wins = True
        sides: list[tuple] = []

    def measure(fused, one_by_one):
        fused_out, steps_out = fused(), one_by_one()
        last = fused_out[-1] if isinstance(fused_out, list) else fused_out
        torch.testing.assert_close(last, steps_out[-1], rtol=1e-4, atol=1e-4)
        Clock.sides.append((fused_out, steps_out))
        return (1.0, 2.0) if Clock.fused_wins else (2.0, 1.0)

    monkeypatch.setattr(config, "fuse", "auto")
    monkeypatch.setattr(fusion_race, "applies", lambda x: True)
    monkeypatch.setattr(fusion_race, "_measure", measure)
    fusion_race.forget()
    yield Clock
    fusion_race.forget()


@pytest.mark.parametrize("fused_wins", [True, False], ids=["fused-wins", "steps-win"])
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_a_butterfly_runs_as_its_first_call_timed_it_forward_and_backward(clock, fused_wins, batch_last):
    clock.fused_wins = fused_wins
    patterns = butterfly(8)
    factors = random_factors(patterns, torch.float32, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((8, 7) if batch_last else (7, 8), generator=g, requires_grad=True)
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(x, factors, batch_last=batch_last)
    races = fusion_race.races()
    assert [(r.taps, r.fused, r.batch) for r in races] == [(False, fused_wins, 7)]
    assert races[0].segment == " -> ".join(map(str, [FactorStep(KSPattern(*p)) for p in reversed(patterns)]))
    assert str(races[0]).endswith("fused 1.0 us, one launch per step 2.0 us: fused" if fused_wins else
                                  "fused 2.0 us, one launch per step 1.0 us: one by one")  # fmt: skip
    launches = {"triton-interpret.forward_chain": 1} if fused_wins else {"triton-interpret.forward": 3}
    assert ksfx.stats(reset=True) == {**launches, "fusion.timed": 1}  # the race's own launches not counted
    _assert_fp32_matches_float64(y, x, factors, dense_of, batch_last, g)
    assert [r.taps for r in fusion_race.races()[1:]] == [True, True]  # the backward's recompute and dx
    # a later call at a batch in the same power-of-two bucket times nothing
    ksfx.stats(reset=True)
    ksfx.ks_matmul(x[:, :6] if batch_last else x[:6], factors, batch_last=batch_last)
    assert ksfx.stats() == launches and len(fusion_race.races()) == 3


def test_a_fused_kernel_that_cannot_be_built_loses_its_race(clock, monkeypatch):
    from ksfx.ops import chain_op

    monkeypatch.setattr(chain_op, "_fused", lambda *args, **kwargs: None)
    monkeypatch.setattr(fusion_race, "_measure", _no_kernel)
    factors = random_factors(butterfly(4), torch.float32)
    x = torch.randn(3, 4)
    y = ksfx.ks_matmul(x, factors)
    (race,) = fusion_race.races()
    assert not race.fused and race.fused_us is None and "fused no kernel" in str(race)
    torch.testing.assert_close(y, x @ dense_of(factors).T, rtol=1e-5, atol=1e-5)


def _no_kernel(fused, one_by_one):
    assert fused() is None
    one_by_one()
    return None, 1.0


def test_a_trace_and_a_cuda_graph_capture_time_nothing_and_use_what_was_decided(monkeypatch):
    fusion_race.forget()
    calls = []
    monkeypatch.setattr(fusion_race, "_measure", lambda fused, one_by_one: calls.append(1) or (1.0, 2.0))
    describe = lambda: ("s", "batch-first", "float32", 4, False)  # noqa: E731
    with torch._subclasses.FakeTensorMode():
        fake = torch.empty(4, 8)
    real = torch.empty(4, 8)
    assert fusion_race.runs_fused(None, real, None, None, describe) is False  # a symbolic batch
    assert fusion_race.runs_fused("k", fake, None, None, describe) is False  # nothing decided yet
    assert not calls and not fusion_race.races()
    assert fusion_race.runs_fused("k", real, None, None, describe) is True
    assert fusion_race.runs_fused("k", fake, None, None, describe) is True and calls == [1]
    fusion_race.forget()
    assert fusion_race.bucket(25088) == 32768 and fusion_race.bucket(1) == 1 and fusion_race.bucket(4) == 4
