"""Elementwise ATen ops: arithmetic, unary math, rounding, bitwise ops, casts, complex.

Every lowering computes in the dtype torch recorded for the node (`ctx.dtype`).
The other elementwise families have their own modules: comparisons, logic and
selection (where, clamp, min/max) in `comparison.py`, activations in
`activations.py`, special functions (erf, gamma, Bessel, ...) in `special.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from bridge.ops import exact
from bridge.ops.families import binary, unary
from bridge.ops.operands import cast, is_float, safe_where
from bridge.ops.registry import lowering

aten = torch.ops.aten


def true_divide(num, den):
    """num / den rounded as IEEE division, also where XLA would not.

    XLA (on CPU) multiplies by the reciprocal when the divisor is a constant or
    the same for a whole loop, which can be one ulp off. Where a lowering must
    match torch bit for bit (bin edges, bin indices), the divisor is given the
    dividend's shape and batching, behind an optimization barrier.
    """
    num, den = jnp.asarray(num), jnp.asarray(den)
    shape = jnp.broadcast_shapes(num.shape, den.shape)
    num = jnp.broadcast_to(num, shape)
    den = den + jnp.where(jnp.isfinite(num), num * 0, 0).astype(den.dtype)
    return num / lax.optimization_barrier(den)


# -- arithmetic ---------------------------------------------------------------


def _scaled(ctx, alpha, y):
    """`alpha * y`, checked exact when torch computes it in int64 (bridge/ops/exact.py)."""
    if alpha == 1:
        return y
    alpha = jnp.asarray(exact.scalar(ctx, alpha), ctx.dtype)
    return exact.mul(ctx, alpha, y, alpha * y)


@lowering(aten.add.Tensor, aten.add.Scalar)
def add(ctx, x, y, alpha=1):
    x, y = cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    y = _scaled(ctx, alpha, y)
    return exact.add(ctx, x, y, x + y)


@lowering(aten.sub.Tensor, aten.sub.Scalar)
def sub(ctx, x, y, alpha=1):
    x, y = cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    y = _scaled(ctx, alpha, y)
    return exact.sub(ctx, x, y, x - y)


@lowering(aten.rsub.Tensor, aten.rsub.Scalar)
def rsub(ctx, x, y, alpha=1):
    x, y = cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    x = _scaled(ctx, alpha, x)
    return exact.sub(ctx, y, x, y - x)


@lowering(aten.mul.Tensor, aten.mul.Scalar)
def mul(ctx, x, y):
    x, y = cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    return exact.mul(ctx, x, y, x * y)


@lowering(aten.div.Tensor, aten.div.Scalar, aten.true_divide.Tensor, aten.true_divide.Scalar)
def div(ctx, x, y):
    x, y = cast(ctx.dtype, x, y)
    return x / y


def _integer_divisor(ctx, y, x=None) -> None:
    """torch raises on an integer division by zero; XLA would return a number.

    With `x`, the quotient's one overflow (INT_MIN // -1) is checked too.
    """
    if not is_float(ctx.dtype) and np.dtype(ctx.dtype) != np.bool_:
        ctx.require(
            jnp.asarray(y) != 0, ZeroDivisionError,
            "integer division by zero (torch raises ZeroDivisionError)",
        )
        if x is not None and exact.narrowed(ctx):
            x, y = jnp.asarray(x), jnp.asarray(y)
            exact.negate(ctx, jnp.where(y == -1, x, 0), None)


def _floor_divide(x, y):
    """torch's floor division (`div_floor_floating` for floats, Python `//` for integers)."""
    if not is_float(x.dtype):
        return jnp.floor_divide(x, y)
    mod = jnp.fmod(x, y)
    quotient = (x - mod) / y
    quotient = jnp.where((mod != 0) & ((y < 0) != (mod < 0)), quotient - 1, quotient)
    floor = jnp.floor(quotient)
    floor = jnp.where(quotient - floor > 0.5, floor + 1, floor)
    floor = jnp.where(quotient == 0, jnp.copysign(jnp.zeros_like(x), x / y), floor)
    return lax.stop_gradient(jnp.where(y == 0, x / y, floor))


@lowering(aten.div.Tensor_mode, aten.div.Scalar_mode)
def div_mode(ctx, x, y, *, rounding_mode=None):
    x, y = cast(ctx.dtype, x, y)
    if rounding_mode is None:
        return x / y
    _integer_divisor(ctx, y, x)
    if rounding_mode == "floor":
        return _floor_divide(x, y)
    if is_float(ctx.dtype):
        return lax.stop_gradient(jnp.trunc(x / y))
    return lax.div(*jnp.broadcast_arrays(x, y))


