"""Neural-network ATen ops: linear, normalisation, attention, dropout, ..."""

from __future__ import annotations

import jax.numpy as jnp
import torch

from bridge.ops.registry import lowering

aten = torch.ops.aten


@lowering(aten.linear.default)
def linear(ctx, x, weight, bias=None):
    y = jnp.matmul(x, weight.T)
    return (y if bias is None else y + bias).astype(ctx.dtype)
