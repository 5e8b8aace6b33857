"""Resampling ATen ops: upsample (nearest, linear, bicubic, antialiased) and grid_sample.

Separable resampling gathers taps along each spatial dim in turn; the tap
indices and weights are static, computed with numpy at trace time the way
torch computes them, so that coordinates round as torch's do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.ops.operands import accumulation_dtype
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _scale_value(scale, n: int, o: int, dtype=np.float32):
    """torch's compute_scales_value, in `dtype` (torch's opmath) as torch computes it."""
    if scale is not None and scale > 0:
        return dtype(1.0 / scale)
    return dtype(n) / dtype(o)


def _nearest_index(n: int, o: int, scale, exact: bool) -> np.ndarray:
    dst = np.arange(o, dtype=np.float32)
    if not exact and o == n:
        return np.arange(o)
    if not exact and o == 2 * n:
        return np.arange(o) >> 1
    s = _scale_value(scale, n, o)
    src = np.floor((dst + np.float32(0.5)) * s) if exact else np.floor(dst * s)
    return np.minimum(src.astype(np.int64), n - 1)


def _source_coords(n: int, o: int, scale, align_corners: bool, dtype=np.float32) -> np.ndarray:
    """The input coordinate of each output position, in `dtype` as torch computes it
    (area_pixel_compute_source_index in opmath: double for float64 images, else
    float; before the linear modes clamp it at 0)."""
    if align_corners:
        ratio = dtype(n - 1) / dtype(o - 1) if o > 1 else dtype(0)
        return ratio * np.arange(o, dtype=dtype)
    ratio = _scale_value(scale, n, o, dtype)
    return ratio * (np.arange(o, dtype=dtype) + dtype(0.5)) - dtype(0.5)


def _linear_taps(n: int, o: int, scale, align_corners: bool, dtype=np.float32):
    """(indices, weights) of the two taps per output position (torch's upsample_linear)."""
    if o == n:
        return [np.arange(o)], [np.ones(o, dtype)]
    src = _source_coords(n, o, scale, align_corners, dtype)
    if not align_corners:
        src = np.maximum(src, dtype(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    lam = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    i1 = i0 + (i0 < n - 1)
    return [i0, i1], [dtype(1) - lam, lam]


def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2 (torch's A = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _cubic_taps(n: int, o: int, scale, align_corners: bool, dtype=np.float32):
    """(indices, weights) of the four taps per output position."""
    src = _source_coords(n, o, scale, align_corners, dtype)
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(dtype))
    base = base.astype(np.int64)
    indices = [np.clip(base + k, 0, n - 1) for k in (-1, 0, 1, 2)]
    return indices, weights


def _resample(x, out_spatial, taps_for_dim):
    """Separable resampling: per spatial dim, a weighted sum of gathered taps."""
    nd = len(out_spatial)
    acc = accumulation_dtype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    y = x.astype(acc)
    for k in range(nd):
        axis = x.ndim - nd + k
        indices, weights = taps_for_dim(k, y.shape[axis], out_spatial[k])
        if weights is None:
            y = jnp.take(y, jnp.asarray(indices), axis=axis)
            continue
        if not jnp.issubdtype(y.dtype, jnp.inexact):
            y, acc = y.astype(jnp.float32), jnp.float32  # integer images are resampled in float32
        shape = [1] * y.ndim
        shape[axis] = out_spatial[k]
        total = None
        for idx, w in zip(indices, weights, strict=True):
            term = jnp.take(y, jnp.asarray(idx), axis=axis) * jnp.asarray(w, acc).reshape(shape)
            total = term if total is None else total + term
        y = total
    return y


def _resampled(y, dtype):
    """A resampled image in torch's output dtype: integer images are rounded and clamped."""
    if jnp.issubdtype(dtype, jnp.integer) and jnp.issubdtype(y.dtype, jnp.inexact):
        info = jnp.iinfo(dtype)
        y = jnp.clip(jnp.round(y), info.min, info.max)
    return y.astype(dtype)


def _scales(nd, scales):
    scales = list(scales) if scales else []
    return scales + [None] * (nd - len(scales))


def _upsample_nearest(ctx, x, nd, scales, exact):
    scales = _scales(nd, scales)
    out = ctx.shape[-nd:]
    return _resample(x, out, lambda k, n, o: (_nearest_index(n, o, scales[k], exact), None)).astype(ctx.dtype)


def _upsample_linear(ctx, x, nd, align_corners, scales, cubic=False):
    scales = _scales(nd, scales)
    taps = _cubic_taps if cubic else _linear_taps
    out = ctx.shape[-nd:]
    # torch computes coordinates and weights in opmath: double for float64 images
    coord = np.float64 if x.dtype == jnp.float64 else np.float32
    return _resampled(
        _resample(x, out, lambda k, n, o: taps(n, o, scales[k], align_corners, coord)), ctx.dtype
    )


def _antialias_taps(n: int, o: int, scale, align_corners: bool):
    """(indices, weights) of torch's antialiased (PIL-style) bilinear resampling.

    Output i averages the inputs within `support` of its centre
    scale * (i + 0.5), weighted by a triangle filter stretched by the scale
    when downsampling, and normalised to sum to 1. Slots past a window's
    width get weight 0.
    """
    if align_corners:
        ratio = (n - 1) / (o - 1) if o > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale is not None and scale > 0 else n / o
    ratio = float(np.float32(ratio))
    support = ratio if ratio >= 1.0 else 1.0  # interp_size / 2 = 1, stretched by the scale
    invscale = 1.0 / ratio if ratio >= 1.0 else 1.0
    width = int(math.ceil(support)) * 2 + 1
    center = ratio * (np.arange(o) + 0.5)
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    size = np.clip(np.minimum(np.trunc(center + support + 0.5), n).astype(np.int64) - start, 0, width)
    j = np.arange(width)
    weights = np.maximum(0.0, 1.0 - np.abs((j[None, :] + start[:, None] - center[:, None] + 0.5) * invscale))
    weights = np.where(j[None, :] < size[:, None], weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0, weights / np.where(total != 0, total, 1), weights)
    indices = np.minimum(start[:, None] + j[None, :], n - 1)
    return [indices[:, k] for k in range(width)], [weights[:, k].astype(np.float32) for k in range(width)]


def _upsample_antialias(ctx, x, align_corners, scales):
    scales = _scales(2, scales)
    out = ctx.shape[-2:]
    taps = lambda k, n, o: _antialias_taps(n, o, scales[k], align_corners)  # noqa: E731
    return _resampled(_resample(x, out, taps), ctx.dtype)


@lowering(aten._upsample_bilinear2d_aa.default)
def upsample_bilinear2d_aa(ctx, x, output_size, align_corners, scales_h=None, scales_w=None):
    return _upsample_antialias(ctx, x, align_corners, (scales_h, scales_w))


@lowering(aten._upsample_bilinear2d_aa.vec)
def upsample_bilinear2d_aa_vec(ctx, x, output_size, align_corners, scale_factors):
    return _upsample_antialias(ctx, x, align_corners, scale_factors)


@lowering(aten.upsample_nearest1d.default, aten.upsample_nearest2d.default, aten.upsample_nearest3d.default)
def upsample_nearest(ctx, x, output_size, *scales):
    return _upsample_nearest(ctx, x, len(output_size), scales, exact=False)


@lowering(aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec)
def upsample_nearest_vec(ctx, x, output_size, scale_factors):
    return _upsample_nearest(ctx, x, x.ndim - 2, scale_factors, exact=False)


@lowering(
    aten._upsample_nearest_exact1d.default,
    aten._upsample_nearest_exact2d.default,
    aten._upsample_nearest_exact3d.default,
)
def upsample_nearest_exact(ctx, x, output_size, *scales):
    return _upsample_nearest(ctx, x, len(output_size), scales, exact=True)


@lowering(
    aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec
)
def upsample_nearest_exact_vec(ctx, x, output_size, scale_factors):
    return _upsample_nearest(ctx, x, x.ndim - 2, scale_factors, exact=True)


@lowering(aten.upsample_linear1d.default, aten.upsample_bilinear2d.default, aten.upsample_trilinear3d.default)
def upsample_linear(ctx, x, output_size, align_corners, *scales):
    return _upsample_linear(ctx, x, len(output_size), align_corners, scales)


@lowering(aten.upsample_linear1d.vec, aten.upsample_bilinear2d.vec, aten.upsample_trilinear3d.vec)
def upsample_linear_vec(ctx, x, output_size, align_corners, scale_factors):
    return _upsample_linear(ctx, x, x.ndim - 2, align_corners, scale_factors)


@lowering(aten.upsample_bicubic2d.default)
def upsample_bicubic(ctx, x, output_size, align_corners, *scales):
    return _upsample_linear(ctx, x, 2, align_corners, scales, cubic=True)


@lowering(aten.upsample_bicubic2d.vec)
def upsample_bicubic_vec(ctx, x, output_size, align_corners, scale_factors):
    return _upsample_linear(ctx, x, 2, align_corners, scale_factors, cubic=True)


def _grid_unnormalize(coord, size, align_corners):
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _grid_reflect(coord, twice_low, twice_high):
    if twice_low == twice_high:
        return jnp.zeros_like(coord)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    coord = jnp.abs(coord - low)
    extra = jnp.fmod(coord, span)
    flips = jnp.floor(coord / span)
    return jnp.where(jnp.fmod(flips, 2) == 0, extra + low, span - extra + low)


def _grid_pad(coord, size, padding_mode, align_corners):
    """grid_sample's padding: 0 zeros (left as is), 1 border, 2 reflection."""
    if padding_mode == 1:
        return jnp.clip(coord, 0, size - 1)
    if padding_mode == 2:
        if align_corners:
            coord = _grid_reflect(coord, 0, 2 * (size - 1))
        else:
            coord = _grid_reflect(coord, -1, 2 * size - 1)
        return jnp.clip(coord, 0, size - 1)
    return coord


def _grid_gather(x, iy, ix):
    """x[n, :, iy, ix] for integer maps (N, Ho, Wo); 0 where out of bounds."""
    h, w = x.shape[2], x.shape[3]
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iy = jnp.clip(iy, 0, h - 1).astype(jnp.int32)
    ix = jnp.clip(ix, 0, w - 1).astype(jnp.int32)
    values = jax.vmap(lambda img, yy, xx: img[:, yy, xx])(x, iy, ix)
    return jnp.where(inside[:, None], values, 0)


@lowering(aten.grid_sampler_2d.default, aten.grid_sampler.default)
def grid_sampler_2d(ctx, x, grid, interpolation_mode, padding_mode, align_corners):
    """grid_sample on (N, C, H, W): modes 0 bilinear, 1 nearest, 2 bicubic."""
    h, w = x.shape[2], x.shape[3]
    gx, gy = grid[..., 0], grid[..., 1]
    if interpolation_mode == 2:
        ix = _grid_unnormalize(gx, w, align_corners)
        iy = _grid_unnormalize(gy, h, align_corners)
        x0, y0 = jnp.floor(ix), jnp.floor(iy)
        wx, wy = _cubic_weights(ix - x0), _cubic_weights(iy - y0)
        out = 0
        for i in range(4):
            for j in range(4):
                yy = _grid_pad(y0 - 1 + i, h, padding_mode, align_corners)
                xx = _grid_pad(x0 - 1 + j, w, padding_mode, align_corners)
                # torch truncates the padded coordinate to an int.
                value = _grid_gather(x, jnp.trunc(yy), jnp.trunc(xx))
                out = out + value * (wy[i] * wx[j])[:, None]
        return out.astype(ctx.dtype)
    ix = _grid_pad(_grid_unnormalize(gx, w, align_corners), w, padding_mode, align_corners)
    iy = _grid_pad(_grid_unnormalize(gy, h, align_corners), h, padding_mode, align_corners)
    if interpolation_mode == 1:
        return _grid_gather(x, jnp.round(iy), jnp.round(ix)).astype(ctx.dtype)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    out = (
        _grid_gather(x, y0, x0) * ((x1 - ix) * (y1 - iy))[:, None]
        + _grid_gather(x, y0, x1) * ((ix - x0) * (y1 - iy))[:, None]
        + _grid_gather(x, y1, x0) * ((x1 - ix) * (iy - y0))[:, None]
        + _grid_gather(x, y1, x1) * ((ix - x0) * (iy - y0))[:, None]
    )
    return out.astype(ctx.dtype)


def _grid_gather_3d(x, iz, iy, ix):
    """x[n, :, iz, iy, ix] for integer maps (N, Do, Ho, Wo); 0 where out of bounds."""
    d, h, w = x.shape[2], x.shape[3], x.shape[4]
    inside = (iz >= 0) & (iz < d) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iz = jnp.clip(iz, 0, d - 1).astype(jnp.int32)
    iy = jnp.clip(iy, 0, h - 1).astype(jnp.int32)
    ix = jnp.clip(ix, 0, w - 1).astype(jnp.int32)
    values = jax.vmap(lambda vol, zz, yy, xx: vol[:, zz, yy, xx])(x, iz, iy, ix)
    return jnp.where(inside[:, None], values, 0)


@lowering(aten.grid_sampler_3d.default)
def grid_sampler_3d(ctx, x, grid, interpolation_mode, padding_mode, align_corners):
    """grid_sample on (N, C, D, H, W): modes 0 (tri)linear, 1 nearest (torch has no 3-D bicubic)."""
    if interpolation_mode not in (0, 1):
        raise NotImplementedError("grid_sampler_3d supports bilinear (0) and nearest (1) interpolation only")
    d, h, w = x.shape[2], x.shape[3], x.shape[4]
    ix = _grid_pad(_grid_unnormalize(grid[..., 0], w, align_corners), w, padding_mode, align_corners)
    iy = _grid_pad(_grid_unnormalize(grid[..., 1], h, align_corners), h, padding_mode, align_corners)
    iz = _grid_pad(_grid_unnormalize(grid[..., 2], d, align_corners), d, padding_mode, align_corners)
    if interpolation_mode == 1:
        return _grid_gather_3d(x, jnp.round(iz), jnp.round(iy), jnp.round(ix)).astype(ctx.dtype)
    x0, y0, z0 = jnp.floor(ix), jnp.floor(iy), jnp.floor(iz)
    x1, y1, z1 = x0 + 1, y0 + 1, z0 + 1
    wx = ((x0, x1 - ix), (x1, ix - x0))
    wy = ((y0, y1 - iy), (y1, iy - y0))
    wz = ((z0, z1 - iz), (z1, iz - z0))
    out = 0
    for zc, zw in wz:
        for yc, yw in wy:
            for xc, xw in wx:
                out = out + _grid_gather_3d(x, zc, yc, xc) * (xw * yw * zw)[:, None]
    return out.astype(ctx.dtype)
