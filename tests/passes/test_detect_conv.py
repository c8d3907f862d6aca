"""Grouped 1x1 convolutions: KS factors on the channel dimension, spatial positions as batch.

``nn.Conv1d`` / ``nn.Conv2d`` with kernel size 1, stride 1 and no padding multiply the
channels of every position by a block-diagonal matrix: the factor
``(groups, C_out/groups, C_in/groups, 1)``. The channels sit between batch dimensions
(``(N, C, H, W)``), so the op runs batch-last on the input with the channels moved to the
front. Chains of grouped pointwise convolutions with ShuffleNet's channel shuffle between
them are one chain with the shuffle as a permutation. Convolutions that mix or drop
spatial positions are left to the compiler with the reason.

The expected chains are built here from the convolution weights and checked against the
module's channel map (probed with an identity batch of 1x1 images), not against ksfx.
"""

from __future__ import annotations

import pytest
import torch
from ksfx_checks import assert_compiled_matches_eager, compile_ks
from torch import nn

import ksfx
from ksfx.backend import KsfxCompiler
from ksfx.pattern import Chain, DigitPerm, KSPattern


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: ``(groups, per_group)`` channels read as ``(per_group, groups)``."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShufflePointwise(nn.Module):
    """The linear part of a ShuffleNet unit: grouped 1x1 conv, channel shuffle, grouped 1x1 conv."""

    def __init__(self, channels: int, groups: int, first_bias: bool = False):
        super().__init__()
        self.groups = groups
        self.gconv1 = nn.Conv2d(channels, channels, kernel_size=1, groups=groups, bias=first_bias)
        self.gconv2 = nn.Conv2d(channels, channels, kernel_size=1, groups=groups)

    def forward(self, x):
        return self.gconv2(channel_shuffle(self.gconv1(x), self.groups))


