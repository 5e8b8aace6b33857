"""Softmax and attention ATen ops: softmax, log_softmax, safe softmax, and
scaled dot-product attention (the math, flash and efficient variants).

softmax lives here rather than with the activations: it normalises over a
dimension, and attention is built on it (the masked rows of attention are a
safe softmax's zero rows).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import torch

from bridge.ops.operands import accumulation_dtype, empty_or
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _softmax_input(x, dim, dtype):
    x = x.astype(accumulation_dtype(dtype))
    if x.ndim == 0:
        return x.reshape(1), 0
    return x, dim % x.ndim


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax_of(x, axis):
    """jax.nn.softmax with torch's derivative, taken from the output: y * (dx - sum(y * dx)).

    JAX differentiates exp(x - max) / sum through the division; compiled
    under jit, that leaves a small nonzero gradient on a saturated row (y is
    1 and 0s, where torch's formula gives exactly 0), which the layers after
    it amplify (multi-head attention: 2e-3 where torch, float64 and a central
    difference give 0; without jit the same expression gives 0).
    """
    return jax.nn.softmax(x, axis=axis)


@_softmax_of.defjvp
def _softmax_of_jvp(axis, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _softmax_of(x, axis)
    return y, y * (dx - jnp.sum(y * dx, axis=axis, keepdims=True))


@lowering(aten._softmax.default)
def _softmax(ctx, x, dim, half_to_float):
    x, dim = _softmax_input(x, dim, x.dtype)
    return _softmax_of(x, dim).reshape(ctx.shape).astype(ctx.dtype)


@lowering(aten._log_softmax.default)
def _log_softmax(ctx, x, dim, half_to_float):
    x, dim = _softmax_input(x, dim, x.dtype)
    return jax.nn.log_softmax(x, axis=dim).reshape(ctx.shape).astype(ctx.dtype)


@lowering(aten.softmax.int)
def softmax(ctx, x, dim, dtype=None):
    x, dim = _softmax_input(x.astype(ctx.dtype), dim, ctx.dtype)
    return _softmax_of(x, dim).reshape(ctx.shape).astype(ctx.dtype)


@lowering(aten.log_softmax.int)
def log_softmax(ctx, x, dim, dtype=None):
    x, dim = _softmax_input(x.astype(ctx.dtype), dim, ctx.dtype)
    return jax.nn.log_softmax(x, axis=dim).reshape(ctx.shape).astype(ctx.dtype)


def _safe_softmax_impl(x, dim):
    """Softmax whose fully masked (all -inf) rows are 0 instead of NaN.

    The masked rows go through the softmax as zeros, so that their gradient
    is 0 like torch's, not the NaN that a softmax of -inf rows back-propagates.
    """
    masked_rows = jnp.all(x == -jnp.inf, axis=dim, keepdims=True)
    out = _softmax_of(jnp.where(masked_rows, 0.0, x), dim)
    return jnp.where(masked_rows, 0.0, out)


@lowering(aten._safe_softmax.default)
def safe_softmax(ctx, x, dim, dtype=None):
    x, dim = _softmax_input(x.astype(ctx.dtype), dim, ctx.dtype)
    return _safe_softmax_impl(x, dim).reshape(ctx.shape).astype(ctx.dtype)


# --------------------------------------------------------------------------- attention


def _attention(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa=False):
    """torch's math SDPA; returns (output, logsumexp of the scaled scores)."""
    dtype = q.dtype
    acc = accumulation_dtype(dtype)
    length, source, depth = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(depth) if scale is None else scale
    if enable_gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        k = jnp.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
        v = jnp.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)
    scores = jnp.matmul(
        q.astype(acc) * scale, jnp.swapaxes(k.astype(acc), -1, -2), preferred_element_type=acc
    )
    if is_causal:
        causal = jnp.tril(jnp.ones((length, source), jnp.bool_))
        scores = jnp.where(causal, scores, -jnp.inf)
    if mask is not None:
        if mask.dtype == jnp.bool_:
            scores = jnp.where(mask, scores, -jnp.inf)
        else:
            scores = scores + mask.astype(acc)
    lse = jax.nn.logsumexp(scores, axis=-1)
    weights = _safe_softmax_impl(scores, -1)
    if dropout_p > 0:
        keep = jax.random.bernoulli(ctx.key(), 1.0 - dropout_p, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_p), 0.0)
    out = jnp.matmul(weights, v.astype(acc), preferred_element_type=acc)
    return out.astype(dtype), lse


@lowering(aten.scaled_dot_product_attention.default)
def scaled_dot_product_attention(
    ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
):
    return _attention(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0].astype(ctx.dtype)


@lowering(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_flash_cpu(ctx, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    out, lse = _attention(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale)
    return out.astype(ctx.dtype_of(0)), empty_or(ctx, 1, lse)


@lowering(aten._scaled_dot_product_efficient_attention.default)
def sdpa_efficient(ctx, q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    out, lse = _attention(ctx, q, k, v, attn_bias, dropout_p, is_causal, scale)
    # torch pads the logsumexp's query axis to a multiple of 32; positions past
    # the real queries hold no values anyone reads.
    lse_shape = ctx.shape_of(1)
    if math.prod(lse_shape):
        pad = lse_shape[-1] - lse.shape[-1]
        lse = jnp.pad(lse, [(0, 0)] * (lse.ndim - 1) + [(0, pad)], constant_values=jnp.inf)
    seed = jnp.zeros(ctx.shape_of(2), ctx.dtype_of(2))
    offset = jnp.zeros(ctx.shape_of(3), ctx.dtype_of(3))
    return out.astype(ctx.dtype_of(0)), empty_or(ctx, 1, lse), seed, offset
