"""Exact int64 with JAX's x64 mode off: run-time proof that int32 did not wrap.

With x64 off, JAX holds torch's int64 as int32. Most integer ops cannot leave
the range of their inputs (comparisons, indexing, min/max, sort, where,
bitwise and/or/xor, right shifts, division and remainder by a nonzero
divisor, shape ops), so int32 gives torch's exact answer. The ops that can
(sums, products, negation, powers, left shifts, casts from floating point)
compute in int32 and record, with `ctx.require`, a condition that holds
exactly when no value wrapped; a failed condition is an `X64Error` naming
`jax_enable_x64` (see bridge/checks.py for when it is raised). Each check is
exact: it never rejects a result that fits and never accepts one that does
not, except `pow`, which rejects results within 2**-20 of the int32 limit
rather than risk accepting a wrapped one.

Nothing here runs when x64 is on (int64 is then computed as int64) or when the
op's result is not int64.
"""

from __future__ import annotations

import numpy as np
import torch
from jax import lax
from jax import numpy as jnp

from bridge import dtypes
from bridge.dlpack import X64Error

_INT32 = np.iinfo(np.int32)
_FIX = (
    "Enable 64-bit JAX with `jax.config.update('jax_enable_x64', True)` (or JAX_ENABLE_X64=1) "
    "before converting"
)
#: Reductions longer than this cannot be checked with 8-bit limbs in int32.
_MAX_CHECKED_LENGTH = 2**23 - 1


def narrowed(ctx, i: int | None = None) -> bool:
    """Whether torch computes this output in int64 while JAX holds it as int32."""
    out = ctx.out if i is None else ctx.out[i]
    return (
        isinstance(out, torch.Tensor) and out.dtype == torch.int64 and not dtypes.x64_enabled()
    )


def _require(ctx, ok, what: str) -> None:
    ctx.require(
        ok, X64Error,
        f"{what} computed by torch in int64 does not fit in int32, the widest integer JAX "
        f"holds with x64 off. {_FIX}",
    )


def scalar(ctx, value):
    """A Python int operand of an int64 op, refused at conversion if int32 cannot hold it."""
    if narrowed(ctx) and isinstance(value, int) and not isinstance(value, bool):
        if not _INT32.min <= value <= _INT32.max:
            raise X64Error(
                f"{ctx.node.target} uses the integer constant {value}, which does not fit in "
                f"int32, the widest integer JAX holds with x64 off. {_FIX}."
            )
    return value


def add(ctx, x, y, out):
    """`out = x + y` (wrapped): overflow iff x and y share a sign that out lacks."""
    if narrowed(ctx):
        _require(ctx, ((x ^ out) & (y ^ out)) >= 0, "a sum")
    return out


def sub(ctx, x, y, out):
    """`out = x - y` (wrapped): overflow iff x and y differ in sign and out differs from x."""
    if narrowed(ctx):
        _require(ctx, ((x ^ y) & (x ^ out)) >= 0, "a difference")
    return out


def _product_ok(x, y, out):
    """Whether `out = x * y` (wrapped) is exact.

    If x*y wrapped by k * 2**32 (k != 0), out // x differs from y by at least
    2**32 / |x| >= 2; x == -1 is the one case where the division itself would
    overflow (INT_MIN // -1), handled apart.
    """
    x, y, out = jnp.broadcast_arrays(x, y, out)
    safe_x = jnp.where((x == 0) | (x == -1), 1, x)
    return jnp.where(
        x == 0, True, jnp.where(x == -1, y != _INT32.min, jnp.floor_divide(out, safe_x) == y)
    )


def mul(ctx, x, y, out):
    if narrowed(ctx):
        _require(ctx, _product_ok(x, y, out), "a product")
    return out


def negate(ctx, x, out):
    """neg and abs: only INT_MIN has no int32 negation."""
    if narrowed(ctx):
        _require(ctx, x != _INT32.min, "a negation")
    return out


def left_shift(ctx, x, shift, out):
    if narrowed(ctx):
        shift = jnp.asarray(shift)
        back = lax.shift_right_arithmetic(out, jnp.clip(shift, 0, 31).astype(out.dtype))
        ok = (shift >= 0) & (shift < 32) & (back == x)
        _require(ctx, ok, "a left shift")
    return out


