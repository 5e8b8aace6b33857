"""How lowerings read their operands and write their outputs the way torch does.

The dtype a lowering computes in (the output dtype, torch's promotion of the
operands, or the wider dtype torch accumulates half types in), `dim` and
int-list arguments, and the outputs torch may return empty. Every lowering
module that needs one of these rules imports it from here, so each rule has
one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import torch

from bridge import dtypes


def promoted_dtype(ctx, count: int = 2) -> np.dtype:
    """torch's result type of the node's first `count` operands (tensors or Python scalars)."""
    operands = []
    for arg in ctx.node.args[:count]:
        if isinstance(arg, torch.fx.Node):
            val = arg.meta["val"]
            operands.append(torch.empty((0,) * min(val.ndim, 1), dtype=val.dtype, device="meta"))
        else:
            operands.append(arg)
    dtype = operands[0].dtype if len(operands) == 1 else torch.result_type(*operands)
    return dtypes.canonical_jax_dtype(dtype)


def cast(dtype, *values):
    return [jnp.asarray(v, dtype) for v in values]


def is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def safe_where(pred, x, fill):
    """`x` where `pred` holds, else `fill`: keeps untaken `jnp.where` branches finite (no NaN gradients)."""
    return jnp.where(pred, x, fill)


def is_low_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def accumulation_dtype(dtype):
    """The dtype torch accumulates in: float32 for half types, else `dtype`."""
    return jnp.float32 if is_low_float(dtype) else dtype


def expand_ints(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """An int-list argument broadcast to `n` spatial dims (torch accepts length 1)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def wrap_dim(d: int, ndim: int) -> int:
    """A torch dim (negative allowed; 0-d tensors accept -1 and 0) as 0..ndim-1."""
    return d % max(ndim, 1)


def index_along(dim: int, index) -> tuple:
    """The index tuple that applies `index` along axis `dim`: x[index_along(dim, i)]."""
    return (slice(None),) * dim + (index,)


def empty_or(ctx, i: int, value):
    """`value` cast to output `i`, or an empty array where torch returns one (eval mode)."""
    shape, dtype = ctx.shape_of(i), ctx.dtype_of(i)
    if math.prod(shape) == 0:
        return jnp.zeros(shape, dtype)
    if jnp.size(value) != math.prod(shape):
        return jnp.broadcast_to(value, shape).astype(dtype)
    return jnp.reshape(value, shape).astype(dtype)
