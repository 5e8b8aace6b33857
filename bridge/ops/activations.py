"""Activation ATen ops: the nonlinearities of torch.nn.functional.

relu and its variants, elu/selu/celu, gelu, silu, mish, the sigmoid family,
softplus, glu, prelu and the shrink functions. (softmax and log_softmax, which
normalise over a dimension, live with attention in `attention.py`.)

Gradients follow torch's conventions at the kinks (hardtanh gives a zero
gradient at its bounds where clamp does not, relu is 0 at 0), so several
activations are written with `jnp.where` rather than `jnp.maximum`/`jnp.clip`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch

from bridge.ops.families import unary
from bridge.ops.operands import cast, safe_where
from bridge.ops.registry import lowering

aten = torch.ops.aten


unary(aten.sigmoid.default, jax.nn.sigmoid)


@lowering(aten.relu.default)
def relu(ctx, x):
    return jnp.where(x > 0, x, jnp.zeros_like(x)).astype(ctx.dtype)


@lowering(aten.threshold.default)
def threshold(ctx, x, threshold, value):
    (x,) = cast(ctx.dtype, x)
    return jnp.where(x > threshold, x, jnp.asarray(value, ctx.dtype))


@lowering(aten.hardtanh.default)
def hardtanh(ctx, x, min_val=-1.0, max_val=1.0):
    # Unlike clamp, torch gives hardtanh a zero gradient at the bounds.
    x, lo, hi = cast(ctx.dtype, x, min_val, max_val)
    return jnp.where(x <= lo, lo, jnp.where(x >= hi, hi, x))


@lowering(aten.relu6.default)
def relu6(ctx, x):
    return hardtanh(ctx, x, 0.0, 6.0)


@lowering(aten.leaky_relu.default)
def leaky_relu(ctx, x, negative_slope=0.01):
    return jnp.where(x > 0, x, x * negative_slope).astype(ctx.dtype)


def _elu(x, alpha, scale, input_scale):
    negative = alpha * jnp.expm1(safe_where(x > 0, 0, x) * input_scale)
    return scale * jnp.where(x > 0, x, negative)


@lowering(aten.elu.default)
def elu(ctx, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return _elu(x, alpha, scale, input_scale).astype(ctx.dtype)


@lowering(aten.selu.default)
def selu(ctx, x):
    alpha, scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    return _elu(x, alpha, scale, 1.0).astype(ctx.dtype)


@lowering(aten.celu.default)
def celu(ctx, x, alpha=1.0):
    return _elu(x, alpha, 1.0, 1.0 / alpha).astype(ctx.dtype)


@lowering(aten.gelu.default)
def gelu(ctx, x, *, approximate="none"):
    return jax.nn.gelu(x, approximate=approximate == "tanh").astype(ctx.dtype)


@lowering(aten.silu.default)
def silu(ctx, x):
    return (x * jax.nn.sigmoid(x)).astype(ctx.dtype)


@lowering(aten.mish.default)
def mish(ctx, x):
    return (x * jnp.tanh(jax.nn.softplus(x))).astype(ctx.dtype)


@lowering(aten.hardsigmoid.default)
def hardsigmoid(ctx, x):
    inside = (x > -3) & (x < 3)
    return jnp.where(inside, x / 6 + 0.5, jnp.where(x <= -3, 0.0, 1.0)).astype(ctx.dtype)


@lowering(aten.hardswish.default)
def hardswish(ctx, x):
    return jnp.where(x < -3, 0.0, jnp.where(x <= 3, x * (x + 3) / 6, x)).astype(ctx.dtype)


@lowering(aten.softplus.default)
def softplus(ctx, x, beta=1.0, threshold=20.0):
    linear = x * beta > threshold
    return jnp.where(linear, x, jnp.log1p(jnp.exp(safe_where(linear, 0, x * beta))) / beta).astype(ctx.dtype)


@lowering(aten.log_sigmoid.default)
def log_sigmoid(ctx, x):
    return jax.nn.log_sigmoid(x).astype(ctx.dtype)


@lowering(aten.log_sigmoid_forward.default)
def log_sigmoid_forward(ctx, x):
    # The second output is the buffer torch's backward reads (exp(-|x|) on CPU).
    buffer = jnp.broadcast_to(jnp.exp(-jnp.abs(x)), ctx.shape_of(1)).astype(ctx.dtype_of(1))
    return jax.nn.log_sigmoid(x).astype(ctx.dtype_of(0)), buffer


@lowering(aten.glu.default)
def glu(ctx, x, dim=-1):
    a, b = jnp.split(x, 2, axis=dim)
    return (a * jax.nn.sigmoid(b)).astype(ctx.dtype)


@lowering(aten.prelu.default)
def prelu(ctx, x, weight):
    if weight.size > 1 and x.ndim >= 2:
        weight = weight.reshape((-1,) + (1,) * (x.ndim - 2))
    elif weight.size == 1:
        weight = weight.reshape(())
    return jnp.where(x > 0, x, weight * x).astype(ctx.dtype)


@lowering(aten._prelu_kernel.default)
def prelu_kernel(ctx, x, weight):
    return jnp.where(x > 0, x, weight * x).astype(ctx.dtype)


@lowering(aten.hardshrink.default)
def hardshrink(ctx, x, lambd=0.5):
    return jnp.where(jnp.abs(x) > lambd, x, 0).astype(ctx.dtype)


@lowering(aten.softshrink.default)
def softshrink(ctx, x, lambd=0.5):
    return jnp.where(x > lambd, x - lambd, jnp.where(x < -lambd, x + lambd, 0)).astype(ctx.dtype)
