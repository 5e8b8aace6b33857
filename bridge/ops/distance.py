"""Distance ATen ops: cdist, pdist and cosine_similarity.

Norms take torch's zero gradient where a distance is 0, and cdist's
Euclidean distance uses torch's matmul form where torch does.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _safe_norm(diff, p):
    """p-norm over the last axis with torch's zero gradient where the norm is 0."""
    a = jnp.abs(diff)
    if p == 0:
        return jnp.sum((a != 0).astype(diff.dtype), axis=-1)
    if p == 1:
        return jnp.sum(a, axis=-1)
    if p == math.inf:
        return jnp.max(a, axis=-1)
    powered = jnp.sum(jnp.where(a > 0, a, 1) ** p * (a > 0), axis=-1)
    positive = powered > 0
    return jnp.where(positive, jnp.where(positive, powered, 1) ** (1.0 / p), 0)


def _cdist(x1, x2, p, compute_mode):
    p1, p2 = x1.shape[-2], x2.shape[-2]
    mode = 0 if compute_mode is None else compute_mode
    if p == 2 and (mode == 1 or (mode == 0 and (p1 > 25 or p2 > 25))):
        # torch's matmul form (_euclidean_dist): one product of augmented rows
        # [-2a, |a|^2, 1] . [b, 1, |b|^2], so the cancellation happens inside
        # the same sum as torch's; clamped at 0.
        n1 = jnp.sum(jnp.square(x1), -1, keepdims=True)
        n2 = jnp.sum(jnp.square(x2), -1, keepdims=True)
        a = jnp.concatenate([-2 * x1, n1, jnp.ones_like(n1)], axis=-1)
        b = jnp.concatenate([x2, jnp.ones_like(n2), n2], axis=-1)
        sq = jnp.maximum(jnp.matmul(a, jnp.swapaxes(b, -1, -2)), 0)
        positive = sq > 0
        return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)
    return _safe_norm(x1[..., :, None, :] - x2[..., None, :, :], p)


@lowering(aten._cdist_forward.default)
def cdist_forward(ctx, x1, x2, p, compute_mode):
    return jnp.broadcast_to(_cdist(x1, x2, p, compute_mode), ctx.shape).astype(ctx.dtype)


@lowering(aten.cdist.default)
def cdist(ctx, x1, x2, p=2.0, compute_mode=None):
    return jnp.broadcast_to(_cdist(x1, x2, p, compute_mode), ctx.shape).astype(ctx.dtype)


@lowering(aten._pdist_forward.default)
def pdist_forward(ctx, x, p=2.0):
    i, j = np.triu_indices(x.shape[0], k=1)
    return _safe_norm(x[i] - x[j], p).astype(ctx.dtype)


@lowering(aten.cosine_similarity.default)
def cosine_similarity(ctx, x1, x2, dim=1, eps=1e-8):
    x1, x2 = jnp.broadcast_arrays(x1.astype(ctx.dtype), x2.astype(ctx.dtype))
    dim = dim % x1.ndim if x1.ndim else 0
    if x1.ndim == 0:
        x1, x2 = x1.reshape(1), x2.reshape(1)
    n1 = jnp.maximum(jnp.linalg.norm(x1, axis=dim, keepdims=True), eps)
    n2 = jnp.maximum(jnp.linalg.norm(x2, axis=dim, keepdims=True), eps)
    return jnp.sum((x1 / n1) * (x2 / n2), axis=dim).reshape(ctx.shape).astype(ctx.dtype)
