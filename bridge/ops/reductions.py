"""Reduction ATen ops: sum, mean, var, min/max, norms, cumulative ops, sort and selection.

Ops that return indices (max.dim, sort, topk, cummax, median, ...) compute the
indices first and gather the values through them, so the gradient reaches
exactly the element torch's backward scatters into.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _dims(x, dim) -> tuple[int, ...]:
    """ATen's `dim` argument (None, [], an int or a list) as normalised axes; None/[] is every axis."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(x.ndim))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return tuple(sorted({d % max(x.ndim, 1) for d in dims})) if x.ndim else ()


def _axis(x, dim: int) -> int | None:
    """A single `dim` as an axis; None for a 0-d tensor (which torch lets any dim 0/-1 reduce)."""
    return dim % x.ndim if x.ndim else None


def _size(x, dims) -> int:
    return math.prod(x.shape[d] for d in dims)


def _gather(x, indices, axis):
    """Values at `indices` along `axis` (differentiable with respect to `x`)."""
    if axis is None:
        return x
    return jnp.take_along_axis(x, indices, axis=axis)


def _unkeep(x, axis, keepdim):
    return x if keepdim or axis is None else jnp.squeeze(x, axis)


# -- sums and means ---------------------------------------------------------------


@lowering(aten.sum.default, aten.sum.dim_IntList)
def sum_(ctx, x, dim=None, keepdim=False, *, dtype=None):
    return jnp.sum(x, axis=_dims(x, dim), keepdims=keepdim, dtype=ctx.dtype)


@lowering(aten.nansum.default)
def nansum(ctx, x, dim=None, keepdim=False, *, dtype=None):
    return jnp.nansum(x, axis=_dims(x, dim), keepdims=keepdim, dtype=ctx.dtype)


@lowering(aten.mean.default, aten.mean.dim)
def mean(ctx, x, dim=None, keepdim=False, *, dtype=None):
    return jnp.mean(x.astype(ctx.dtype), axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.nanmean.default)
def nanmean(ctx, x, dim=None, keepdim=False, *, dtype=None):
    return jnp.nanmean(x.astype(ctx.dtype), axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.prod.default, aten.prod.dim_int)
def prod(ctx, x, dim=None, keepdim=False, *, dtype=None):
    return jnp.prod(x.astype(ctx.dtype), axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.count_nonzero.default, aten.count_nonzero.dim_IntList)
def count_nonzero(ctx, x, dim=None):
    return jnp.sum(x != 0, axis=_dims(x, dim), dtype=ctx.dtype)


@lowering(aten.logsumexp.default)
def logsumexp(ctx, x, dim, keepdim=False):
    x = x.astype(ctx.dtype)
    dims = _dims(x, dim)
    if _size(x, dims) == 0:
        return jnp.full(ctx.shape, -jnp.inf, ctx.dtype)
    return jax.nn.logsumexp(x, axis=dims, keepdims=keepdim)


# -- variance -----------------------------------------------------------------------


def _var(x, dim, correction, keepdim):
    dims = _dims(x, dim)
    correction = 1 if correction is None else correction
    centered = x - jnp.mean(x, axis=dims, keepdims=True)
    squares = jnp.real(centered * jnp.conj(centered)) if jnp.iscomplexobj(x) else centered * centered
    return jnp.sum(squares, axis=dims, keepdims=keepdim) / max(0, _size(x, dims) - correction)


def _correction(unbiased: bool) -> int:
    return 1 if unbiased else 0


@lowering(aten.var.correction)
def var(ctx, x, dim=None, *, correction=None, keepdim=False):
    return _var(x, dim, correction, keepdim).astype(ctx.dtype)


@lowering(aten.var.dim)
def var_dim(ctx, x, dim, unbiased=True, keepdim=False):
    return _var(x, dim, _correction(unbiased), keepdim).astype(ctx.dtype)


@lowering(aten.std.correction)
def std(ctx, x, dim=None, *, correction=None, keepdim=False):
    return jnp.sqrt(_var(x, dim, correction, keepdim)).astype(ctx.dtype)


@lowering(aten.std.dim)
def std_dim(ctx, x, dim, unbiased=True, keepdim=False):
    return jnp.sqrt(_var(x, dim, _correction(unbiased), keepdim)).astype(ctx.dtype)


@lowering(aten.var_mean.correction)
def var_mean(ctx, x, dim=None, *, correction=None, keepdim=False):
    return _var(x, dim, correction, keepdim), jnp.mean(x, axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.var_mean.dim)
def var_mean_dim(ctx, x, dim, unbiased=True, keepdim=False):
    return var_mean(ctx, x, dim, correction=_correction(unbiased), keepdim=keepdim)


