"""On CUDA, which implementation runs is decided by timing a choice's first call
(:mod:`ksfx.ops.race`): a fused segment against its steps one launch each, a step's
generated kernel against the plain-torch path. Here the clock is a stand-in: the
interpreter runs every side, and the test says which one was faster."""

from __future__ import annotations

import pytest
import torch

import ksfx
from ksfx.config import config
from ksfx.ops import chain_op, race
from ksfx.pattern import FactorStep, KSPattern
from tests.test_fusion import _assert_fp32_matches_float64, butterfly
from tests.test_ks_matmul import dense_of, random_factors

#: Microseconds the stand-in clock gives each side unless a test says otherwise.
TIMES = {"fused": 1.0, "one by one": 2.0, "generated kernel": 1.0, "torch": 2.0}


def stand_in_clock(times: dict[str, float]):
    """A ``race._measure`` that runs every side, checks that they agree, and returns ``times``."""

    def measure(sides):
        outs = {label: side() for label, side in sides.items()}
        ran = [out[-1] if isinstance(out, list) else out for out in outs.values() if out is not None]
        tol = 1e-4 if ran[0].dtype == torch.float32 else 1e-2
        for out in ran[1:]:
            torch.testing.assert_close(out, ran[0], rtol=tol, atol=tol)
        return {label: None if out is None else times[label] for label, out in outs.items()}

    return measure


@pytest.fixture
def clock(triton_interpret, monkeypatch):
    """Races on CPU tensors under the interpreter; ``clock.times`` are the stand-in's."""

    class Clock:
        times = dict(TIMES)

    monkeypatch.setattr(config, "fuse", "auto")
    monkeypatch.setattr(config, "dispatch", "auto")
    monkeypatch.setattr(race, "applies", lambda x: True)
    monkeypatch.setattr(race, "_measure", lambda sides: stand_in_clock(Clock.times)(sides))
    race.forget()
    yield Clock
    race.forget()


def _fusions() -> list[race.Race]:
    return [r for r in race.races() if r.subject.startswith("fusing")]


