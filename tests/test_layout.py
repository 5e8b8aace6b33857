"""The layout pass (bridge/layout.py): convolutional regions run channels-last on
the CPU, torch's layout comes back wherever a consumer needs it, and values and
float64 gradients stay torch's."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import enable_x64, float64_gradients
from torch import nn

import bridge
from bridge import layout


class ConvNet(nn.Module):
    """Every place torch's layout must come back: a mid-graph output, a flatten,
    a view that names dimensions, a cat along channels, a residual with a
    torch-layout operand, a broadcast bias, and an op with no channels-last form."""

    def __init__(self, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(8 * 4 * 4, 5)
        self.scale = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))  # (N, 8, 16, 16)
        mid = h * 2.0  # returned: a graph output in the middle of the graph
        p = F.max_pool2d(h, 3, stride=2, padding=1)  # (N, 8, 8, 8)
        c = self.conv2(h)  # (N, 8, 8, 8)
        cat = torch.cat([p, c], dim=1)  # a consumer that names dim 1
        r = self.conv3(cat) + p * self.scale  # residual, broadcast parameter
        s = torch.tanh(r).sum(dim=(2, 3))  # a reduction naming dimensions
        a = F.adaptive_avg_pool2d(r, 4)
        flat = a.flatten(1)  # a flatten
        u = self.up(r)  # transposed convolution back to (N, 4, 16, 16)
        rows = u.view(u.shape[0], 4, -1)  # a view that names dimensions
        return self.head(flat), mid, s, rows.mean(-1), u


def _net(norm: str) -> nn.Module:
    torch.manual_seed(0)
    net = ConvNet(norm).eval()
    if norm == "batch":
        with torch.no_grad():
            net.norm1.running_mean.uniform_(-0.5, 0.5)
            net.norm1.running_var.uniform_(0.5, 1.5)
    return net


def _conv_layouts(fn, *args, **kwargs) -> list[str]:
    """The lhs layout of every convolution in the jaxpr of `fn`, e.g. ['NHWC', ...]."""
    text = str(jax.make_jaxpr(fn)(*args, **kwargs))
    layouts = []
    for part in text.split("conv_general_dilated[")[1:]:
        spec = part.split("lhs_spec=")[1].split(")")[0]
        dims = [int(d) for d in spec.strip("(").split(",") if d.strip()]
        layouts.append("NHWC" if dims[1] == 3 else "NCHW")
    return layouts


SEED64 = 4  # inputs whose relu / max operands sit well away from their kinks (numerics.py checks)


@pytest.fixture
def pass_on(monkeypatch):
    monkeypatch.setitem(layout.CHANNELS_LAST, jax.default_backend(), True)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_forward_matches_torch_with_every_output_in_torch_layout(norm, pass_on):
    net = _net(norm)
    x = torch.randn(2, 3, 16, 16)
    apply, params = bridge.torch_to_jax(net)
    got = jax.jit(apply)(params, bridge.to_jax(x))
    with torch.no_grad():
        expected = net(x)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == tuple(e.shape)
        np.testing.assert_allclose(np.asarray(g), e.numpy(), rtol=1e-5, atol=1e-5)
    # conv1, conv2, the transposed conv; the pointwise conv3 is a dot over the channels
    assert _conv_layouts(apply, params, bridge.to_jax(x)) == ["NHWC"] * 3


def test_pass_off_keeps_torch_layout_and_gives_the_same_values(monkeypatch):
    net = _net("batch")
    x = bridge.to_jax(torch.randn(2, 3, 16, 16))
    monkeypatch.setitem(layout.CHANNELS_LAST, jax.default_backend(), True)
    apply_on, params = bridge.torch_to_jax(net)
    on = jax.jit(apply_on)(params, x)
    monkeypatch.setitem(layout.CHANNELS_LAST, jax.default_backend(), False)
    apply_off, _ = bridge.torch_to_jax(net)
    assert _conv_layouts(apply_off, params, x) == ["NCHW"] * 4
    off = jax.jit(apply_off)(params, x)
    for a, b in zip(on, off, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_float64_gradients_match_torch_autograd(norm, pass_on):
    net = _net(norm)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(SEED64))
    result = float64_gradients(net, args=(x,), outputs=lambda out: list(out), wrt_args=(0,))
    result.check(floor_frac=0.01)


def test_train_mode_batch_norm_state_and_gradients_match_torch(pass_on):
    # float64 on both sides: a float32 gradient through the ReLU would depend on the
    # machine's summation order wherever an operand sits within rounding of zero.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    net.train().double()
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    with enable_x64():
        apply, params, state = bridge.torch_to_jax_with_state(net)

        def loss(p, s):
            y, new_s = apply(p, s, bridge.to_jax(x))
            return (y**2).mean(), new_s

        (value, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, state)
        assert value.dtype == np.float64
        expected = (net(x) ** 2).mean()
        expected.backward()
        assert abs(float(value) - expected.item()) <= 1e-5 * abs(expected.item())
        for name, p in net.named_parameters():
            np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), rtol=1e-4, atol=1e-6)
        for name, b in net.named_buffers():
            np.testing.assert_allclose(np.asarray(new_state[name]), b.numpy(), rtol=1e-5, atol=1e-6)


def test_decision_is_per_backend():
    assert layout.CHANNELS_LAST["cpu"] is True
    assert not any(layout.CHANNELS_LAST[b] for b in ("gpu", "cuda", "rocm", "tpu"))


def test_strided_pointwise_convolution_as_a_dot_has_torch_gradients(pass_on):
    """ResNet's shortcut: a 1x1 stride-2 convolution (lowered as a dot over the
    channels of every second pixel) on an odd-sized input, in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1, stride=2), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(2, 3, 9, 9)
    apply, params = bridge.torch_to_jax(net)
    assert _conv_layouts(apply, params, bridge.to_jax(x)) == ["NHWC"]
    result = float64_gradients(net, args=(x,), wrt_args=(0,))
    result.check(floor_frac=0.01)
