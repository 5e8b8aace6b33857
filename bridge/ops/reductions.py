"""Reduction ATen ops: sum, mean, var, min/max, norms, cumulative ops, sort and selection.

Ops that return indices (max.dim, sort, topk, cummax, median, ...) compute the
indices first and gather the values through them, so the gradient reaches
exactly the element torch's backward scatters into.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops import exact
from bridge.ops.creation import linspace_values
from bridge.ops.elementwise import true_divide
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
    dims = _dims(x, dim)
    return exact.sum_(ctx, x, dims, keepdim, jnp.sum(x, axis=dims, keepdims=keepdim, dtype=ctx.dtype))


@lowering(aten.nansum.default)
def nansum(ctx, x, dim=None, keepdim=False, *, dtype=None):
    dims = _dims(x, dim)
    return exact.sum_(ctx, x, dims, keepdim, jnp.nansum(x, axis=dims, keepdims=keepdim, dtype=ctx.dtype))


@lowering(aten.mean.default, aten.mean.dim)
def mean(ctx, x, dim=None, keepdim=False, *, dtype=None):
    return jnp.mean(x.astype(ctx.dtype), axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.nanmean.default)
def nanmean(ctx, x, dim=None, keepdim=False, *, dtype=None):
    return jnp.nanmean(x.astype(ctx.dtype), axis=_dims(x, dim), keepdims=keepdim)


@lowering(aten.prod.default, aten.prod.dim_int)
def prod(ctx, x, dim=None, keepdim=False, *, dtype=None):
    dims = _dims(x, dim)
    return exact.prod(ctx, x, dims, jnp.prod(x.astype(ctx.dtype), axis=dims, keepdims=keepdim))


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


@jax.custom_jvp
def _magnitude(x):
    return jnp.abs(x)


@_magnitude.defjvp
def _magnitude_jvp(primals, tangents):
    # torch's abs backward: grad * sgn(x), so 0 (not 1) where x is 0.
    (x,), (t,) = primals, tangents
    magnitude = jnp.abs(x)
    if jnp.iscomplexobj(x):
        unit = x / jnp.where(magnitude == 0, 1, magnitude).astype(x.dtype)
        return magnitude, jnp.real(jnp.conj(unit) * t)
    return magnitude, jnp.sign(x) * t


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _magnitude_pow(magnitude, p):
    return magnitude**p


@_magnitude_pow.defjvp
def _magnitude_pow_jvp(p, primals, tangents):
    # torch's norm backward is 0 where an element is 0, also for p < 1 (not inf or NaN).
    (m,), (t,) = primals, tangents
    safe = jnp.where(m == 0, 1, m)
    return m**p, jnp.where(m == 0, 0, p * safe ** (p - 1) * t)


@lowering(aten.linalg_vector_norm.default)
def linalg_vector_norm(ctx, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    dims = _dims(x, dim)
    magnitude = _magnitude(x).astype(ctx.dtype)
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
    return _safe_root(jnp.sum(_magnitude_pow(magnitude, ord), axis=dims, keepdims=keepdim), ord)


@lowering(aten.dist.default)
def dist(ctx, x, other, p=2):
    diff = jnp.subtract(x, other)
    return linalg_vector_norm(ctx, diff if jnp.iscomplexobj(diff) else diff.astype(ctx.dtype), p)


# -- cumulative ops -------------------------------------------------------------------------


@lowering(aten.cumsum.default)
def cumsum(ctx, x, dim, *, dtype=None):
    axis = _axis(x, dim)
    if axis is None:
        return x.astype(ctx.dtype)
    return exact.cumsum(ctx, x, axis, jnp.cumsum(x.astype(ctx.dtype), axis=axis))


@lowering(aten.cumprod.default)
def cumprod(ctx, x, dim, *, dtype=None):
    axis = _axis(x, dim)
    x = x.astype(ctx.dtype)
    return x if axis is None else exact.cumprod(ctx, x, axis, jnp.cumprod(x, axis=axis))


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


# -- histograms ----------------------------------------------------------------------------
#
# torch's CPU kernel (aten/src/ATen/native/cpu/HistogramKernel.cpp) maps each
# element to a bin in one of three ways, reproduced here because an element on
# a bin edge lands in a different bin under each: histc divides
# `(x - left) * bins / (right - left)` and truncates; histogram/histogramdd with
# a bin count do the same, then correct the guess by comparing with the edges
# next to it ("local search"); with explicit edge tensors they binary-search
# the edges. Elements outside [left, right] (and NaN) are skipped, and the last
# bin includes its right edge.


def _edge_linspace(start, end, bins: int, dtype):
    """The `bins + 1` edges from `start` to `end`, as torch's CPU linspace computes them."""
    if jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return linspace_values(start, end, bins + 1, dtype)
    return linspace_values(start, end, bins + 1, jnp.float32).astype(dtype)