@lowering(aten.std_mean.correction)
def std_mean(ctx, x, dim=None, *, correction=None, keepdim=False):
    variance, average = var_mean(ctx, x, dim, correction=correction, keepdim=keepdim)
    return jnp.sqrt(variance), average


@lowering(aten.std_mean.dim)
def std_mean_dim(ctx, x, dim, unbiased=True, keepdim=False):
    return std_mean(ctx, x, dim, correction=_correction(unbiased), keepdim=keepdim)


# -- min / max / any / all ------------------------------------------------------------


@lowering(aten.amax.default)
def amax(ctx, x, dim=(), keepdim=False):
    return jnp.max(x, axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.amin.default)
def amin(ctx, x, dim=(), keepdim=False):
    return jnp.min(x, axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.max.default)
def max_(ctx, x):
    return jnp.max(x)


@lowering(aten.min.default)
def min_(ctx, x):
    return jnp.min(x)


@lowering(aten.aminmax.default)
def aminmax(ctx, x, *, dim=None, keepdim=False):
    dims = _dims(x, dim)
    return jnp.min(x, axis=dims, keepdims=keepdim), jnp.max(x, axis=dims, keepdims=keepdim)


def _arg_reduce(find, ctx, x, dim, keepdim):
    if dim is None:
        index = find(jnp.ravel(x), axis=0)
        return jnp.reshape(index, ctx.shape).astype(ctx.dtype)
    axis = _axis(x, dim)
    if axis is None:
        return jnp.zeros(ctx.shape, ctx.dtype)
    return find(x, axis=axis, keepdims=keepdim).astype(ctx.dtype)


@lowering(aten.argmax.default)
def argmax(ctx, x, dim=None, keepdim=False):
    return _arg_reduce(jnp.argmax, ctx, x, dim, keepdim)


@lowering(aten.argmin.default)
def argmin(ctx, x, dim=None, keepdim=False):
    return _arg_reduce(jnp.argmin, ctx, x, dim, keepdim)


