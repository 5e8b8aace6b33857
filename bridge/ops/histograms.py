"""Histogram ATen ops: histc, histogram and histogramdd.

torch's CPU kernel (aten/src/ATen/native/cpu/HistogramKernel.cpp) maps each
element to a bin in one of three ways, reproduced here because an element on
a bin edge lands in a different bin under each: histc divides
`(x - left) * bins / (right - left)` and truncates; histogram/histogramdd with
a bin count do the same, then correct the guess by comparing with the edges
next to it ("local search"); with explicit edge tensors they binary-search
the edges. Elements outside [left, right] (and NaN) are skipped, and the last
bin includes its right edge.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.creation import linspace_values
from bridge.ops.elementwise import true_divide
from bridge.ops.registry import lowering

aten = torch.ops.aten


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