@lowering(aten.floor_divide.default, aten.floor_divide.Scalar)
def floor_divide(ctx, x, y):
    _integer_divisor(ctx, y, x)
    return _floor_divide(*cast(ctx.dtype, x, y))


@lowering(aten.remainder.Tensor, aten.remainder.Scalar, aten.remainder.Scalar_Tensor)
def remainder(ctx, x, y):
    _integer_divisor(ctx, y)
    return jnp.remainder(*cast(ctx.dtype, x, y))


@lowering(aten.fmod.Tensor, aten.fmod.Scalar)
def fmod(ctx, x, y):
    _integer_divisor(ctx, y)
    return jnp.fmod(*cast(ctx.dtype, x, y))


@lowering(aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar, aten.pow.Scalar)
def pow(ctx, x, y):
    (x,) = cast(ctx.dtype, exact.scalar(ctx, x))
    if isinstance(y, int) and not isinstance(y, bool):
        out = lax.integer_pow(x, y) if y >= 0 or is_float(ctx.dtype) else jnp.power(x, y)
        return exact.power(ctx, x, y, out)
    (y,) = cast(ctx.dtype, y)
    return exact.power(ctx, x, y, jnp.power(x, y))


@lowering(aten.addcmul.default)
def addcmul(ctx, x, t1, t2, *, value=1):
    x, t1, t2 = cast(ctx.dtype, x, t1, t2)
    return x + value * t1 * t2


@lowering(aten.addcdiv.default)
def addcdiv(ctx, x, t1, t2, *, value=1):
    x, t1, t2 = cast(ctx.dtype, x, t1, t2)
    return x + value * (t1 / t2)


@lowering(aten.lerp.Scalar, aten.lerp.Tensor)
def lerp(ctx, start, end, weight):
    start, end, weight = cast(ctx.dtype, start, end, weight)
    diff = end - start
    return jnp.where(jnp.abs(weight) < 0.5, start + weight * diff, end - diff * (1 - weight))


binary(aten.hypot.default, jnp.hypot)


@lowering(aten.copysign.Tensor, aten.copysign.Scalar)
def copysign(ctx, x, y):
    x, y = cast(ctx.dtype, x, y)
    magnitude = jnp.abs(x)
    return jnp.where(jnp.signbit(y), -magnitude, magnitude)


@lowering(aten.nextafter.default)
def nextafter(ctx, x, y):
    # torch's gradient is the identity for x and zero for y (JAX defines none).
    x, y = cast(ctx.dtype, x, y)
    step = jnp.nextafter(lax.stop_gradient(x), lax.stop_gradient(y)) - lax.stop_gradient(x)
    return x + step


@lowering(aten.heaviside.default)
def heaviside(ctx, x, values):
    x, values = cast(ctx.dtype, x, values)
    return jnp.where(x == 0, values, (x > 0).astype(ctx.dtype))


binary(aten.logaddexp.default, jnp.logaddexp)
binary(aten.logaddexp2.default, jnp.logaddexp2)


@lowering(aten.xlogy.Tensor, aten.xlogy.Scalar_Self, aten.xlogy.Scalar_Other)
def xlogy(ctx, x, y):
    x, y = cast(ctx.dtype, x, y)
    out = jnp.where(x == 0, 0, x * jnp.log(safe_where(x == 0, 1, y)))
    return jnp.where(jnp.isnan(y), y, out)


# -- unary math: f(x) computed in the output dtype ------------------------------


def _reciprocal(x):
    return 1 / x


def _sign(x):
    return x if x.dtype == jnp.bool_ else jnp.sign(x)


def _sgn(x):
    if not jnp.iscomplexobj(x):
        return _sign(x)
    magnitude = jnp.abs(x)
    return jnp.where(magnitude == 0, 0, x / safe_where(magnitude == 0, 1, magnitude))


def _frac(x):
    return x - jnp.trunc(x)


def _sinc(x):
    return jnp.sinc(x)


