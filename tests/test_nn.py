"""KSLinear as a drop-in for nn.Linear."""

import torch

import ksfx


def test_kslinear_forward_backward_matches_its_dense_weight():
    torch.manual_seed(0)
    layer = ksfx.KSLinear([(2, 3, 4, 1), (1, 4, 2, 2)], dtype=torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    dense = layer.to_dense()
    y = layer(x)
    assert torch.allclose(y, x @ dense.T + layer.bias, atol=1e-12)
    y.square().sum().backward()
    ref = [f.detach().clone().requires_grad_(True) for f in layer.factors]
    bias = layer.bias.detach().clone().requires_grad_(True)
    (x @ layer.chain.to_dense(ref).T + bias).square().sum().backward()
    for f, r in zip(layer.factors, ref, strict=True):
        assert torch.allclose(f.grad, r.grad, atol=1e-10)
    assert torch.allclose(layer.bias.grad, bias.grad, atol=1e-10)


def test_kslinear_init_scale_is_like_nn_linear():
    torch.manual_seed(0)
    layer = ksfx.KSLinear([(16, 16, 16, 1), (1, 16, 16, 16)], bias=False)
    linear = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(512, 256)
    ratio = (layer(x).std() / linear(x).std()).item()
    assert 0.8 < ratio < 1.25, ratio


def test_kslinear_batch_last_and_repr():
    layer = ksfx.KSLinear([(2, 2, 2, 2)], bias=False, batch_last=True)
    x = torch.randn(8, 3)
    assert torch.allclose(layer(x), layer.to_dense() @ x, atol=1e-6)
    assert "patterns=[(2, 2, 2, 2)]" in repr(layer)