def _value_and_index(find, ctx, x, dim, keepdim):
    axis = _axis(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    index = find(x, axis=axis, keepdims=True).astype(ctx.dtype_of(1))
    value = _gather(x, index, axis)
    return _unkeep(value, axis, keepdim), _unkeep(index, axis, keepdim)


@lowering(aten.max.dim)
def max_dim(ctx, x, dim, keepdim=False):
    return _value_and_index(jnp.argmax, ctx, x, dim, keepdim)


@lowering(aten.min.dim)
def min_dim(ctx, x, dim, keepdim=False):
    return _value_and_index(jnp.argmin, ctx, x, dim, keepdim)


@lowering(aten.any.default, aten.any.dim, aten.any.dims)
def any_(ctx, x, dim=None, keepdim=False):
    return jnp.any(x != 0, axis=_dims(x, dim), keepdims=keepdim).astype(ctx.dtype)


@lowering(aten.all.default, aten.all.dim, aten.all.dims)
def all_(ctx, x, dim=None, keepdim=False):
    return jnp.all(x != 0, axis=_dims(x, dim), keepdims=keepdim).astype(ctx.dtype)


# -- norms --------------------------------------------------------------------------------


def _safe_root(total, p):
    """total ** (1/p) with torch's zero gradient where the norm is 0."""
    zero = total == 0
    root = jnp.sqrt(jnp.where(zero, 1, total)) if p == 2 else jnp.where(zero, 1, total) ** (1 / p)
    return jnp.where(zero, 0, root)


@lowering(aten.linalg_vector_norm.default)
def linalg_vector_norm(ctx, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    dims = _dims(x, dim)
    magnitude = jnp.abs(x).astype(ctx.dtype)
    if ord == math.inf:
        return jnp.max(magnitude, axis=dims, keepdims=keepdim, initial=0.0)
    if ord == -math.inf:
        return jnp.min(magnitude, axis=dims, keepdims=keepdim)
    if ord == 0:
        return jnp.sum(magnitude != 0, axis=dims, keepdims=keepdim, dtype=ctx.dtype)
    if ord == 1:
        return jnp.sum(magnitude, axis=dims, keepdims=keepdim)
    if ord == 2:
        return _safe_root(jnp.sum(magnitude * magnitude, axis=dims, keepdims=keepdim), 2)
    return _safe_root(jnp.sum(magnitude**ord, axis=dims, keepdims=keepdim), ord)


# -- cumulative ops -------------------------------------------------------------------------


@lowering(aten.cumsum.default)
def cumsum(ctx, x, dim, *, dtype=None):
    axis = _axis(x, dim)
    x = x.astype(ctx.dtype)
    return x if axis is None else jnp.cumsum(x, axis=axis)


@lowering(aten.cumprod.default)
def cumprod(ctx, x, dim, *, dtype=None):
    axis = _axis(x, dim)
    x = x.astype(ctx.dtype)
    return x if axis is None else jnp.cumprod(x, axis=axis)


@lowering(aten.logcumsumexp.default)
def logcumsumexp(ctx, x, dim):
    axis = _axis(x, dim)
    x = x.astype(ctx.dtype)
    return x if axis is None or x.shape[axis] == 0 else lax.cumlogsumexp(x, axis=axis)


def _cumulative_extreme(ctx, x, dim, later_wins):
    """cummax/cummin: running extreme and the last index where it occurs (NaN beats everything)."""
    axis = _axis(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    if x.shape[axis] == 0:
        return x, jnp.zeros(x.shape, ctx.dtype_of(1))
    positions = lax.broadcasted_iota(ctx.dtype_of(1), x.shape, axis)

    def combine(a, b):
        take_b = later_wins(b[0], a[0])
        if jnp.issubdtype(x.dtype, jnp.inexact):
            take_b = jnp.isnan(b[0]) | (take_b & ~jnp.isnan(a[0]))
        return jnp.where(take_b, b[0], a[0]), jnp.where(take_b, b[1], a[1])

    _, indices = lax.associative_scan(combine, (lax.stop_gradient(x), positions), axis=axis)
    return _gather(x, indices, axis), indices


@lowering(aten.cummax.default)
def cummax(ctx, x, dim):
    return _cumulative_extreme(ctx, x, dim, jnp.greater_equal)


@lowering(aten.cummin.default)
def cummin(ctx, x, dim):
    return _cumulative_extreme(ctx, x, dim, jnp.less_equal)


# -- sorting and selection ---------------------------------------------------------------------


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
    axis = _axis(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    order = _argsort(lax.stop_gradient(x), axis, descending)
    return _gather(x, order, axis), order.astype(ctx.dtype_of(1))


@lowering(aten.sort.default)
def sort(ctx, x, dim=-1, descending=False):
    return _sort(ctx, x, dim, descending)


@lowering(aten.sort.stable)
def sort_stable(ctx, x, *, stable=None, dim=-1, descending=False):
    return _sort(ctx, x, dim, descending)


@lowering(aten.argsort.default)
def argsort(ctx, x, dim=-1, descending=False):
    axis = _axis(x, dim)
    if axis is None:
        return jnp.zeros((), ctx.dtype)
    return _argsort(x, axis, descending).astype(ctx.dtype)


@lowering(aten.argsort.stable)
def argsort_stable(ctx, x, *, stable, dim=-1, descending=False):
    return argsort(ctx, x, dim, descending)


@lowering(aten.topk.default)
def topk(ctx, x, k, dim=-1, largest=True, sorted=True):
    axis = _axis(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    order = _argsort(lax.stop_gradient(x), axis, descending=largest)
    order = lax.slice_in_dim(order, 0, k, axis=axis)
    return _gather(x, order, axis), order.astype(ctx.dtype_of(1))


@lowering(aten.kthvalue.default)
def kthvalue(ctx, x, k, dim=-1, keepdim=False):
    axis = _axis(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    order = lax.slice_in_dim(_argsort(lax.stop_gradient(x), axis, False), k - 1, k, axis=axis)
    return _unkeep(_gather(x, order, axis), axis, keepdim), _unkeep(order, axis, keepdim).astype(ctx.dtype_of(1))


def _median_position(x, axis, ignore_nan):
    """Position, in ascending sorted order along `axis`, of torch's (lower) median."""
    n = x.shape[axis]
    nans = jnp.sum(jnp.isnan(x), axis=axis, keepdims=True) if jnp.issubdtype(x.dtype, jnp.inexact) else 0
    if ignore_nan:
        return jnp.maximum((n - nans - 1) // 2, 0) * jnp.ones_like(nans)
    return jnp.where(nans > 0, n - nans, (n - 1) // 2)


def _median_dim(x, dim, keepdim, ignore_nan, index_dtype=jnp.int32):
    axis = _axis(x, dim)
    if axis is None:
        return x, jnp.zeros((), index_dtype)
    order = _argsort(lax.stop_gradient(x), axis, False)
    position = _median_position(lax.stop_gradient(x), axis, ignore_nan)
    index = jnp.take_along_axis(order, jnp.asarray(position, order.dtype), axis=axis)
    return _unkeep(_gather(x, index, axis), axis, keepdim), _unkeep(index, axis, keepdim).astype(index_dtype)


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
    axis = _axis(x, dim)
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
    return _unkeep(_gather(x, index, axis), axis, keepdim), _unkeep(index, axis, keepdim).astype(ctx.dtype_of(1))
