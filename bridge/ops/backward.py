"""Lowerings of the `*_backward` ATen ops that torch.export can leave in graphs.

JAX's own autodiff never needs them (it differentiates the forward
lowerings); they exist so that graphs exported from torch code that calls
these ops directly (core ATen includes them) translate too.

Each follows its ATen schema: `output_mask` selects which gradients torch
computes, and a gradient it does not compute is `None` (torch's undefined
tensor). The linear ones (convolution, pooling) are the VJPs of the forward
lowerings in `bridge.ops.conv` and `bridge.ops.pooling`; the normalisations
use torch's closed forms with the saved `mean`/`rstd`, as torch's kernels do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import torch

from bridge.ops.conv import convolve
from bridge.ops.operands import accumulation_dtype
from bridge.ops.pooling import adaptive_average_pool, average_pool
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _masked(ctx, output_mask, grads):
    """Each gradient cast to torch's dtype, or None where output_mask leaves it out."""
    out = []
    for i, (wanted, grad) in enumerate(zip(output_mask, grads, strict=True)):
        if not wanted or grad is None or ctx.out[i] is None:
            out.append(None)
        else:
            out.append(jnp.reshape(grad, ctx.shape_of(i)).astype(ctx.dtype_of(i)))
    return tuple(out)


@lowering(aten.convolution_backward.default)
def convolution_backward(
    ctx, grad_output, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
    output_mask,
):
    """(grad_input, grad_weight, grad_bias) of torch's convolution: the VJP of its forward."""
    dtype = jnp.result_type(x.dtype, weight.dtype)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0] or output_mask[1]:

        def forward(inp, w):
            return convolve(dtype, inp, w, None, stride, padding, dilation, transposed, output_padding, groups)

        _, vjp = jax.vjp(forward, x.astype(dtype), weight.astype(dtype))
        grad_input, grad_weight = vjp(grad_output.astype(dtype))
    if output_mask[2]:
        channel = 1 if grad_output.ndim == weight.ndim else 0  # unbatched: channels first
        axes = tuple(a for a in range(grad_output.ndim) if a != channel)
        grad_bias = jnp.sum(grad_output.astype(accumulation_dtype(grad_output.dtype)), axis=axes)
    return _masked(ctx, output_mask, (grad_input, grad_weight, grad_bias))


def _norm_input_grad(g, xhat, rstd, axes):
    """rstd * (g - mean(g) - xhat * mean(g * xhat)): the gradient through (x - mean) * rstd."""
    count = math.prod(g.shape[a] for a in axes)
    if count == 0:
        return jnp.zeros_like(g)
    mean_g = jnp.sum(g, axis=axes, keepdims=True) / count
    mean_gx = jnp.sum(g * xhat, axis=axes, keepdims=True) / count
    return rstd * (g - mean_g - xhat * mean_gx)


@lowering(aten.native_layer_norm_backward.default)
def native_layer_norm_backward(ctx, grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    k = len(normalized_shape)
    batch = x.shape[: x.ndim - k]
    stats_shape = batch + (1,) * k
    acc = accumulation_dtype(x.dtype)
    g = grad_out.astype(acc)
    mean = jnp.reshape(mean, stats_shape).astype(acc)
    rstd = jnp.reshape(rstd, stats_shape).astype(acc)
    xhat = (x.astype(acc) - mean) * rstd
    norm_axes = tuple(range(x.ndim - k, x.ndim))
    batch_axes = tuple(range(x.ndim - k))
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        gw = g if weight is None else g * weight.astype(acc)
        grad_input = _norm_input_grad(gw, xhat, rstd, norm_axes)
    if output_mask[1] and weight is not None:
        grad_weight = jnp.sum(g * xhat, axis=batch_axes)
    if output_mask[2] and bias is not None:
        grad_bias = jnp.sum(g, axis=batch_axes)
    return _masked(ctx, output_mask, (grad_input, grad_weight, grad_bias))


@lowering(aten.native_group_norm_backward.default)
def native_group_norm_backward(ctx, grad_out, x, mean, rstd, weight, n, c, hxw, group, output_mask):
    acc = accumulation_dtype(x.dtype)
    grouped = (n, group, c // group, hxw)
    g = jnp.reshape(grad_out, grouped).astype(acc)
    mean = jnp.reshape(mean, (n, group, 1, 1)).astype(acc)
    rstd = jnp.reshape(rstd, (n, group, 1, 1)).astype(acc)
    xhat = (jnp.reshape(x, grouped).astype(acc) - mean) * rstd
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        gw = g if weight is None else g * jnp.reshape(weight, (1, group, c // group, 1)).astype(acc)
        grad_input = _norm_input_grad(gw, xhat, rstd, (2, 3))
    if output_mask[1]:
        grad_weight = jnp.sum(jnp.reshape(g * xhat, (n, c, hxw)), axis=(0, 2))
    if output_mask[2]:
        grad_bias = jnp.sum(jnp.reshape(g, (n, c, hxw)), axis=(0, 2))
    return _masked(ctx, output_mask, (grad_input, grad_weight, grad_bias))


def _pool_vjp(forward, grad_output, x):
    """The VJP of a linear pooling `forward` at `x` (its value does not depend on `x`)."""
    _, vjp = jax.vjp(forward, x)
    return vjp(grad_output.astype(x.dtype))[0]


@lowering(aten.avg_pool2d_backward.default)
def avg_pool2d_backward(
    ctx, grad_output, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    def forward(inp):
        return average_pool(
            inp, grad_output.shape, x.dtype, kernel_size, stride, padding, count_include_pad, divisor_override
        )

    return _pool_vjp(forward, grad_output, x).astype(ctx.dtype)


@lowering(aten._adaptive_avg_pool2d_backward.default)
def adaptive_avg_pool2d_backward(ctx, grad_output, x):
    def forward(inp):
        return adaptive_average_pool(inp, grad_output.shape, x.dtype, 2)

    return _pool_vjp(forward, grad_output, x).astype(ctx.dtype)


@lowering(aten.max_pool2d_with_indices_backward.default)
def max_pool2d_with_indices_backward(
    ctx, grad_output, x, kernel_size, stride, padding, dilation, ceil_mode, indices
):
    """grad_output added into the input positions that `indices` (flat per plane) name."""
    lead = x.shape[:-2]
    planes, size = math.prod(lead), x.shape[-2] * x.shape[-1]
    idx = jnp.reshape(indices, (planes, -1)).astype(jnp.int32)
    idx = idx + (jnp.arange(planes, dtype=jnp.int32) * size)[:, None]
    g = jnp.reshape(grad_output, (planes, -1)).astype(accumulation_dtype(grad_output.dtype))
    out = jnp.zeros((planes * size,), g.dtype).at[idx.reshape(-1)].add(g.reshape(-1), mode="drop")
    return out.reshape(x.shape).astype(ctx.dtype)
