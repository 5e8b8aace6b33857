"""Normalisation ATen ops: layer, group, RMS, batch and instance norm.

Half types are normalised in float32, as torch does. The saved statistics
(mean, rstd) are returned empty where torch returns them empty (eval mode).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.operands import accumulation_dtype, empty_or
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _normalize(x, axes, eps, acc):
    """(x - mean) * rstd over `axes`, with mean and rstd kept (biased variance)."""
    xf = x.astype(acc)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    return (xf - mean) * rstd, mean, rstd


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


@lowering(aten.native_layer_norm.default)
def native_layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    y, mean, rstd = _normalize(x, axes, eps, accumulation_dtype(x.dtype))
    y = _affine(y, weight, bias, tuple(normalized_shape))
    # torch's mean and rstd outputs are not differentiable (no gradient flows back through them).
    mean, rstd = lax.stop_gradient(mean), lax.stop_gradient(rstd)
    return y.astype(ctx.dtype_of(0)), empty_or(ctx, 1, mean), empty_or(ctx, 2, rstd)


@lowering(aten.layer_norm.default)
def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    y, _, _ = _normalize(x, axes, eps, accumulation_dtype(x.dtype))
    return _affine(y, weight, bias, tuple(normalized_shape)).astype(ctx.dtype)


def _group_norm(x, groups, weight, bias, eps):
    n, c = x.shape[0], x.shape[1]
    grouped = x.reshape(n, groups, (c // groups) * math.prod(x.shape[2:]))
    y, mean, rstd = _normalize(grouped, (2,), eps, accumulation_dtype(x.dtype))
    y = _affine(y.reshape(x.shape), weight, bias, (c,) + (1,) * (x.ndim - 2))
    return y, mean.reshape(n, groups), rstd.reshape(n, groups)


def group_norm_channels_last(x, groups, weight, bias, eps):
    """`_group_norm` of a batched (N, *spatial, C) `x` (bridge/layout.py): output, mean, rstd."""
    n, c = x.shape[0], x.shape[-1]
    grouped = x.reshape(n, -1, groups, c // groups)
    y, mean, rstd = _normalize(grouped, (1, 3), eps, accumulation_dtype(x.dtype))
    y = _affine(y.reshape(x.shape), weight, bias, (c,))
    return y, mean.reshape(n, groups), rstd.reshape(n, groups)


@lowering(aten.group_norm.default)
def group_norm(ctx, x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True, channels_last=False):
    # channels_last: `x` and the result are (N, *spatial, C); only bridge/layout.py passes it.
    norm = group_norm_channels_last if channels_last else _group_norm
    return norm(x, num_groups, weight, bias, eps)[0].astype(ctx.dtype)


@lowering(aten.native_group_norm.default)
def native_group_norm(ctx, x, weight, bias, n, c, hxw, group, eps, channels_last=False):
    if channels_last:
        y, mean, rstd = group_norm_channels_last(x, group, weight, bias, eps)
        return y.astype(ctx.dtype_of(0)), empty_or(ctx, 1, mean), empty_or(ctx, 2, rstd)
    y, mean, rstd = _group_norm(x.reshape(n, c, hxw), group, weight, bias, eps)
    return y.reshape(x.shape).astype(ctx.dtype_of(0)), empty_or(ctx, 1, mean), empty_or(ctx, 2, rstd)


@lowering(aten.rms_norm.default)
def rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    return _rms_norm(x, normalized_shape, weight, eps)[0].astype(ctx.dtype)


@lowering(aten._fused_rms_norm.default)
def fused_rms_norm(ctx, x, normalized_shape, weight, eps):
    y, rstd = _rms_norm(x, normalized_shape, weight, eps)
    return y.astype(ctx.dtype_of(0)), empty_or(ctx, 1, rstd)


def _rms_norm(x, normalized_shape, weight, eps):
    acc = accumulation_dtype(x.dtype)
    eps = float(jnp.finfo(x.dtype).eps) if eps is None else eps
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = x.astype(acc)
    rstd = lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight
    return y, rstd


def _channel_shape(x, channel_axis=1):
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    return tuple(shape)


def _batch_stats(x, channel_axis=1):
    channel_axis %= x.ndim
    axes = tuple(a for a in range(x.ndim) if a != channel_axis)
    acc = accumulation_dtype(x.dtype)
    xf = x.astype(acc)
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean.reshape(_channel_shape(x, channel_axis))), axis=axes)
    return mean, var, math.prod(x.shape) // x.shape[channel_axis]


def _batch_norm_apply(x, weight, bias, mean, var, eps, dtype, channel_axis=1):
    shape = _channel_shape(x, channel_axis)
    acc = accumulation_dtype(x.dtype)
    rstd = lax.rsqrt(var.astype(acc) + eps)
    y = (x.astype(acc) - mean.astype(acc).reshape(shape)) * rstd.reshape(shape)
    return _affine(y, weight, bias, shape).astype(dtype), rstd


def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, dtype, channel_axis=1):
    """Batch norm over every axis but `channel_axis` (torch's is 1; bridge/layout.py's -1).

    Returns the output, the saved mean and rstd (no gradient, as in torch)
    and the new running statistics (the old ones when not `training` or when
    there are none).
    """
    if not training:
        y, rstd = _batch_norm_apply(x, weight, bias, running_mean, running_var, eps, dtype, channel_axis)
        return y, jnp.zeros(()), jnp.zeros(()), running_mean, running_var
    if running_mean is None:
        mean, var, _ = _batch_stats(x, channel_axis)
        y, rstd = _batch_norm_apply(x, weight, bias, mean, var, eps, dtype, channel_axis)
        return y, lax.stop_gradient(mean), lax.stop_gradient(rstd), None, None
    return _batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps, dtype, channel_axis)


# channels_last=True: `x` and the output are (N, *spatial, C); only bridge/layout.py passes it.


@lowering(aten._native_batch_norm_legit.default)
def native_batch_norm_legit(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                            channels_last=False):
    # torch updates the running statistics in place here; functional graphs use the _functional op.
    y, mean, rstd, _, _ = batch_norm(x, weight, bias, None if training else running_mean, running_var, training,
                                     momentum, eps, ctx.dtype_of(0), -1 if channels_last else 1)
    return y, empty_or(ctx, 1, mean), empty_or(ctx, 2, rstd)


@lowering(aten._native_batch_norm_legit.no_stats)
def native_batch_norm_legit_no_stats(ctx, x, weight, bias, training, momentum, eps, channels_last=False):
    y, mean, rstd, _, _ = batch_norm(x, weight, bias, None, None, True, momentum, eps, ctx.dtype_of(0),
                                     -1 if channels_last else 1)
    return y, empty_or(ctx, 1, mean), empty_or(ctx, 2, rstd)


@lowering(aten._native_batch_norm_legit_no_training.default)
def native_batch_norm_legit_no_training(ctx, x, weight, bias, running_mean, running_var, momentum, eps,
                                        channels_last=False):
    y, mean, rstd, _, _ = batch_norm(x, weight, bias, running_mean, running_var, False, momentum, eps,
                                     ctx.dtype_of(0), -1 if channels_last else 1)
    return y, empty_or(ctx, 1, mean), empty_or(ctx, 2, rstd)


@lowering(aten._native_batch_norm_legit_functional.default)
def native_batch_norm_legit_functional(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                                       channels_last=False):
    """Batch norm that returns the new running statistics instead of mutating them.

    running = (1 - momentum) * running + momentum * batch, with the batch
    variance unbiased (n / (n - 1)) for running_var, as torch updates it.
    """
    y, mean, rstd, new_mean, new_var = batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
                                                  eps, ctx.dtype_of(0), -1 if channels_last else 1)
    return (
        y,
        empty_or(ctx, 1, mean),
        empty_or(ctx, 2, rstd),
        new_mean.astype(ctx.dtype_of(3)),
        new_var.astype(ctx.dtype_of(4)),
    )


def _batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps, dtype, channel_axis=1):
    """Training-mode batch norm: output, saved mean and rstd, new running stats.

    torch updates the running statistics inside the kernel, outside
    autograd: the update carries no gradient to the input, and the running
    tensor's own gradient passes through unchanged. The same here, so
    gradients match torch.autograd on the exported (functional) graph.
    """
    mean, var, n = _batch_stats(x, channel_axis)
    y, rstd = _batch_norm_apply(x, weight, bias, mean, var, eps, dtype, channel_axis)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * (n / max(n - 1, 1))
    new_mean = running_mean + lax.stop_gradient(new_mean - running_mean)
    new_var = running_var + lax.stop_gradient(new_var - running_var)
    return y, lax.stop_gradient(mean), lax.stop_gradient(rstd), new_mean, new_var


@lowering(aten._batch_norm_with_update_functional.default)
def batch_norm_with_update_functional(ctx, x, weight, bias, running_mean, running_var, momentum, eps,
                                      channels_last=False):
    y, mean, rstd, new_mean, new_var = _batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps,
                                                         ctx.dtype_of(0), -1 if channels_last else 1)
    reserve = jnp.zeros(ctx.shape_of(3), ctx.dtype_of(3))  # cuDNN's workspace; empty on the CPU
    return (y, mean.astype(ctx.dtype_of(1)), rstd.astype(ctx.dtype_of(2)), reserve,
            new_mean.astype(ctx.dtype_of(4)), new_var.astype(ctx.dtype_of(5)))


@lowering(aten.instance_norm.default)
def instance_norm(ctx, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    if not use_input_stats:
        y, _ = _batch_norm_apply(x, weight, bias, running_mean, running_var, eps, ctx.dtype)
        return y
    if running_mean is not None:
        raise NotImplementedError(
            "instance_norm with track_running_stats=True in training mode updates its running "
            "statistics in place, which torch.export does not record, so bridge would drop "
            "the update. Put the InstanceNorm module in eval() mode, or construct it with "
            "track_running_stats=False."
        )
    y, _, _ = _normalize(x, tuple(range(2, x.ndim)), eps, accumulation_dtype(x.dtype))
    return _affine(y, weight, bias, _channel_shape(x)).astype(ctx.dtype)