def _linear_bin(x, edges, local_search: bool):
    """Bin index (and whether `x` is counted) for linearly spaced `edges`."""
    count = edges.shape[0]
    left, right = edges[0], edges[-1]
    inside = (x >= left) & (x <= right)
    guess = true_divide((x - left) * jnp.asarray(count - 1, x.dtype), right - left)
    pos = jnp.where(inside & jnp.isfinite(guess), guess, 0).astype(jnp.int32)  # truncates, as static_cast
    if local_search:
        # std::upper_bound over edges[max(pos - 1, 0) : min(pos + 2, count)]
        low = jnp.maximum(pos - 1, 0)
        high = jnp.minimum(pos + 2, count)
        below = jnp.zeros_like(pos)
        for k in range(3):
            at = low + k
            below = below + ((at < high) & (edges[jnp.minimum(at, count - 1)] <= x)).astype(pos.dtype)
        pos = low + below - 1
    return jnp.where(pos == count - 1, pos - 1, pos), inside


def _searched_bin(x, edges):
    """Bin index (and whether `x` is counted) by binary search of `edges` (std::upper_bound)."""
    count = edges.shape[0]
    inside = (x >= edges[0]) & (x <= edges[-1])
    pos = jnp.searchsorted(edges, x, side="right").astype(jnp.int32) - 1
    return jnp.where(pos == count - 1, pos - 1, pos), inside


def _histogramdd(points, edges, weight, density, find_bin):
    """The histogram of `points` (N, D) over the per-dimension `edges`, as torch's kernel counts it."""
    dtype = points.dtype
    sizes = tuple(e.shape[0] - 1 for e in edges)
    flat = jnp.zeros((), jnp.int32)
    counted = jnp.ones(points.shape[:1], jnp.bool_)
    for d, e in enumerate(edges):
        pos, inside = find_bin(points[:, d], e)
        flat = flat * sizes[d] + pos
        counted = counted & inside
    total = math.prod(sizes)
    w = jnp.ones(points.shape[:1], dtype) if weight is None else jnp.reshape(weight, (-1,)).astype(dtype)
    hist = jnp.zeros((total,), dtype).at[jnp.where(counted, flat, total)].add(w, mode="drop")
    hist = jnp.reshape(hist, sizes)
    if density:
        hist = true_divide(hist, jnp.sum(hist))
        for d, e in enumerate(edges):
            shape = [1] * len(sizes)
            shape[d] = sizes[d]
            hist = true_divide(hist, jnp.reshape(jnp.diff(e), shape))
    return hist


def _outer_edges(points, range_):
    """torch's `select_outer_bin_edges`: the range, or the data's min/max (0..1 if empty), widened by 0.5 if empty."""
    n, dims = points.shape
    # Static bounds stay Python floats (torch's doubles), so the edges are computed
    # at trace time rather than folded by XLA.
    if range_ is not None:
        lows, highs = [float(v) for v in range_[0::2]], [float(v) for v in range_[1::2]]
        return [(lo - 0.5, hi + 0.5) if lo == hi else (lo, hi) for lo, hi in zip(lows, highs, strict=True)]
    if n == 0:
        return [(0.0, 1.0)] * dims
    lows, highs = jnp.min(points, axis=0), jnp.max(points, axis=0)
    same = lows == highs
    lows, highs = jnp.where(same, lows - 0.5, lows), jnp.where(same, highs + 0.5, highs)
    return [(lows[d], highs[d]) for d in range(dims)]


def _bin_count_edges(points, bins, range_):
    points = lax.stop_gradient(points)
    return [_edge_linspace(lo, hi, b, points.dtype) for (lo, hi), b in zip(_outer_edges(points, range_), bins, strict=True)]


def _as_points(x):
    """histogramdd's view of its input: (N, D) with D the last dimension."""
    return jnp.reshape(x, (-1, x.shape[-1])) if x.ndim else jnp.reshape(x, (1, 1))


@lowering(aten.histc.default)
def histc(ctx, x, bins=100, min=0, max=0):
    # torch's range: [min, max], or the data's when min == max, widened by 1 if empty.
    values = lax.stop_gradient(jnp.ravel(x))
    lo, hi = float(min), float(max)
    if lo == hi and values.size:
        lo, hi = jnp.min(values), jnp.max(values)
        same = lo == hi
        lo, hi = jnp.where(same, lo - 1, lo), jnp.where(same, hi + 1, hi)
    elif lo == hi:
        lo, hi = lo - 1, hi + 1
    edges = _edge_linspace(lo, hi, bins, values.dtype)
    return _histogramdd(values[:, None], [edges], None, False, functools.partial(_linear_bin, local_search=False))


