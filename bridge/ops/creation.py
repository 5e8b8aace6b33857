"""Creation ATen ops: full/zeros/ones/empty (and *_like, new_*), arange, linspace, eye, ...

Sizes, fill values and dtypes are static in an exported graph, so these ops
build their result from torch's recorded output shape and dtype (`ctx`).
`empty*` has no defined contents in torch; bridge fills it with zeros.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _full(ctx, value):
    return jnp.full(ctx.shape, value, ctx.dtype)


@lowering(aten.full.default)
def full(ctx, size, fill_value, **options):
    return _full(ctx, fill_value)


@lowering(aten.full_like.default)
def full_like(ctx, x, fill_value, **options):
    return _full(ctx, fill_value)


@lowering(aten.new_full.default)
def new_full(ctx, x, size, fill_value, **options):
    return _full(ctx, fill_value)


@lowering(aten.scalar_tensor.default)
def scalar_tensor(ctx, s, **options):
    return _full(ctx, s)


@lowering(
    aten.zeros.default,
    aten.empty.memory_format,
    aten.empty_permuted.default,
    aten.empty_strided.default,
)
def zeros(ctx, size, *layout, **options):
    return _full(ctx, 0)


@lowering(aten.zeros_like.default, aten.empty_like.default, aten.zero.default)
def zeros_like(ctx, x, **options):
    return _full(ctx, 0)


@lowering(aten.new_zeros.default, aten.new_empty.default, aten.new_empty_strided.default)
def new_zeros(ctx, x, size, *stride, **options):
    return _full(ctx, 0)


@lowering(aten.ones.default)
def ones(ctx, size, **options):
    return _full(ctx, 1)


@lowering(aten.ones_like.default)
def ones_like(ctx, x, **options):
    return _full(ctx, 1)


@lowering(aten.new_ones.default)
def new_ones(ctx, x, size, **options):
    return _full(ctx, 1)


@lowering(aten.fill.Scalar, aten.fill.Tensor)
def fill(ctx, x, value):
    return jnp.broadcast_to(jnp.asarray(value).astype(ctx.dtype), ctx.shape)


@lowering(aten.copy.default)
def copy(ctx, x, src, non_blocking=False):
    return jnp.broadcast_to(src.astype(ctx.dtype), ctx.shape)


@lowering(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(ctx, *bounds, **options):
    start, step = (0, 1) if len(bounds) == 1 else (bounds[0], bounds[2] if len(bounds) > 2 else 1)
    (n,) = ctx.shape
    if jnp.issubdtype(ctx.dtype, jnp.integer):
        # torch truncates start and step to integers first.
        return int(start) + lax.iota(ctx.dtype, n) * int(step)
    # torch computes start + i * step in double precision, then rounds.
    return jnp.asarray(start + np.arange(n, dtype=np.float64) * step, ctx.dtype)


def _linear_steps(ctx, start, end, steps: int):
    """torch's linspace values: from the start for the first half, from the end after."""
    if steps == 1:
        return jnp.reshape(jnp.asarray(start, jnp.float32), (1,))
    start = jnp.asarray(start, jnp.float32)
    end = jnp.asarray(end, jnp.float32)
    step = (end - start) / (steps - 1)
    i = lax.iota(jnp.float32, steps)
    return jnp.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i))


@lowering(
    aten.linspace.default,
    aten.linspace.Tensor_Tensor,
    aten.linspace.Tensor_Scalar,
    aten.linspace.Scalar_Tensor,
)
def linspace(ctx, start, end, steps, **options):
    if steps == 0:
        return _full(ctx, 0)
    values = _linear_steps(ctx, start, end, steps)
    if jnp.issubdtype(ctx.dtype, jnp.integer):
        values = jnp.trunc(values)
    return values.astype(ctx.dtype)


@lowering(
    aten.logspace.default,
    aten.logspace.Tensor_Tensor,
    aten.logspace.Tensor_Scalar,
    aten.logspace.Scalar_Tensor,
)
def logspace(ctx, start, end, steps, base=10.0, **options):
    if steps == 0:
        return _full(ctx, 0)
    values = jnp.power(jnp.float32(base), _linear_steps(ctx, start, end, steps))
    if jnp.issubdtype(ctx.dtype, jnp.integer):
        values = jnp.trunc(values)
    return values.astype(ctx.dtype)


@lowering(aten.eye.default, aten.eye.m)
def eye(ctx, n, m=None, **options):
    return jnp.eye(*ctx.shape, dtype=ctx.dtype)


@lowering(aten.tril_indices.default)
def tril_indices(ctx, row, col, offset=0, **options):
    return jnp.asarray(np.stack(np.tril_indices(row, offset, col)).reshape(ctx.shape), ctx.dtype)


@lowering(aten.triu_indices.default)
def triu_indices(ctx, row, col, offset=0, **options):
    return jnp.asarray(np.stack(np.triu_indices(row, offset, col)).reshape(ctx.shape), ctx.dtype)
