"""Segmented reductions: embedding_bag and segment_reduce.

Both reduce runs of rows (an embedding bag, a segment) with `jax.ops`
segment reductions; segment_reduce's max/min and prod follow torch's
gradient rules at ties, zeros and NaNs through custom VJPs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import torch

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _embedding_bag(ctx, weight, indices, offsets, mode, per_sample_weights, include_last_offset, padding_idx):
    """Bags of embedding rows reduced by sum (mode 0), mean (1) or max (2).

    Returns torch's four outputs: the bags, each index's bag, each bag's size
    and, for max, the index of the row that gave each maximum.
    """
    num_bags = ctx.shape_of(0)[0]
    n = indices.shape[0]
    bag = jnp.searchsorted(offsets, jnp.arange(n), side="right") - 1
    bag = jnp.clip(bag, 0, max(num_bags - 1, 0)).astype(jnp.int32)
    keep = jnp.ones((n,), jnp.bool_)
    if padding_idx is not None and padding_idx >= 0:
        keep = indices != padding_idx
    if include_last_offset:
        keep = keep & (jnp.arange(n) < offsets[-1])
    rows = jnp.take(weight, indices, axis=0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None]
    count = jax.ops.segment_sum(keep.astype(jnp.int32), bag, num_segments=num_bags)
    max_indices = jnp.zeros(ctx.shape_of(3), ctx.dtype_of(3))
    if mode == 2:
        rows = jnp.where(keep[:, None], rows, -jnp.inf)
        out = jax.ops.segment_max(rows, bag, num_segments=num_bags)
        out = jnp.where(count[:, None] > 0, out, 0)
        hit = (rows == out[bag]) & keep[:, None]
        first = jax.ops.segment_min(
            jnp.where(hit, jnp.arange(n)[:, None], n), bag, num_segments=num_bags
        )
        chosen = jnp.take(indices, jnp.clip(first, 0, max(n - 1, 0)))
        max_indices = jnp.where(count[:, None] > 0, chosen, -1).reshape(ctx.shape_of(3)).astype(ctx.dtype_of(3))
    else:
        out = jax.ops.segment_sum(jnp.where(keep[:, None], rows, 0), bag, num_segments=num_bags)
        if mode == 1:
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
    offset2bag = jnp.zeros(ctx.shape_of(1), ctx.dtype_of(1))
    if ctx.shape_of(1) == (n,):
        offset2bag = bag.astype(ctx.dtype_of(1))
    bag_size = jnp.reshape(count, ctx.shape_of(2)) if ctx.shape_of(2) == (num_bags,) else jnp.zeros(ctx.shape_of(2))
    return out.astype(ctx.dtype_of(0)), offset2bag, bag_size.astype(ctx.dtype_of(2)), max_indices


@lowering(aten.embedding_bag.default)
def embedding_bag(
    ctx, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
    per_sample_weights=None, include_last_offset=False,
):
    return _embedding_bag(ctx, weight, indices, offsets, mode, per_sample_weights, include_last_offset, None)


@lowering(aten.embedding_bag.padding_idx, aten._embedding_bag.default)
def embedding_bag_padding_idx(
    ctx, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
    per_sample_weights=None, include_last_offset=False, padding_idx=-1,
):
    return _embedding_bag(ctx, weight, indices, offsets, mode, per_sample_weights, include_last_offset, padding_idx)


def _take_segments(values, segment, num):
    """values[segment] along axis 0, 0 where segment is out of range."""
    valid = segment < num
    picked = jnp.take(values, jnp.where(valid, segment, 0), axis=0)
    return jnp.where(valid.reshape(valid.shape + (1,) * (values.ndim - 1)), picked, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _segment_extreme(x, segment, num, is_max, initial):
    """Per-segment max (min) of the rows of x; NaN propagates; empty -> initial or -inf (inf)."""
    reduce = jax.ops.segment_max if is_max else jax.ops.segment_min
    out = reduce(x, segment, num_segments=num)
    has_nan = jax.ops.segment_max((x != x).astype(jnp.int32), segment, num_segments=num) > 0
    out = jnp.where(has_nan, jnp.nan, out)
    if initial is not None:
        out = jnp.maximum(out, initial) if is_max else jnp.minimum(out, initial)
    return out


def _segment_extreme_fwd(x, segment, num, is_max, initial):
    out = _segment_extreme(x, segment, num, is_max, initial)
    return out, (x, segment, out)


def _segment_extreme_bwd(num, is_max, initial, res, g):
    # torch's rule: the gradient goes to every element equal to its segment's
    # result (or NaN); with several such elements, the positive gradients are
    # split evenly among them (torch leaves negative ones whole).
    x, segment, out = res
    hit = ((x == _take_segments(out, segment, num)) | (x != x)) & (segment < num)[:, None]
    count = jax.ops.segment_sum(hit.astype(x.dtype), segment, num_segments=num)
    grad = jnp.where(hit, _take_segments(g, segment, num), 0)
    ties = _take_segments(count, segment, num)
    grad = jnp.where((ties >= 2) & (grad > 0), grad / jnp.where(ties >= 2, ties, 1), grad)
    return grad, None


_segment_extreme.defvjp(_segment_extreme_fwd, _segment_extreme_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _segment_prod(x, segment, num, initial):
    out = jax.ops.segment_prod(x, segment, num_segments=num)
    return out if initial is None else out * initial


def _segment_prod_fwd(x, segment, num, initial):
    out = _segment_prod(x, segment, num, initial)
    return out, (x, segment, out)


def _segment_prod_bwd(num, initial, res, g):
    # torch's rule: grad * out / x, except at zeros and NaNs, where the
    # product of the other elements (and `initial`) is formed explicitly.
    x, segment, out = res
    inside = (segment < num)[:, None]
    is_zero, is_nan = x == 0, x != x
    special = is_zero | is_nan
    others = jax.ops.segment_prod(jnp.where(special, 1, x), segment, num_segments=num)
    if initial is not None:
        others = others * initial
    zeros = jax.ops.segment_sum(is_zero.astype(jnp.int32), segment, num_segments=num)
    nans = jax.ops.segment_sum(is_nan.astype(jnp.int32), segment, num_segments=num)
    other_zeros = _take_segments(zeros, segment, num) - is_zero
    other_nans = _take_segments(nans, segment, num) - is_nan
    exclusive = jnp.where(
        other_nans > 0, jnp.nan, jnp.where(other_zeros > 0, 0, _take_segments(others, segment, num))
    )
    g_rows = _take_segments(g, segment, num)
    plain = g_rows * _take_segments(out, segment, num) / jnp.where(special, 1, x)
    grad = jnp.where(special, g_rows * exclusive, plain)
    return jnp.where(inside, grad, 0), None


_segment_prod.defvjp(_segment_prod_fwd, _segment_prod_bwd)


@lowering(aten.segment_reduce.default)
def segment_reduce(
    ctx, data, reduce, *, lengths=None, indices=None, offsets=None, axis=0, unsafe=False, initial=None
):
    """Reduce consecutive segments along `axis` ('sum', 'mean', 'max', 'min', 'prod').

    `lengths` (..., S) or `offsets` (..., S + 1) give the segments, batched
    over the dims before `axis`. Elements past the last segment are ignored;
    an empty segment gives `initial`, or 0 / NaN / -inf / inf / 1.
    """
    axis = axis % data.ndim
    out_shape = ctx.shape
    num = out_shape[axis]
    batch = math.prod(data.shape[:axis])
    length = data.shape[axis]
    x = data.reshape(batch * length, -1)
    if offsets is None:
        lens = jnp.reshape(lengths, (batch, num)).astype(jnp.int32)
        offs = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(lens, axis=1)], axis=1)
    else:
        offs = jnp.reshape(offsets, (batch, num + 1)).astype(jnp.int32)
    pos = jnp.arange(length, dtype=jnp.int32)
    seg = jax.vmap(lambda o: jnp.searchsorted(o[1:], pos, side="right"))(offs).astype(jnp.int32)
    inside = (pos[None, :] >= offs[:, :1]) & (seg < num)
    total = batch * num
    segment = jnp.where(inside, seg + (jnp.arange(batch, dtype=jnp.int32) * num)[:, None], total).reshape(-1)
    if reduce in ("sum", "mean"):
        out = jax.ops.segment_sum(x, segment, num_segments=total)
        if initial is not None:
            out = out + initial
        if reduce == "mean":
            count = jax.ops.segment_sum(inside.reshape(-1).astype(jnp.int32), segment, num_segments=total)
            empty = (count == 0)[:, None]
            mean = out / jnp.where(empty, 1, count[:, None]).astype(out.dtype)
            out = jnp.where(empty, jnp.nan if initial is None else initial, mean)
    elif reduce in ("max", "min"):
        out = _segment_extreme(x, segment, total, reduce == "max", initial)
    elif reduce == "prod":
        out = _segment_prod(x, segment, total, initial)
    else:
        raise ValueError(f"segment_reduce: unknown reduction {reduce!r}")
    return out.reshape(out_shape).astype(ctx.dtype)