def power(ctx, x, y, out):
    """An integer power: checked against a float32 estimate, conservatively."""
    if narrowed(ctx):
        magnitude = jnp.power(jnp.abs(jnp.asarray(x, jnp.float32)), jnp.asarray(y, jnp.float32))
        _require(ctx, magnitude < float(2**31) * (1 - 2.0**-20), "a power")
    return out


def from_float(ctx, x, out):
    """A cast from floating point to int64: torch keeps values int32 would saturate."""
    if narrowed(ctx) and jnp.issubdtype(x.dtype, jnp.floating):
        # Truncation toward zero: finite values in (INT_MIN - 1, INT_MAX + 1)
        # fit. NaN and infinities have no integer value in either framework
        # (C++ leaves the cast undefined; models cast -inf and discard it, as
        # T5's relative-position buckets do), so they are not an overflow.
        ok = ~jnp.isfinite(x) | ((x > _INT32.min - 1.0) & (x < _INT32.max + 1.0))
        _require(ctx, ok, "a cast from floating point")
    return out


def _limbs(x):
    """x == (l3 << 24) + (l2 << 16) + (l1 << 8) + l0, l0..l2 in [0, 255], l3 in [-128, 127]."""
    x = x.astype(jnp.int32)
    return [x & 255, (x >> 8) & 255, (x >> 16) & 255, x >> 24]


def _top_limb_fits(sums) -> jnp.ndarray:
    """Carry limb sums upwards; the total fits int32 iff the top limb stays in [-128, 127]."""
    carry = sums[0] >> 8
    for s in sums[1:3]:
        carry = (s + carry) >> 8
    top = sums[3] + carry
    return (top >= -128) & (top <= 127)


def _length(ctx, n: int) -> None:
    if n > _MAX_CHECKED_LENGTH:
        raise X64Error(
            f"{ctx.node.target} adds up {n} int64 values; with x64 off bridge can only prove "
            f"such a sum exact for up to {_MAX_CHECKED_LENGTH} values. {_FIX}."
        )


def sum_(ctx, x, axes, keepdims: bool, out):
    """An integer sum reduced over `axes`, exact through 8-bit limbs (no limb sum can wrap)."""
    if narrowed(ctx) and (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
        n = int(np.prod([x.shape[a] for a in axes])) if axes is not None else x.size
        _length(ctx, n)
        sums = [jnp.sum(limb, axis=axes, keepdims=keepdims) for limb in _limbs(x)]
        _require(ctx, _top_limb_fits(sums), "a sum")
    return out


def cumsum(ctx, x, axis: int, out):
    if narrowed(ctx) and (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
        _length(ctx, x.shape[axis] if x.ndim else 1)
        sums = [jnp.cumsum(limb, axis=axis) for limb in _limbs(x)]
        _require(ctx, _top_limb_fits(sums), "a cumulative sum")
    return out


def cumprod(ctx, x, axis: int, out):
    """A cumulative integer product: each step is an exact product of the previous one."""
    if narrowed(ctx) and jnp.issubdtype(x.dtype, jnp.integer) and x.ndim and x.shape[axis] > 1:
        x = x.astype(out.dtype)
        prev = lax.slice_in_dim(out, 0, out.shape[axis] - 1, axis=axis)
        step = lax.slice_in_dim(x, 1, x.shape[axis], axis=axis)
        cur = lax.slice_in_dim(out, 1, out.shape[axis], axis=axis)
        _require(ctx, _product_ok(step, prev, cur), "a product")
    return out


def prod(ctx, x, axes, out):
    """An integer product over `axes`: the cumulative product along them, checked step by step."""
    if narrowed(ctx) and jnp.issubdtype(x.dtype, jnp.integer) and x.size:
        x = x.astype(out.dtype)
        if axes is None:
            flat = jnp.ravel(x)[None]
        else:
            axes = tuple(a % x.ndim for a in axes)
            kept = [d for d in range(x.ndim) if d not in axes]
            flat = jnp.reshape(jnp.transpose(x, kept + list(axes)), [x.shape[d] for d in kept] + [-1])
        cumprod(ctx, flat, flat.ndim - 1, jnp.cumprod(flat, axis=-1))
    return out