unary(aten.sign.default, _sign)
unary(aten.sgn.default, _sgn)
unary(aten.reciprocal.default, _reciprocal)
unary(aten.sqrt.default, jnp.sqrt)
unary(aten.rsqrt.default, lax.rsqrt)
unary(aten.square.default, jnp.square)
unary(aten.exp.default, jnp.exp)
unary(aten.exp2.default, jnp.exp2)
unary(aten.expm1.default, jnp.expm1)
unary(aten.log.default, jnp.log)
unary(aten.log2.default, jnp.log2)
unary(aten.log10.default, jnp.log10)
unary(aten.log1p.default, jnp.log1p)
unary(aten.sin.default, jnp.sin)
unary(aten.cos.default, jnp.cos)
unary(aten.tan.default, jnp.tan)
unary(aten.asin.default, jnp.arcsin)
unary(aten.acos.default, jnp.arccos)
unary(aten.atan.default, jnp.arctan)
unary(aten.sinh.default, jnp.sinh)
unary(aten.cosh.default, jnp.cosh)
unary(aten.tanh.default, jnp.tanh)
unary(aten.asinh.default, jnp.arcsinh)
unary(aten.acosh.default, jnp.arccosh)
unary(aten.atanh.default, jnp.arctanh)
unary(aten.deg2rad.default, jnp.deg2rad)
unary(aten.rad2deg.default, jnp.rad2deg)
unary(aten.frac.default, _frac)
unary(aten.sinc.default, _sinc)


@lowering(aten.neg.default)
def neg(ctx, x):
    x = jnp.asarray(x, ctx.dtype)
    return exact.negate(ctx, x, jnp.negative(x))


@lowering(aten.abs.default)
def abs_(ctx, x):
    if not jnp.iscomplexobj(x):
        x = jnp.asarray(x, ctx.dtype)
    return exact.negate(ctx, x, jnp.abs(x).astype(ctx.dtype))


def _integer_identity(fn):
    """Rounding ops return integer (and bool) inputs unchanged."""

    def rounded(x):
        return fn(x) if is_float(x.dtype) else x

    return rounded


unary(aten.floor.default, _integer_identity(jnp.floor))
unary(aten.ceil.default, _integer_identity(jnp.ceil))
unary(aten.trunc.default, _integer_identity(jnp.trunc))
unary(aten.round.default, _integer_identity(jnp.round))


@lowering(aten.round.decimals)
def round_decimals(ctx, x, *, decimals=0):
    if not is_float(ctx.dtype):
        return x
    scale = 10.0 ** abs(decimals)
    if decimals >= 0:
        return jnp.round(x * scale) / scale
    return jnp.round(x / scale) * scale


@lowering(aten.atan2.default, aten.atan2.out)
def atan2(ctx, y, x, *, out=None):
    return jnp.arctan2(*cast(ctx.dtype, y, x))


@lowering(aten.logit.default)
def logit(ctx, x, eps=None):
    (x,) = cast(ctx.dtype, x)
    if eps is not None:
        x = jnp.where(x < eps, eps, jnp.where(x > 1 - eps, 1 - eps, x))
    return jnp.log(x / (1 - x))


@lowering(aten.nan_to_num.default)
def nan_to_num(ctx, x, nan=None, posinf=None, neginf=None):
    if not is_float(ctx.dtype):
        return x
    return jnp.nan_to_num(x, nan=0.0 if nan is None else nan, posinf=posinf, neginf=neginf)


# -- floating-point decomposition: frexp, ldexp, signbit ------------------------


def _float_layout(dtype):
    """(unsigned type of the same width, mantissa bits, exponent bias) of a float dtype."""
    info = jnp.finfo(dtype)
    return jnp.dtype(f"uint{info.bits}"), int(info.nmant), (1 << (int(info.nexp) - 1)) - 1


def _frexp_parts(x):
    """torch's (std::frexp's) mantissa and exponent, read off the bits of `x`.

    Subnormals are normalised exactly (XLA's CPU arithmetic flushes them, so
    scaling by powers of two is not an option); 0, inf and NaN keep their value
    with exponent 0.
    """
    utype, nmant, bias = _float_layout(x.dtype)
    width = jnp.iinfo(utype).bits
    one = jnp.asarray(1, utype)
    bits = lax.bitcast_convert_type(x, utype)
    sign = bits & (one << (width - 1))
    field = ((bits >> nmant) & ((one << (width - 1 - nmant)) - 1)).astype(jnp.int32)
    fraction = bits & ((one << nmant) - 1)
    subnormal = (field == 0) & (fraction != 0)
    top = (width - 1) - lax.clz(fraction).astype(jnp.int32)  # highest set bit of a subnormal
    exponent = jnp.where(subnormal, top + 2 - bias - nmant, field - bias + 1)
    shift = jnp.where(subnormal, nmant - top, 0).astype(utype)
    fraction = (fraction << shift) & ((one << nmant) - 1)
    mantissa = lax.bitcast_convert_type(sign | (jnp.asarray(bias - 1, utype) << nmant) | fraction, x.dtype)
    special = ((field == 0) & ~subnormal) | (field == (2 * bias + 1))  # zero, inf, NaN
    return jnp.where(special, x, mantissa), jnp.where(special, 0, exponent)