@lowering(aten.histogram.bin_ct)
def histogram(ctx, x, bins=100, *, range=None, weight=None, density=False):
    points = jnp.reshape(x, (-1, 1))
    edges = _bin_count_edges(points, [bins], range)
    hist = _histogramdd(lax.stop_gradient(points), edges, weight, density, functools.partial(_linear_bin, local_search=True))
    return hist, edges[0]


@lowering(aten.histogram.bins_tensor)
def histogram_bins_tensor(ctx, x, bins, *, weight=None, density=False):
    points = lax.stop_gradient(jnp.reshape(x, (-1, 1)))
    return _histogramdd(points, [bins], weight, density, _searched_bin), bins


@lowering(aten._histogramdd_bin_edges.default)
def histogramdd_bin_edges(ctx, x, bins, *, range=None, weight=None, density=False):
    return _bin_count_edges(_as_points(x), bins, range)


@lowering(aten._histogramdd_from_bin_cts.default)
def histogramdd_from_bin_cts(ctx, x, bins, *, range=None, weight=None, density=False):
    points = lax.stop_gradient(_as_points(x))
    edges = _bin_count_edges(points, bins, range)
    return _histogramdd(points, edges, weight, density, functools.partial(_linear_bin, local_search=True))


@lowering(aten._histogramdd_from_bin_tensors.default)
def histogramdd_from_bin_tensors(ctx, x, bins, *, weight=None, density=False):
    return _histogramdd(lax.stop_gradient(_as_points(x)), list(bins), weight, density, _searched_bin)


# -- hash_tensor -------------------------------------------------------------------------------


def _float_words(x):
    """(high, low) uint32 words of each element of a float array of <= 32 bits, as float64.

    Computed from the bits, not by converting: XLA's CPU backend flushes
    float32 subnormals to zero when it converts them, and torch does not
    (they are normal numbers in float64). A NaN keeps its payload and comes
    out quiet, as the C++ conversion torch uses makes it.
    """
    if x.dtype == jnp.bfloat16:  # bfloat16 is the top half of a float32
        bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    else:  # float16 -> float32 is exact (its subnormals are normal in float32)
        bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = bits >> 31
    exponent = (bits >> 23) & jnp.uint32(0xFF)
    fraction = bits & jnp.uint32(0x7FFFFF)
    subnormal = (exponent == 0) & (fraction != 0)
    special = exponent == 0xFF
    # A subnormal's leading fraction bit (at `top`) becomes float64's implicit bit.
    top = (31 - lax.clz(fraction).astype(jnp.int32)).astype(jnp.uint32)
    mantissa = jnp.where(subnormal, fraction ^ lax.shift_left(jnp.uint32(1), top), fraction)
    shift = jnp.where(subnormal, 52 - top, jnp.uint32(29))  # fraction bit 0 -> float64 bit `shift`
    low = lax.shift_left(mantissa, shift)  # shifts of 32 or more give 0
    high_fraction = jnp.where(shift >= 32, lax.shift_left(mantissa, shift - 32),
                              lax.shift_right_logical(mantissa, 32 - shift))
    exponent64 = jnp.where(special, jnp.uint32(0x7FF),
                           jnp.where(subnormal, top + 874,  # 2**(top - 149), biased by 1023
                                     jnp.where(exponent == 0, jnp.uint32(0), exponent + 896)))
    quiet = jnp.where(special & (fraction != 0), jnp.uint32(1 << 19), jnp.uint32(0))
    high = (sign << 31) | (exponent64 << 20) | high_fraction | quiet
    return high, low


def _hash_words(x, dtype):
    """Each element as torch's hash_tensor sees it: widened to 64-bit float/int and read as uint64.

    With x64 off JAX has no uint64, and torch's result arrives as its low 32
    bits; those are computed from the bits of the 32-bit value.
    """
    wide = jnp.dtype(dtype).itemsize == 8
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 8:
        return lax.bitcast_convert_type(x, jnp.uint64)
    if jnp.issubdtype(x.dtype, jnp.floating):
        high, low = _float_words(x)
        if not wide:
            return low
        return (high.astype(jnp.uint64) << 32) | low.astype(jnp.uint64)
    if jnp.issubdtype(x.dtype, jnp.signedinteger):
        if wide:
            return lax.bitcast_convert_type(x.astype(jnp.int64), jnp.uint64)
        return lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)
    return x.astype(jnp.uint64 if wide else jnp.uint32)


@lowering(aten.hash_tensor.default)
def hash_tensor(ctx, x, dim=(), *, keepdim=False, mode=0):
    if mode != 0:
        raise NotImplementedError(f"hash_tensor: mode={mode} (torch implements only mode 0, xor_sum)")
    dims = _dims(x, dim)
    words = _hash_words(lax.stop_gradient(x), ctx.dtype)
    out = lax.reduce(words, jnp.zeros((), words.dtype), lax.bitwise_xor, dims)
    return jnp.reshape(out, ctx.shape)
