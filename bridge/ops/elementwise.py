"""Elementwise ATen ops: arithmetic, comparisons, activations, casts."""

from __future__ import annotations

import jax.numpy as jnp
import torch

from bridge.ops.registry import lowering

aten = torch.ops.aten


@lowering(aten.add.Tensor, aten.add.Scalar)
def add(ctx, x, y, *, alpha=1):
    x, y = jnp.asarray(x, ctx.dtype), jnp.asarray(y, ctx.dtype)
    return x + y if alpha == 1 else x + alpha * y


@lowering(aten.sub.Tensor, aten.sub.Scalar)
def sub(ctx, x, y, *, alpha=1):
    x, y = jnp.asarray(x, ctx.dtype), jnp.asarray(y, ctx.dtype)
    return x - y if alpha == 1 else x - alpha * y


@lowering(aten.mul.Tensor, aten.mul.Scalar)
def mul(ctx, x, y):
    return jnp.asarray(x, ctx.dtype) * jnp.asarray(y, ctx.dtype)


@lowering(aten.relu.default)
def relu(ctx, x):
    return jnp.maximum(x, 0).astype(ctx.dtype)
