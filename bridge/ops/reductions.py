"""Reduction ATen ops: sum, mean, var, min/max, norms, cumulative ops, hash_tensor.

Ops that return indices (max.dim, cummax, ...) compute the indices first and
gather the values through them, so the gradient reaches exactly the element
torch's backward scatters into. Sorting and selection (sort, topk, median,
...) are in `sorting.py`, histograms in `histograms.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops import exact
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _dims(x, dim) -> tuple[int, ...]:
    """ATen's `dim` argument (None, [], an int or a list) as normalised axes; None/[] is every axis."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(x.ndim))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return tuple(sorted({d % max(x.ndim, 1) for d in dims})) if x.ndim else ()


def axis_of(x, dim: int) -> int | None:
    """A single `dim` as an axis; None for a 0-d tensor (which torch lets any dim 0/-1 reduce)."""
    return dim % x.ndim if x.ndim else None


def _size(x, dims) -> int:
    return math.prod(x.shape[d] for d in dims)


def gather_along(x, indices, axis):
    """Values at `indices` along `axis` (differentiable with respect to `x`)."""
    if axis is None:
        return x
    return jnp.take_along_axis(x, indices, axis=axis)


def unkeep(x, axis, keepdim):
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
    axis = axis_of(x, dim)
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
    axis = axis_of(x, dim)
    if axis is None:
        return x, jnp.zeros((), ctx.dtype_of(1))
    index = find(x, axis=axis, keepdims=True).astype(ctx.dtype_of(1))
    value = gather_along(x, index, axis)
    return unkeep(value, axis, keepdim), unkeep(index, axis, keepdim)


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
    axis = axis_of(x, dim)
    if axis is None:
        return x.astype(ctx.dtype)
    return exact.cumsum(ctx, x, axis, jnp.cumsum(x.astype(ctx.dtype), axis=axis))


@lowering(aten.cumprod.default)
def cumprod(ctx, x, dim, *, dtype=None):
    axis = axis_of(x, dim)
    x = x.astype(ctx.dtype)
    return x if axis is None else exact.cumprod(ctx, x, axis, jnp.cumprod(x, axis=axis))


@lowering(aten.logcumsumexp.default)
def logcumsumexp(ctx, x, dim):
    axis = axis_of(x, dim)
    x = x.astype(ctx.dtype)
    return x if axis is None or x.shape[axis] == 0 else lax.cumlogsumexp(x, axis=axis)


def _cumulative_extreme(ctx, x, dim, later_wins):
    """cummax/cummin: running extreme and the last index where it occurs (NaN beats everything)."""
    axis = axis_of(x, dim)
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
    return gather_along(x, indices, axis), indices


@lowering(aten.cummax.default)
def cummax(ctx, x, dim):
    return _cumulative_extreme(ctx, x, dim, jnp.greater_equal)


@lowering(aten.cummin.default)
def cummin(ctx, x, dim):
    return _cumulative_extreme(ctx, x, dim, jnp.less_equal)


# -- hash_tensor -------------------------------------------------------------------------------


def float_words(x):
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
        high, low = float_words(x)
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