@pytest.mark.parametrize("fused_wins", [True, False], ids=["fused-wins", "steps-win"])
@pytest.mark.parametrize("batch_last", [False, True], ids=["bfirst", "blast"])
def test_a_butterfly_runs_as_its_first_call_timed_it_forward_and_backward(clock, fused_wins, batch_last):
    clock.times["fused"] = 1.0 if fused_wins else 3.0
    patterns = butterfly(8)
    factors = random_factors(patterns, torch.float32, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((8, 7) if batch_last else (7, 8), generator=g, requires_grad=True)
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(x, factors, batch_last=batch_last)
    (fusion,) = _fusions()
    assert ksfx.races() == race.races()
    steps = " -> ".join(map(str, [FactorStep(KSPattern(*p)) for p in reversed(patterns)]))
    layout = "batch-last" if batch_last else "batch-first"
    assert str(fusion) == (
        f"fusing {steps} ({layout}, float32, batch 7): fused {clock.times['fused']:.1f} us, "
        f"one by one 2.0 us: {'fused' if fused_wins else 'one by one'}"
    )
    # the steps one by one raced their generated kernels against torch (the kernels won)
    assert len(race.races()) == 4 and all(r.winner == "generated kernel" for r in race.races() if r not in _fusions())
    launches = {"triton-interpret.forward_chain": 1} if fused_wins else {"triton-interpret.forward": 3}
    assert ksfx.stats(reset=True) == launches  # the races' own launches not counted
    _assert_fp32_matches_float64(y, x, factors, dense_of, batch_last, g)
    assert [", storing every step" in r.subject for r in _fusions()] == [False, True, True]  # recompute, dx
    # a later call at a batch in the same power-of-two bucket times nothing
    timed = len(race.races())
    ksfx.stats(reset=True)
    ksfx.ks_matmul(x[:, :6] if batch_last else x[:6], factors, batch_last=batch_last)
    assert ksfx.stats() == launches and len(race.races()) == timed


@pytest.mark.parametrize("generated_wins", [True, False], ids=["kernel-wins", "torch-wins"])
def test_each_step_runs_the_implementation_its_first_call_timed_faster(clock, monkeypatch, generated_wins):
    """fp16 Monarch factors with a bias, fusion off: each step races its generated kernel
    against the plain-torch path, forward and weight gradient."""
    monkeypatch.setattr(config, "fuse", "never")
    clock.times["torch"] = 2.0 if generated_wins else 0.5
    patterns = [(1, 4, 4, 4), (4, 4, 4, 1)]
    factors = [f / 2 for f in random_factors(patterns, torch.float16)]
    x = torch.randn(9, 16, dtype=torch.float16)
    bias = torch.randn(16, dtype=torch.float16)
    ksfx.stats(reset=True)
    y = ksfx.ks_matmul(x, factors, bias=bias)
    impl = "triton-interpret" if generated_wins else "cpu"
    assert ksfx.stats() == {f"{impl}.forward": 2}
    subjects = [r.subject for r in race.races()]
    assert subjects == ["forward of KS(4, 4, 4, 1)", "forward of KS(1, 4, 4, 4)"]
    want = x.double() @ dense_of([f.double() for f in factors]).T + bias.double()
    torch.testing.assert_close(y.double(), want, rtol=4e-3, atol=4e-3)


def test_a_fused_kernel_that_cannot_be_built_loses_its_race(clock, monkeypatch):
    monkeypatch.setattr(chain_op, "_fused", lambda *args, **kwargs: None)
    factors = random_factors(butterfly(4), torch.float32)
    x = torch.randn(3, 4)
    y = ksfx.ks_matmul(x, factors)
    (fusion,) = _fusions()
    assert fusion.winner == "one by one" and "fused could not run, one by one 2.0 us" in str(fusion)
    torch.testing.assert_close(y, x @ dense_of(factors).T, rtol=1e-5, atol=1e-5)


def test_a_trace_and_a_cuda_graph_capture_time_nothing_and_use_what_was_decided(monkeypatch):
    race.forget()
    calls = []
    monkeypatch.setattr(race, "_measure", lambda sides: calls.append(1) or {"a": 2.0, "b": 1.0})
    sides = {"a": None, "b": None}
    with torch._subclasses.FakeTensorMode():
        fake = torch.empty(4, 8)
    real = torch.empty(4, 8)
    assert race.decide(None, real, sides, lambda: "s", False, default="a") == "a"  # a symbolic batch without a hint
    assert race.decide("k", fake, sides, lambda: "s", False, default="a") == "a"  # nothing decided yet
    assert not calls and not race.races()
    assert race.decide("k", real, sides, lambda: "s", False, default="a") == "b"
    assert race.decide("k", fake, sides, lambda: "s", False, default="a") == "b" and calls == [1]
    race.forget()
    assert race.bucket(25088) == 32768 and race.bucket(1) == 1 and race.bucket(4) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_races_time_every_side_and_the_product_stays(dtype):
    """On a GPU with the defaults: a 256 butterfly and a 16x16-block Monarch pair, forward
    and backward, each choice timed once with real times, the product equal to dense."""
    race.forget()
    for patterns in (butterfly(256), [(1, 16, 16, 16), (16, 16, 16, 1)]):
        factors = [(f / f.shape[2] ** 0.5).cuda().to(dtype).requires_grad_() for f in random_factors(patterns, dtype)]
        x = torch.randn(4096, 256, device="cuda", dtype=dtype, requires_grad=True)
        y = ksfx.ks_matmul(x, factors)
        y.sum().backward()
        want = x.detach().double() @ dense_of([f.detach().double().cpu() for f in factors]).cuda().T
        tol = 2e-3 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    races = race.races()
    assert any(r.subject.startswith("fusing") for r in races) and any(" of KS(" in r.subject for r in races)
    assert all(us is None or us > 0 for r in races for _, us in r.times)
    timed = len(races)
    ksfx.ks_matmul(x, factors)
    assert len(race.races()) == timed  # decided once
    race.forget()
