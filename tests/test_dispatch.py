"""The per-step dispatch policy (decisions only: the GPU timings behind it are in benchmarks/results)."""

import pytest
import torch

from ksfx.config import config
from ksfx.ops import dispatch, torch_path
from ksfx.pattern import FactorStep, KSPattern


@pytest.mark.parametrize(
    "abcd,batch_last,dtype,expected",
    [
        ((256, 2, 2, 32), False, torch.float32, True),  # small blocks: the FMA kernel always
        ((1, 2, 2, 4096), True, torch.bfloat16, True),
        ((6, 64, 64, 1), False, torch.bfloat16, True),  # unit-stride gathers on tensor cores
        ((1, 64, 64, 16), True, torch.float16, True),
        ((1, 768, 192, 2), False, torch.bfloat16, False),  # x read with stride d: bmm
        ((1, 128, 128, 3), True, torch.bfloat16, False),
        ((16, 64, 64, 1), False, torch.float32, False),  # fp32 dots: cuBLAS
    ],
)
def test_policy(abcd, batch_last, dtype, expected):
    assert dispatch.prefers_triton(FactorStep(KSPattern(*abcd)), batch_last, dtype) is expected


def test_cpu_tensors_never_use_the_policy(monkeypatch):
    step = FactorStep(KSPattern(1, 768, 192, 2))
    x = torch.empty(2, 384)
    assert dispatch.step_implementation(x, step, False) == ("cpu", torch_path)
    monkeypatch.setattr(config, "interpret", True)
    name, impl = dispatch.step_implementation(x, step, False)
    assert name == "triton-interpret" and impl is not torch_path
    assert dispatch.step_implementation(x.double(), step, False) == ("cpu", torch_path)
