"""fft ATen ops.

torch.fft.* reaches the graph as three primitives. Their `normalization`
argument is torch's internal `fft_norm_mode`: 0 leaves the transform
unscaled, 1 scales by 1/sqrt(n), 2 by 1/n, where n is the number of points of
the transformed signal; `forward` (c2c) picks the sign of the exponent. So each
lowering computes the unscaled transform and applies that scale itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import torch

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _scale(y: jnp.ndarray, normalization: int, n: int) -> jnp.ndarray:
    if normalization == 1:
        return y / math.sqrt(n)
    if normalization == 2:
        return y / n
    return y


def _size(shape: Sequence[int], dims: Sequence[int]) -> int:
    return math.prod(shape[d] for d in dims)


@lowering(aten._fft_r2c.default)
def _fft_r2c(ctx, x, dim, normalization, onesided):
    dim = [d % x.ndim for d in dim]
    if onesided:
        y = jnp.fft.rfftn(x, axes=dim)
    else:
        y = jnp.fft.fftn(x.astype(ctx.dtype), axes=dim)
    return _scale(y, normalization, _size(x.shape, dim)).astype(ctx.dtype)


@lowering(aten._fft_c2c.default)
def _fft_c2c(ctx, x, dim, normalization, forward):
    dim = [d % x.ndim for d in dim]
    if not dim:
        return x.astype(ctx.dtype)
    if forward:
        y = jnp.fft.fftn(x, axes=dim)
    else:
        y = jnp.fft.ifftn(x, axes=dim, norm="forward")  # the unscaled inverse
    return _scale(y, normalization, _size(x.shape, dim)).astype(ctx.dtype)


@lowering(aten._fft_c2r.default)
def _fft_c2r(ctx, x, dim, normalization, last_dim_size):
    dim = [d % x.ndim for d in dim]
    sizes = [x.shape[d] for d in dim[:-1]] + [int(last_dim_size)]
    y = jnp.fft.irfftn(x, s=sizes, axes=dim, norm="forward")  # the unscaled inverse
    return _scale(y, normalization, math.prod(sizes)).astype(ctx.dtype)
