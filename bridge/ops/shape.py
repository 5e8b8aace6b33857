"""Shape and view ATen ops: view, reshape, permute, transpose, expand, cat, ..."""

from __future__ import annotations

import jax.numpy as jnp
import torch

from bridge.ops.registry import lowering

aten = torch.ops.aten


@lowering(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def view(ctx, x, size):
    return jnp.reshape(x, ctx.shape)


@lowering(aten.t.default)
def t(ctx, x):
    return jnp.transpose(x) if x.ndim == 2 else x


@lowering(aten.permute.default)
def permute(ctx, x, dims):
    return jnp.transpose(x, [d % x.ndim for d in dims]) if x.ndim else x
