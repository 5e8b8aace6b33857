"""The `*_backward` ATen ops (core ATen) called directly in torch code, translated
and run under `jax.jit`, against torch eager (fp32; 1e-4 where many terms sum)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import bridge

aten = torch.ops.aten
g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def check(fn, *tensors, rtol=1e-4, atol=1e-5):
    expected = fn(*tensors)
    got = jax.jit(bridge.torch_to_jax(fn, strict=True))(*[bridge.to_jax(t) for t in tensors])
    exp = [e for e in (expected if isinstance(expected, tuple | list) else [expected])]
    out = got if isinstance(got, tuple | list) else [got]
    assert len(out) == len(exp)
    for o, e in zip(out, exp, strict=True):
        if e is None:
            assert o is None
            continue
        np.testing.assert_allclose(np.asarray(o), e.numpy(), rtol=rtol, atol=atol)


CONV = [  # (x shape, w shape, stride, padding, dilation, transposed, output_padding, groups)
    ((2, 4, 9), (6, 2, 3), [2], [1], [1], False, [0], 2),
    ((2, 3, 8, 7), (4, 3, 3, 2), [1, 2], [1, 0], [2, 1], False, [0, 0], 1),
    ((1, 4, 6, 6), (4, 1, 3, 3), [1, 1], [1, 1], [1, 1], False, [0, 0], 4),  # depthwise
    ((2, 4, 5, 5), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1], True, [1, 0], 1),  # transposed
    ((1, 2, 4, 4, 4), (3, 2, 2, 2, 2), [1, 1, 1], [0, 1, 0], [1, 1, 1], False, [0, 0, 0], 1),
]


@pytest.mark.parametrize("case", CONV, ids=lambda c: f"{len(c[0]) - 2}d{'T' if c[5] else ''}g{c[7]}")
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, False]])
def test_convolution_backward(case, mask):
    xs, ws, stride, padding, dilation, transposed, out_pad, groups = case
    x, w = randn(*xs), randn(*ws)
    out_channels = ws[1] * groups if transposed else ws[0]
    y = aten.convolution(x, w, None, stride, padding, dilation, transposed, out_pad, groups)

    def fn(gy, x, w):
        return aten.convolution_backward(
            gy, x, w, [out_channels], stride, padding, dilation, transposed, out_pad, groups, mask
        )

    check(fn, randn(*y.shape), x, w)


@pytest.mark.parametrize("affine", [True, False])
def test_native_layer_norm_backward(affine):
    x, shape = randn(3, 4, 5), [4, 5]
    w, b = (randn(4, 5), randn(4, 5)) if affine else (None, None)
    _, mean, rstd = aten.native_layer_norm(x, shape, w, b, 1e-5)
    mask = [True, affine, affine]

    def fn(gy, x, mean, rstd, *wb):
        wb = wb or (None, None)
        return aten.native_layer_norm_backward(gy, x, shape, mean, rstd, *wb, mask)

    check(fn, randn(3, 4, 5), x, mean, rstd, *((w, b) if affine else ()))


def test_native_group_norm_backward():
    n, c, hxw, group = 2, 6, 4, 3
    x, w, b = randn(n, c, 2, 2), randn(c), randn(c)
    _, mean, rstd = aten.native_group_norm(x, w, b, n, c, hxw, group, 1e-5)

    def fn(gy, x, mean, rstd, w):
        return aten.native_group_norm_backward(gy, x, mean, rstd, w, n, c, hxw, group, [True, True, True])

    check(fn, randn(n, c, 2, 2), x, mean, rstd, w)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor"),
    [([3, 3], [2, 2], [1, 1], False, True, None), ([2, 3], [2, 1], [0, 1], True, False, None),
     ([3, 3], [3, 3], [0, 0], True, True, 2)],
)
def test_avg_pool2d_backward(kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    x = randn(2, 3, 7, 8)
    y = aten.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)

    def fn(gy, x):
        return aten.avg_pool2d_backward(gy, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)

    check(fn, randn(*y.shape), x)


@pytest.mark.parametrize("out", [(3, 2), (9, 10)])  # smaller and larger than the input
def test_adaptive_avg_pool2d_backward(out):
    x = randn(2, 3, 7, 8)
    y = aten._adaptive_avg_pool2d(x, list(out))
    check(lambda gy, x: aten._adaptive_avg_pool2d_backward(gy, x), randn(*y.shape), x)


@pytest.mark.parametrize(("dilation", "ceil_mode"), [([1, 1], False), ([2, 1], True)])
def test_max_pool2d_with_indices_backward(dilation, ceil_mode):
    x = randn(2, 3, 9, 8)
    args = ([3, 2], [2, 2], [1, 0], dilation, ceil_mode)
    y, idx = aten.max_pool2d_with_indices(x, *args)

    def fn(gy, x, idx):
        return aten.max_pool2d_with_indices_backward(gy, x, *args, idx)

    check(fn, randn(*y.shape), x, idx)
