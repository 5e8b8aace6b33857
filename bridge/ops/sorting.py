"""Sorting and selection ATen ops: sort, argsort, topk, kthvalue, median, mode.

The indices are computed first and the values gathered through them, so the
gradient reaches exactly the element torch's backward scatters into.
"""

from __future__ import annotations

import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.reductions import axis_of, gather_along, unkeep
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _argsort(x, axis, descending):
    """Stable sort indices along `axis`, NaN largest (torch's order); ties keep their order."""
    n = x.shape[axis]
    if descending:
        x = jnp.flip(x, axis)
    positions = lax.broadcasted_iota(jnp.int32, x.shape, axis)
    _, order = lax.sort((x, positions), dimension=axis, is_stable=True, num_keys=1)
    if descending:
        order = n - 1 - jnp.flip(order, axis)
    return order


def _sort(ctx, x, dim, descending):
    axis = axis_of(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    order = _argsort(lax.stop_gradient(x), axis, descending)
    return gather_along(x, order, axis), order.astype(ctx.dtype_of(1))


@lowering(aten.sort.default)
def sort(ctx, x, dim=-1, descending=False):
    return _sort(ctx, x, dim, descending)


@lowering(aten.sort.stable)
def sort_stable(ctx, x, *, stable=None, dim=-1, descending=False):
    return _sort(ctx, x, dim, descending)


@lowering(aten.argsort.default)
def argsort(ctx, x, dim=-1, descending=False):
    axis = axis_of(x, dim)
    if axis is None:
        return jnp.zeros((), ctx.dtype)
    return _argsort(x, axis, descending).astype(ctx.dtype)


@lowering(aten.argsort.stable)
def argsort_stable(ctx, x, *, stable, dim=-1, descending=False):
    return argsort(ctx, x, dim, descending)


@lowering(aten.topk.default)
def topk(ctx, x, k, dim=-1, largest=True, sorted=True):
    axis = axis_of(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    order = _argsort(lax.stop_gradient(x), axis, descending=largest)
    order = lax.slice_in_dim(order, 0, k, axis=axis)
    return gather_along(x, order, axis), order.astype(ctx.dtype_of(1))


@lowering(aten.kthvalue.default)
def kthvalue(ctx, x, k, dim=-1, keepdim=False):
    axis = axis_of(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    order = lax.slice_in_dim(_argsort(lax.stop_gradient(x), axis, False), k - 1, k, axis=axis)
    return unkeep(gather_along(x, order, axis), axis, keepdim), unkeep(order, axis, keepdim).astype(ctx.dtype_of(1))


def _median_position(x, axis, ignore_nan):
    """Position, in ascending sorted order along `axis`, of torch's (lower) median."""
    n = x.shape[axis]
    nans = jnp.sum(jnp.isnan(x), axis=axis, keepdims=True) if jnp.issubdtype(x.dtype, jnp.inexact) else 0
    if ignore_nan:
        return jnp.maximum((n - nans - 1) // 2, 0) * jnp.ones_like(nans)
    return jnp.where(nans > 0, n - nans, (n - 1) // 2)


def _median_dim(x, dim, keepdim, ignore_nan, index_dtype=jnp.int32):
    axis = axis_of(x, dim)
    if axis is None:
        return x, jnp.zeros((), index_dtype)
    order = _argsort(lax.stop_gradient(x), axis, False)
    position = _median_position(lax.stop_gradient(x), axis, ignore_nan)
    index = jnp.take_along_axis(order, jnp.asarray(position, order.dtype), axis=axis)
    return unkeep(gather_along(x, index, axis), axis, keepdim), unkeep(index, axis, keepdim).astype(index_dtype)


@lowering(aten.median.dim)
def median_dim(ctx, x, dim, keepdim=False):
    return _median_dim(x, dim, keepdim, ignore_nan=False, index_dtype=ctx.dtype_of(1))


@lowering(aten.nanmedian.dim)
def nanmedian_dim(ctx, x, dim, keepdim=False):
    return _median_dim(x, dim, keepdim, ignore_nan=True, index_dtype=ctx.dtype_of(1))


@lowering(aten.median.default)
def median(ctx, x):
    return jnp.reshape(_median_dim(jnp.ravel(x), 0, False, ignore_nan=False)[0], ())


@lowering(aten.nanmedian.default)
def nanmedian(ctx, x):
    return jnp.reshape(_median_dim(jnp.ravel(x), 0, False, ignore_nan=True)[0], ())


@lowering(aten.mode.default)
def mode(ctx, x, dim=-1, keepdim=False):
    """Most frequent value (the smallest on ties) and the last index where it occurs."""
    axis = axis_of(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    order = _argsort(lax.stop_gradient(x), axis, False)
    ordered = jnp.take_along_axis(lax.stop_gradient(x), order, axis=axis)
    positions = lax.broadcasted_iota(jnp.int32, x.shape, axis)
    previous = jnp.concatenate([lax.slice_in_dim(ordered, 0, 1, axis=axis), lax.slice_in_dim(ordered, 0, -1, axis=axis)], axis)
    run_start = jnp.where((ordered != previous) | (positions == 0), positions, 0)
    run_length = positions - lax.cummax(run_start, axis=axis) + 1
    best = jnp.argmax(run_length, axis=axis, keepdims=True)
    index = jnp.take_along_axis(order, best, axis=axis)
    return unkeep(gather_along(x, index, axis), axis, keepdim), unkeep(index, axis, keepdim).astype(ctx.dtype_of(1))