@jax.custom_jvp
def _frexp_mantissa(x):
    return _frexp_parts(x)[0]


@_frexp_mantissa.defjvp
def _frexp_mantissa_jvp(primals, tangents):
    # torch: d mantissa = grad / 2**exponent
    (x,), (t,) = primals, tangents
    mantissa, exponent = _frexp_parts(x)
    return mantissa, t / jnp.exp2(exponent.astype(x.dtype))


@lowering(aten.frexp.Tensor)
def frexp(ctx, x):
    return _frexp_mantissa(x), _frexp_parts(lax.stop_gradient(x))[1].astype(ctx.dtype_of(1))


@lowering(aten.ldexp.Tensor)
def ldexp(ctx, x, other):
    # torch: self * pow(2, other), so overflow of 2**other shows as it does there.
    x, other = cast(ctx.dtype, x, other)
    return x * jnp.power(jnp.asarray(2, ctx.dtype), other)


@lowering(aten.signbit.default)
def signbit(ctx, x):
    if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return jnp.zeros(x.shape, jnp.bool_)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x < 0
    return jnp.signbit(x)


# -- bits -----------------------------------------------------------------------


binary((aten.bitwise_and.Tensor, aten.bitwise_and.Scalar), jnp.bitwise_and)
binary((aten.bitwise_or.Tensor, aten.bitwise_or.Scalar), jnp.bitwise_or)
binary((aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar), jnp.bitwise_xor)


@lowering(
    aten.bitwise_left_shift.Tensor,
    aten.bitwise_left_shift.Tensor_Scalar,
    aten.bitwise_left_shift.Scalar_Tensor,
    aten.__lshift__.Tensor,
    aten.__lshift__.Scalar,
)
def left_shift(ctx, x, y):
    x, y = cast(ctx.dtype, x, y)
    return exact.left_shift(ctx, x, y, jnp.left_shift(x, y))


binary(
    (
        aten.bitwise_right_shift.Tensor,
        aten.bitwise_right_shift.Tensor_Scalar,
        aten.bitwise_right_shift.Scalar_Tensor,
        aten.__rshift__.Tensor,
        aten.__rshift__.Scalar,
    ),
    jnp.right_shift,
)


@lowering(aten.bitwise_not.default)
def bitwise_not(ctx, x):
    return jnp.invert(x)


# -- casts ------------------------------------------------------------------------


def _convert(x, dtype):
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.real(x)
    return jnp.asarray(x).astype(dtype)


@lowering(aten._to_copy.default)
def to_copy(ctx, x, **kwargs):
    return exact.from_float(ctx, x, _convert(x, ctx.dtype))


@lowering(aten.type_as.default)
def type_as(ctx, x, other):
    return exact.from_float(ctx, x, _convert(x, ctx.dtype))


# -- complex numbers ----------------------------------------------------------------


@lowering(aten.view_as_real.default)
def view_as_real(ctx, x):
    return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)


@lowering(aten.view_as_complex.default)
def view_as_complex(ctx, x):
    return lax.complex(x[..., 0], x[..., 1])


@lowering(aten._conj.default, aten.conj_physical.default, aten._conj_physical.default)
def conj(ctx, x):
    return jnp.conj(x)


@lowering(aten.angle.default)
def angle(ctx, x):
    if jnp.iscomplexobj(x):
        return jnp.angle(x)
    (x,) = cast(ctx.dtype, x)
    return jnp.where(jnp.isnan(x), x, jnp.where(x < 0, math.pi, 0.0).astype(ctx.dtype))


@lowering(aten.polar.default)
def polar(ctx, magnitude, phase):
    return complex_(ctx, magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))


@lowering(aten.complex.default)
def complex_(ctx, real, imag):
    return lax.complex(*jnp.broadcast_arrays(real, imag))