def _channel_map(module: nn.Module, channels: int, spatial: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense ``W`` with ``y[n, :, p] = W @ x[n, :, p] + bias``, probed with identity 1x1 images."""
    eye = torch.eye(channels, dtype=torch.float64).reshape(channels, channels, *[1] * spatial)
    with torch.no_grad():
        y = module(eye).reshape(channels, -1)
    return (y - (0 if bias is None else bias)).T


def _shuffle_chain(m: ShufflePointwise) -> tuple[Chain, list[torch.Tensor]]:
    """``P @ KS(1, b, b, g) @ KS(g, b, b, 1)`` for ``C = g * b`` channels, ``g`` dividing ``b``.

    The first conv's output channel ``(hi, lo)`` (``hi < g``) is read by the second conv as
    group ``hi``, in-group channel ``(lo, g1)``: the first factor emits its rows as
    ``(lo, hi)``, the second keeps ``hi`` as its ``d`` index, and its output ``(co, hi)``
    is reordered to the conv's ``(hi, co)``.
    """
    g = m.groups
    b = m.gconv1.weight.shape[0] // g
    w1, w2 = m.gconv1.weight, m.gconv2.weight
    first = w1.reshape(g, g, b // g, b).transpose(1, 2).reshape(g, b, b, 1)
    second = w2.reshape(g, b, b // g, g).permute(1, 3, 2, 0).reshape(1, b, b, g)
    chain = Chain((DigitPerm((b, g), (1, 0)), KSPattern(1, b, b, g), KSPattern(g, b, b, 1)))
    return chain, [second, first]


def _rewritten(report):
    return [c for c in report.chains if c.rewritten]


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (lambda: nn.Conv1d(16, 24, kernel_size=1, groups=4), (3, 16, 5)),
        (lambda: nn.Conv2d(12, 6, kernel_size=1, groups=3, bias=False), (2, 12, 3, 4)),
        (lambda: nn.Conv2d(8, 8, kernel_size=1, groups=8), (2, 8, 3, 3)),  # depthwise 1x1: diagonal
    ],
    ids=["conv1d_bias", "conv2d", "depthwise_1x1"],
)
def test_grouped_pointwise_conv_is_one_factor(conv, shape):
    torch.manual_seed(0)
    model, x = conv(), torch.randn(*shape)
    (chain,) = _rewritten(ksfx.explain(model, x, rewrite="always"))
    g, c_out, c_in = model.groups, model.out_channels, model.in_channels
    pattern = KSPattern(g, c_out // g, c_in // g, 1)
    assert chain.patterns == [pattern.as_tuple()] and not chain.permutations
    assert chain.plan.inner_dims == len(shape) - 2 and (chain.plan.bias is None) == (model.bias is None)
    expected = pattern.to_dense(model.weight.double().reshape(pattern.as_tuple()))
    bias = None if model.bias is None else model.bias.double()
    torch.testing.assert_close(_channel_map(model.double(), c_in, len(shape) - 2, bias), expected)
    assert_compiled_matches_eager(model.float(), x)


@pytest.mark.parametrize(("channels", "groups"), [(8, 2), (18, 3)])
def test_shuffle_between_grouped_convs_is_one_chain(channels, groups):
    torch.manual_seed(0)
    model, x = ShufflePointwise(channels, groups), torch.randn(2, channels, 3, 3)
    (chain,) = _rewritten(ksfx.explain(model, x, rewrite="always"))
    expected, values = _shuffle_chain(model.double())
    assert chain.chain == str(expected) and chain.plan.bias is not None
    dense = _channel_map(model, channels, 2, model.gconv2.bias)
    torch.testing.assert_close(dense, expected.to_dense(values).detach())
    assert_compiled_matches_eager(model.float(), x, min_launches=2)


def test_shuffle_that_cuts_the_groups_is_an_index_permutation():
    """12 channels in 3 groups of 4: the (3, 4) -> (4, 3) shuffle regrouped as 3 groups of 4."""
    torch.manual_seed(0)
    model, x = ShufflePointwise(12, 3), torch.randn(2, 12, 3, 3)
    (chain,) = _rewritten(ksfx.explain(model, x, rewrite="always"))
    assert chain.patterns == [(3, 4, 4, 1), (3, 4, 4, 1)]
    assert [str(p) for p in chain.plan.chain.permutations] == [str(DigitPerm((3, 4), (1, 0)))]
    assert_compiled_matches_eager(model, x, min_launches=2)


def test_conv_bias_in_the_middle_ends_the_first_chain():
    torch.manual_seed(0)
    model, x = ShufflePointwise(8, 2, first_bias=True), torch.randn(2, 8, 3, 3)
    first, second = _rewritten(ksfx.explain(model, x, rewrite="always"))
    assert first.patterns == [(2, 4, 4, 1)] and first.plan.bias is not None
    assert second.root == first.end and second.patterns == [(1, 4, 4, 2)] and second.plan.bias is not None
    assert_compiled_matches_eager(model, x, min_launches=2)


def test_dynamic_batch_and_image_size():
    torch.manual_seed(0)
    model = ShufflePointwise(8, 2)
    reports = []
    torch._dynamo.reset()
    backend = KsfxCompiler(rewrite="always", inner="aot_eager", reports=reports, cpu="op")
    compiled = torch.compile(model, backend=backend)
    for shape in [(2, 8, 3, 3), (3, 8, 4, 5), (5, 8, 2, 7)]:
        x = torch.randn(shape)
        ksfx.stats(reset=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert ksfx.stats().get("cpu.forward", 0) >= 2
    assert len(reports) == 2 and all(c.rewritten for r in reports for c in r.chains)


def test_channels_last_keeps_the_output_layout():
    torch.manual_seed(0)
    model = nn.Conv2d(8, 16, kernel_size=1, groups=2)
    x = torch.randn(2, 8, 3, 5).to(memory_format=torch.channels_last)
    compiled = compile_ks(model)
    expected = model(x)
    assert compiled(x).stride() == expected.stride()
    assert_compiled_matches_eager(model, x, compiled=compiled)


@pytest.mark.parametrize(
    ("conv", "reason"),
    [
        (lambda: nn.Conv2d(8, 8, kernel_size=3, groups=8, padding=1), "a 3x3 kernel mixes spatial positions"),
        (lambda: nn.Conv2d(8, 8, kernel_size=1, groups=2, stride=2), "stride [2, 2] drops spatial positions"),
        (lambda: nn.Conv2d(8, 8, kernel_size=1, groups=2, padding=1), "padding [1, 1] adds positions"),
    ],
    ids=["depthwise_3x3", "strided_1x1", "padded_1x1"],
)
def test_convolutions_that_move_positions_are_left_alone(conv, reason):
    """Refused with the reason; the grouped 1x1 conv after it is still a factor of its own."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(), nn.Conv2d(8, 8, kernel_size=1, groups=2))
    x = torch.randn(2, 8, 6, 6)
    report = ksfx.explain(model, x, rewrite="always")
    (refused,) = [c for c in report.chains if not c.rewritten]
    assert reason in refused.reason and refused.end == "convolution"
    (kept,) = _rewritten(report)
    assert kept.patterns == [(2, 4, 4, 1)] and kept.root == "convolution"
    assert_compiled_matches_eager(model, x)


class ChannelBlocksEinsum(nn.Module):
    """The same layout without a convolution: block-diagonal channel mixing of ``(B, C, T)``."""

    def __init__(self, blocks: int = 4, size: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(blocks, size, size))

    def forward(self, x):
        xb = x.unflatten(1, (self.w.shape[0], -1))  # (B, k, p, T)
        return torch.einsum("bkpt,kqp->bkqt", xb, self.w).flatten(1, 2)


def test_channels_between_batch_dims_without_convolution():
    torch.manual_seed(0)
    model, x = ChannelBlocksEinsum(), torch.randn(2, 12, 5)
    (chain,) = _rewritten(ksfx.explain(model, x, rewrite="always"))
    assert chain.patterns == [(4, 3, 3, 1)] and chain.plan.inner_dims == 1
    assert_compiled_matches_eager(model, x)
