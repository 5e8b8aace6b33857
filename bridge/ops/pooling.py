"""Pooling ATen ops: max, average, adaptive, fractional pooling and max_unpool.

Shapes and window geometry are static, so index tables and divisors are
computed with numpy at trace time; the output size is torch's (read from the
graph, ceil_mode included), not re-derived. Ops that return indices gather
the values through them, so the gradient reaches the element torch picks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from bridge.ops.operands import accumulation_dtype, expand_ints
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _window_pads(in_sizes, out_sizes, kernel, stride, padding, dilation):
    """(low, high) padding per dim so that a VALID window walk yields `out_sizes`.

    The high side is extended past `padding` for ceil_mode, never shortened,
    so the output size is torch's (read from the graph), not re-derived.
    """
    pads = []
    for n, o, k, s, p, d in zip(in_sizes, out_sizes, kernel, stride, padding, dilation, strict=True):
        needed = (o - 1) * s + d * (k - 1) + 1
        pads.append((p, max(needed - n - p, 0)))
    return pads


def _pool_geometry(x, ctx_shape, kernel_size, stride, padding, dilation=1):
    nd = len(kernel_size)
    kernel = expand_ints(kernel_size, nd)
    stride = expand_ints(stride, nd) if stride else kernel
    padding, dilation = expand_ints(padding, nd), expand_ints(dilation, nd)
    out_sizes = tuple(ctx_shape[-nd:])
    pads = _window_pads(x.shape[-nd:], out_sizes, kernel, stride, padding, dilation)
    lead = x.ndim - nd
    return kernel, stride, padding, dilation, out_sizes, pads, lead


def _lowest(dtype):
    if jnp.issubdtype(dtype, jnp.floating):
        return -jnp.inf
    if dtype == jnp.bool_:
        return False
    return jnp.iinfo(dtype).min


@lowering(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
def max_pool(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False, channels_last=False):
    # channels_last: `x` and the result are (N, *spatial, C); only bridge/layout.py passes it.
    # The geometry is read in torch's order; the window then walks the middle axes.
    torch_order = jax.ShapeDtypeStruct((x.shape[0], x.shape[-1], *x.shape[1:-1]), x.dtype) if channels_last else x
    kernel, stride, _, dilation, _, pads, lead = _pool_geometry(
        torch_order, ctx.shape, kernel_size, stride, padding, dilation
    )
    before, after = ((1,), (1,)) if channels_last else ((1,) * lead, ())
    return lax.reduce_window(
        x,
        np.array(_lowest(x.dtype), x.dtype),  # a concrete identity selects reduce_window_max
        lax.max,
        before + kernel + after,
        before + stride + after,
        [(0, 0)] * len(before) + pads + [(0, 0)] * len(after),
        window_dilation=before + dilation + after,
    )


def _argmax_pair(a, b):
    """Reducer over (value, flat index) pairs: larger value, NaN wins, ties -> lower index."""
    (av, ai), (bv, bi) = a, b
    a_nan, b_nan = av != av, bv != bv
    a_wins = (av > bv) | (a_nan & ~b_nan) | (((av == bv) | (a_nan & b_nan)) & (ai < bi))
    return jnp.where(a_wins, av, bv), jnp.where(a_wins, ai, bi)


def _gather_spatial(x, flat_index, nd):
    """x[..., spatial] at flat spatial indices shaped like the output."""
    lead = x.shape[: x.ndim - nd]
    flat = x.reshape(lead + (-1,))
    idx = flat_index.reshape(flat_index.shape[: len(lead)] + (-1,))
    return jnp.take_along_axis(flat, idx, axis=-1).reshape(flat_index.shape)


@lowering(
    aten.max_pool1d_with_indices.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
)
def max_pool_with_indices(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    kernel, stride, _, dilation, _, pads, lead = _pool_geometry(
        x, ctx.shape_of(0), kernel_size, stride, padding, dilation
    )
    nd = len(kernel)
    spatial = x.shape[lead:]
    index = jnp.broadcast_to(jnp.arange(math.prod(spatial), dtype=jnp.int32).reshape(spatial), x.shape)
    values = lax.stop_gradient(x)
    _, idx = lax.reduce_window(
        (values, index),
        (np.array(_lowest(x.dtype), x.dtype), np.array(np.iinfo(np.int32).max, np.int32)),
        _argmax_pair,
        (1,) * lead + kernel,
        (1,) * lead + stride,
        [(0, 0)] * lead + pads,
        window_dilation=(1,) * lead + dilation,
    )
    # Gathering the values at the indices routes the gradient to the element
    # torch picks (the first maximum), exactly like torch's backward.
    return _gather_spatial(x, idx, nd), idx.astype(ctx.dtype_of(1))


def _avg_divisor(in_sizes, out_sizes, kernel, stride, padding, count_include_pad):
    """Per-output-position divisor of torch's avg_pool, as a static array."""
    per_dim = []
    for n, o, k, s, p in zip(in_sizes, out_sizes, kernel, stride, padding, strict=True):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        if count_include_pad:
            per_dim.append(end - start)
        else:
            per_dim.append(np.minimum(end, n) - np.maximum(start, 0))
    divisor = np.ones((), np.float64)
    for d in per_dim:
        divisor = np.multiply.outer(divisor, d)
    return divisor


def average_pool(x, out_shape, dtype, kernel_size, stride, padding, count_include_pad, divisor_override):
    """torch's avg_pool of `x` to `out_shape` (torch's output shape, ceil_mode included)."""
    kernel, stride, padding, _, out_sizes, pads, lead = _pool_geometry(x, out_shape, kernel_size, stride, padding)
    acc = accumulation_dtype(dtype)
    total = lax.reduce_window(
        x.astype(acc),
        np.array(0, acc),
        lax.add,
        (1,) * lead + kernel,
        (1,) * lead + stride,
        [(0, 0)] * lead + pads,
    )
    if divisor_override:
        divisor = divisor_override
    else:
        divisor = _avg_divisor(x.shape[lead:], out_sizes, kernel, stride, padding, count_include_pad)
        divisor = jnp.asarray(divisor, acc)
    if jnp.issubdtype(dtype, jnp.integer):
        return (total // divisor).astype(dtype)
    return (total / divisor).astype(dtype)


@lowering(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
def avg_pool(
    ctx, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    return average_pool(x, ctx.shape, ctx.dtype, kernel_size, stride, padding, count_include_pad, divisor_override)


def _adaptive_windows(n: int, o: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's adaptive pooling windows: [floor(i*n/o), ceil((i+1)*n/o))."""
    i = np.arange(o)
    return (i * n) // o, -((-(i + 1) * n) // o)


@lowering(
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
)
def adaptive_avg_pool(ctx, x, output_size, channels_last=False):
    # channels_last: `x` and the result are (N, *spatial, C); only bridge/layout.py passes it.
    if channels_last:
        out_shape = (ctx.shape[0], *ctx.shape[2:], ctx.shape[1])
        return adaptive_average_pool(x, out_shape, ctx.dtype, len(output_size), range(1, x.ndim - 1))
    return adaptive_average_pool(x, ctx.shape, ctx.dtype, len(output_size))


def adaptive_average_pool(x, out_shape, dtype, nd, spatial_axes=None):
    """torch's adaptive_avg_pool of the last `nd` dims of `x` (or `spatial_axes`) to `out_shape`
    (in `x`'s layout)."""
    acc = accumulation_dtype(dtype)
    y = x.astype(acc)
    for axis in spatial_axes or range(x.ndim - nd, x.ndim):
        n, o = y.shape[axis], out_shape[axis]
        if n % o == 0:  # equal windows: a reshape and a mean
            y = jnp.mean(y.reshape(y.shape[:axis] + (o, n // o) + y.shape[axis + 1 :]), axis=axis + 1)
            continue
        start, end = _adaptive_windows(n, o)
        cols = np.arange(n)
        matrix = ((cols >= start[:, None]) & (cols < end[:, None])) / (end - start)[:, None]
        y = jnp.moveaxis(jnp.tensordot(y, jnp.asarray(matrix.T, acc), axes=([axis], [0])), -1, axis)
    return y.astype(dtype)


@lowering(aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def adaptive_max_pool(ctx, x, output_size):
    nd = len(output_size)
    lead = x.ndim - nd
    in_sizes, out_sizes = x.shape[lead:], ctx.shape_of(0)[lead:]
    # Flat input indices of every window, padded to the largest window with -1.
    flat = np.zeros((1, 1), np.int64)
    valid = np.ones((1, 1), bool)
    for n, o in zip(in_sizes, out_sizes, strict=True):
        start, end = _adaptive_windows(n, o)
        width = int((end - start).max())
        pos = start[:, None] + np.arange(width)
        ok = pos < end[:, None]
        pos = np.where(ok, pos, 0)
        flat = (flat[:, None, :, None] * n + pos[None, :, None, :]).reshape(flat.shape[0] * o, -1)
        valid = (valid[:, None, :, None] & ok[None, :, None, :]).reshape(flat.shape)
    xs = x.reshape(x.shape[:lead] + (-1,))
    windows = jnp.take(lax.stop_gradient(xs), jnp.asarray(flat), axis=-1)
    windows = jnp.where(jnp.asarray(valid), windows, _lowest(x.dtype))
    # argmax with NaN winning and ties resolved to the first (lowest) index.
    is_nan = windows != windows
    best = jnp.where(jnp.any(is_nan, axis=-1), jnp.argmax(is_nan, axis=-1), jnp.argmax(windows, axis=-1))
    idx = jnp.take_along_axis(jnp.broadcast_to(jnp.asarray(flat), windows.shape), best[..., None], axis=-1)[..., 0]
    idx = idx.reshape(x.shape[:lead] + tuple(out_sizes)).astype(jnp.int32)
    return _gather_spatial(x, idx, nd), idx.astype(ctx.dtype_of(1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _unpool_scatter(values, index, size: int):
    """values (P, K) written at flat positions index (P, K) of P planes of `size` elements."""
    rows = jnp.arange(values.shape[0])[:, None]
    out = jnp.zeros((values.shape[0], size), values.dtype)
    return out.at[rows, index].set(values, mode="drop")


@_unpool_scatter.defjvp
def _unpool_scatter_jvp(size, primals, tangents):
    # torch's max_unpool backward gathers the gradient at the indices, so an
    # input whose index another input shares still gets the gradient there
    # (the forward keeps one of them). A scatter-add tangent transposes to
    # exactly that gather.
    values, index = primals
    rows = jnp.arange(values.shape[0])[:, None]
    tangent = jnp.zeros((values.shape[0], size), values.dtype)
    tangent = tangent.at[rows, index].add(tangents[0], mode="drop")
    return _unpool_scatter(values, index, size), tangent


def _max_unpool(ctx, x, indices, nd):
    """Each value of x written at its flat spatial index of the output planes."""
    out_shape = ctx.shape
    planes = math.prod(out_shape[:-nd])
    size = math.prod(out_shape[-nd:])
    values = x.reshape(planes, -1)
    index = indices.reshape(planes, -1).astype(jnp.int32)
    if values.size == 0 or size == 0:
        return jnp.zeros(out_shape, ctx.dtype)
    out = _unpool_scatter(values, index, size)
    return out.reshape(out_shape).astype(ctx.dtype)


@lowering(aten.max_unpool2d.default)
def max_unpool2d(ctx, x, indices, output_size):
    return _max_unpool(ctx, x, indices, 2)


@lowering(aten.max_unpool3d.default)
def max_unpool3d(ctx, x, indices, output_size, stride, padding):
    return _max_unpool(ctx, x, indices, 3)


def _fractional_starts(sample, n: int, o: int, k: int):
    """torch's pseudo-random window starts along one dim, per plane: (..., o) int32.

    start_i = int((i + u) * alpha) - int(u * alpha), alpha = (n - k) / (o - 1),
    and the last window ends at the input's end; computed in the samples'
    dtype as torch does, so the truncations agree.
    """
    dt = sample.dtype
    last = jnp.full(sample.shape + (1,), n - k, jnp.int32)
    if o == 1:
        return last
    alpha = jnp.asarray(n - k, dt) / jnp.asarray(o - 1, dt)
    u = sample[..., None]
    i = jnp.arange(o - 1, dtype=dt)
    starts = ((i + u) * alpha).astype(jnp.int32) - (u * alpha).astype(jnp.int32)
    return jnp.concatenate([starts, last], axis=-1)


def _fractional_max_pool(ctx, x, kernel_size, output_size, samples, nd):
    """fractional_max_pool{2,3}d: max over windows placed by `samples` (N, C, nd).

    torch reads the samples as (W, H) in 2-D and (T, H, W) in 3-D. Ties go to
    the first position in the window, and a NaN wins (the last NaN).
    """
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    kernel, out_sizes = expand_ints(kernel_size, nd), expand_ints(output_size, nd)
    in_sizes = x.shape[2:]
    lead = x.shape[:2]
    samples = jnp.reshape(samples, lead + (nd,))
    sample_axis = (1, 0) if nd == 2 else (0, 1, 2)
    strides = [math.prod(in_sizes[k + 1 :]) for k in range(nd)]
    # Flat input index of every (output position, window offset), shaped
    # (N, C, *out_sizes, *kernel), built one dim at a time.
    flat = jnp.zeros(lead + (1,) * (2 * nd), jnp.int32)
    for k in range(nd):
        starts = _fractional_starts(samples[..., sample_axis[k]], in_sizes[k], out_sizes[k], kernel[k])
        term = (starts[..., :, None] + jnp.arange(kernel[k], dtype=jnp.int32)) * strides[k]
        shape = [1] * (2 * nd)
        shape[k], shape[nd + k] = out_sizes[k], kernel[k]
        flat = flat + term.reshape(lead + tuple(shape))
    flat = flat.reshape(lead + tuple(out_sizes) + (-1,))
    windows = _gather_spatial(lax.stop_gradient(x), flat, nd)
    is_nan = windows != windows
    width = windows.shape[-1]
    last_nan = width - 1 - jnp.argmax(jnp.flip(is_nan, axis=-1), axis=-1)
    best = jnp.where(jnp.any(is_nan, axis=-1), last_nan, jnp.argmax(windows, axis=-1))
    idx = jnp.take_along_axis(flat, best[..., None], axis=-1)[..., 0]
    out = _gather_spatial(x, idx, nd)  # gathering routes the gradient to the chosen element
    if unbatched:
        out, idx = out[0], idx[0]
    return out.astype(ctx.dtype_of(0)), idx.astype(ctx.dtype_of(1))


@lowering(aten.fractional_max_pool2d.default)
def fractional_max_pool2d(ctx, x, kernel_size, output_size, random_samples):
    return _fractional_max_pool(ctx, x, kernel_size, output_size, random_samples, 2)


@lowering(aten.fractional_max_pool3d.default)
def fractional_max_pool3d(ctx, x, kernel_size, output_size, random_samples):
    return _fractional_max_pool(ctx, x, kernel_size, output_size, random_samples, 3)
