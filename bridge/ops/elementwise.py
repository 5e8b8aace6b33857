"""Elementwise ATen ops: arithmetic, comparisons, activations, special functions, casts, complex.

Every lowering computes in the dtype torch recorded for the node (`ctx.dtype`),
or, where the output dtype says nothing about the computation (comparisons),
in torch's promoted dtype of the operands. Gradients follow torch's
conventions at the kinks (clamp passes the gradient at its bounds, hardtanh
does not, relu is 0 at 0), so several activations are written with
`jnp.where` rather than `jnp.maximum`/`jnp.clip`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
import torch
from jax import lax

from bridge import dtypes
from bridge.ops import exact
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _promoted_dtype(ctx, count: int = 2) -> np.dtype:
    """torch's result type of the node's first `count` operands (tensors or Python scalars)."""
    operands = []
    for arg in ctx.node.args[:count]:
        if isinstance(arg, torch.fx.Node):
            val = arg.meta["val"]
            operands.append(torch.empty((0,) * min(val.ndim, 1), dtype=val.dtype, device="meta"))
        else:
            operands.append(arg)
    dtype = operands[0].dtype if len(operands) == 1 else torch.result_type(*operands)
    return dtypes.canonical_jax_dtype(dtype)


def _cast(dtype, *values):
    return [jnp.asarray(v, dtype) for v in values]


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _safe(pred, x, fill):
    """`x` where `pred` holds, else `fill`: keeps untaken `jnp.where` branches finite (no NaN gradients)."""
    return jnp.where(pred, x, fill)


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
    x, y = _cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    y = _scaled(ctx, alpha, y)
    return exact.add(ctx, x, y, x + y)


@lowering(aten.sub.Tensor, aten.sub.Scalar)
def sub(ctx, x, y, alpha=1):
    x, y = _cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    y = _scaled(ctx, alpha, y)
    return exact.sub(ctx, x, y, x - y)


@lowering(aten.rsub.Tensor, aten.rsub.Scalar)
def rsub(ctx, x, y, alpha=1):
    x, y = _cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    x = _scaled(ctx, alpha, x)
    return exact.sub(ctx, y, x, y - x)


@lowering(aten.mul.Tensor, aten.mul.Scalar)
def mul(ctx, x, y):
    x, y = _cast(ctx.dtype, exact.scalar(ctx, x), exact.scalar(ctx, y))
    return exact.mul(ctx, x, y, x * y)


@lowering(aten.div.Tensor, aten.div.Scalar, aten.true_divide.Tensor, aten.true_divide.Scalar)
def div(ctx, x, y):
    x, y = _cast(ctx.dtype, x, y)
    return x / y


def _integer_divisor(ctx, y, x=None) -> None:
    """torch raises on an integer division by zero; XLA would return a number.

    With `x`, the quotient's one overflow (INT_MIN // -1) is checked too.
    """
    if not _is_float(ctx.dtype) and np.dtype(ctx.dtype) != np.bool_:
        ctx.require(
            jnp.asarray(y) != 0, ZeroDivisionError,
            "integer division by zero (torch raises ZeroDivisionError)",
        )
        if x is not None and exact.narrowed(ctx):
            x, y = jnp.asarray(x), jnp.asarray(y)
            exact.negate(ctx, jnp.where(y == -1, x, 0), None)


def _floor_divide(x, y):
    """torch's floor division (`div_floor_floating` for floats, Python `//` for integers)."""
    if not _is_float(x.dtype):
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
    x, y = _cast(ctx.dtype, x, y)
    if rounding_mode is None:
        return x / y
    _integer_divisor(ctx, y, x)
    if rounding_mode == "floor":
        return _floor_divide(x, y)
    if _is_float(ctx.dtype):
        return lax.stop_gradient(jnp.trunc(x / y))
    return lax.div(*jnp.broadcast_arrays(x, y))


@lowering(aten.floor_divide.default, aten.floor_divide.Scalar)
def floor_divide(ctx, x, y):
    _integer_divisor(ctx, y, x)
    return _floor_divide(*_cast(ctx.dtype, x, y))


@lowering(aten.remainder.Tensor, aten.remainder.Scalar, aten.remainder.Scalar_Tensor)
def remainder(ctx, x, y):
    _integer_divisor(ctx, y)
    return jnp.remainder(*_cast(ctx.dtype, x, y))


@lowering(aten.fmod.Tensor, aten.fmod.Scalar)
def fmod(ctx, x, y):
    _integer_divisor(ctx, y)
    return jnp.fmod(*_cast(ctx.dtype, x, y))


@lowering(aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar, aten.pow.Scalar)
def pow(ctx, x, y):
    (x,) = _cast(ctx.dtype, exact.scalar(ctx, x))
    if isinstance(y, int) and not isinstance(y, bool):
        out = lax.integer_pow(x, y) if y >= 0 or _is_float(ctx.dtype) else jnp.power(x, y)
        return exact.power(ctx, x, y, out)
    (y,) = _cast(ctx.dtype, y)
    return exact.power(ctx, x, y, jnp.power(x, y))


@lowering(aten.addcmul.default)
def addcmul(ctx, x, t1, t2, *, value=1):
    x, t1, t2 = _cast(ctx.dtype, x, t1, t2)
    return x + value * t1 * t2


@lowering(aten.addcdiv.default)
def addcdiv(ctx, x, t1, t2, *, value=1):
    x, t1, t2 = _cast(ctx.dtype, x, t1, t2)
    return x + value * (t1 / t2)


@lowering(aten.lerp.Scalar, aten.lerp.Tensor)
def lerp(ctx, start, end, weight):
    start, end, weight = _cast(ctx.dtype, start, end, weight)
    diff = end - start
    return jnp.where(jnp.abs(weight) < 0.5, start + weight * diff, end - diff * (1 - weight))


@lowering(aten.hypot.default)
def hypot(ctx, x, y):
    return jnp.hypot(*_cast(ctx.dtype, x, y))


@lowering(aten.copysign.Tensor, aten.copysign.Scalar)
def copysign(ctx, x, y):
    x, y = _cast(ctx.dtype, x, y)
    magnitude = jnp.abs(x)
    return jnp.where(jnp.signbit(y), -magnitude, magnitude)


@lowering(aten.nextafter.default)
def nextafter(ctx, x, y):
    # torch's gradient is the identity for x and zero for y (JAX defines none).
    x, y = _cast(ctx.dtype, x, y)
    step = jnp.nextafter(lax.stop_gradient(x), lax.stop_gradient(y)) - lax.stop_gradient(x)
    return x + step


@lowering(aten.heaviside.default)
def heaviside(ctx, x, values):
    x, values = _cast(ctx.dtype, x, values)
    return jnp.where(x == 0, values, (x > 0).astype(ctx.dtype))


@lowering(aten.logaddexp.default)
def logaddexp(ctx, x, y):
    return jnp.logaddexp(*_cast(ctx.dtype, x, y))


@lowering(aten.logaddexp2.default)
def logaddexp2(ctx, x, y):
    return jnp.logaddexp2(*_cast(ctx.dtype, x, y))


@lowering(aten.xlogy.Tensor, aten.xlogy.Scalar_Self, aten.xlogy.Scalar_Other)
def xlogy(ctx, x, y):
    x, y = _cast(ctx.dtype, x, y)
    out = jnp.where(x == 0, 0, x * jnp.log(_safe(x == 0, 1, y)))
    return jnp.where(jnp.isnan(y), y, out)


@lowering(aten.special_xlog1py.default, aten.special_xlog1py.self_scalar, aten.special_xlog1py.other_scalar)
def xlog1py(ctx, x, y):
    x, y = _cast(ctx.dtype, x, y)
    out = jnp.where(x == 0, 0, x * jnp.log1p(_safe(x == 0, 0, y)))
    return jnp.where(jnp.isnan(y), y, out)


@lowering(aten.special_zeta.default, aten.special_zeta.self_scalar, aten.special_zeta.other_scalar)
def zeta(ctx, x, q):
    return jsp.zeta(*_cast(ctx.dtype, x, q))


@lowering(aten.igamma.default)
def igamma(ctx, a, x):
    return jsp.gammainc(*_cast(ctx.dtype, a, x))


@lowering(aten.igammac.default)
def igammac(ctx, a, x):
    return jsp.gammaincc(*_cast(ctx.dtype, a, x))


# -- unary math: f(x) computed in the output dtype ------------------------------


_ZETA_SHIFT = 16


def _zeta(s, q):
    """Hurwitz zeta. JAX's loses accuracy for q below about -8, so q < 0 is first
    moved up by `_ZETA_SHIFT` terms: zeta(s, q) = zeta(s, q + m) + sum_k<m (q + k)^-s."""
    negative = q < 0
    head = sum((q + k) ** -s for k in range(_ZETA_SHIFT))
    return jsp.zeta(s, jnp.where(negative, q + _ZETA_SHIFT, q)) + jnp.where(negative, head, 0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _polygamma(n: int, x):
    if n == 0:
        # torch: digamma(0) = -inf with the sign of -x (lax gives NaN).
        return jnp.where(x == 0, jnp.copysign(jnp.full_like(x, jnp.inf), -x), lax.digamma(x))
    return (-1) ** (n + 1) * math.factorial(n) * _zeta(jnp.asarray(n + 1, x.dtype), x)


@_polygamma.defjvp
def _polygamma_jvp(n, primals, tangents):
    (x,), (t,) = primals, tangents
    return _polygamma(n, x), _polygamma(n + 1, x) * t


def _digamma(x):
    return _polygamma(0, x)


def _reciprocal(x):
    return 1 / x


def _sign(x):
    return x if x.dtype == jnp.bool_ else jnp.sign(x)


def _sgn(x):
    if not jnp.iscomplexobj(x):
        return _sign(x)
    magnitude = jnp.abs(x)
    return jnp.where(magnitude == 0, 0, x / _safe(magnitude == 0, 1, magnitude))


def _frac(x):
    return x - jnp.trunc(x)


@jax.custom_jvp
def _entr(x):
    safe = _safe(x > 0, x, 1)
    return jnp.where(x > 0, -safe * jnp.log(safe), jnp.where(x == 0, 0, jnp.where(x < 0, -jnp.inf, x)))


@_entr.defjvp
def _entr_jvp(primals, tangents):
    # torch's formula everywhere: -(1 + log x) (inf at 0, NaN below).
    (x,), (t,) = primals, tangents
    return _entr(x), -(1 + jnp.log(x)) * t


def _sinc(x):
    return jnp.sinc(x)


_UNARY = {
    aten.sign.default: _sign,
    aten.sgn.default: _sgn,
    aten.reciprocal.default: _reciprocal,
    aten.sqrt.default: jnp.sqrt,
    aten.rsqrt.default: lax.rsqrt,
    aten.square.default: jnp.square,
    aten.exp.default: jnp.exp,
    aten.exp2.default: jnp.exp2,
    aten.expm1.default: jnp.expm1,
    aten.log.default: jnp.log,
    aten.log2.default: jnp.log2,
    aten.log10.default: jnp.log10,
    aten.log1p.default: jnp.log1p,
    aten.sin.default: jnp.sin,
    aten.cos.default: jnp.cos,
    aten.tan.default: jnp.tan,
    aten.asin.default: jnp.arcsin,
    aten.acos.default: jnp.arccos,
    aten.atan.default: jnp.arctan,
    aten.sinh.default: jnp.sinh,
    aten.cosh.default: jnp.cosh,
    aten.tanh.default: jnp.tanh,
    aten.asinh.default: jnp.arcsinh,
    aten.acosh.default: jnp.arccosh,
    aten.atanh.default: jnp.arctanh,
    aten.deg2rad.default: jnp.deg2rad,
    aten.rad2deg.default: jnp.rad2deg,
    aten.frac.default: _frac,
    aten.sigmoid.default: jax.nn.sigmoid,
    aten.special_expit.default: jax.nn.sigmoid,
    aten.erf.default: lax.erf,
    aten.erfc.default: lax.erfc,
    aten.erfinv.default: lax.erf_inv,
    aten.lgamma.default: lax.lgamma,
    aten.digamma.default: _digamma,
    aten.i0.default: jsp.i0,
    aten.special_i0e.default: jsp.i0e,
    aten.special_i1.default: jsp.i1,
    aten.special_i1e.default: jsp.i1e,
    aten.special_ndtr.default: jsp.ndtr,
    aten.special_ndtri.default: jsp.ndtri,
    aten.special_log_ndtr.default: jsp.log_ndtr,
    # jax.scipy.special.erfcx is missing from jax 0.7.1 (the torch_xla env)
    **({aten.special_erfcx.default: jsp.erfcx} if hasattr(jsp, "erfcx") else {}),
    aten.special_entr.default: _entr,
    aten.sinc.default: _sinc,
}


def _register_unary(op, fn):
    def lower(ctx, x):
        if not jnp.iscomplexobj(x):
            x = jnp.asarray(x, ctx.dtype)
        return fn(x).astype(ctx.dtype)

    lower.__name__ = lower.__qualname__ = op.name().split("::")[1]
    lowering(op)(lower)


for _op, _fn in _UNARY.items():
    _register_unary(_op, _fn)


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
        return fn(x) if _is_float(x.dtype) else x

    return rounded


for _op, _fn in {
    aten.floor.default: jnp.floor,
    aten.ceil.default: jnp.ceil,
    aten.trunc.default: jnp.trunc,
    aten.round.default: jnp.round,
}.items():
    _register_unary(_op, _integer_identity(_fn))


@lowering(aten.round.decimals)
def round_decimals(ctx, x, *, decimals=0):
    if not _is_float(ctx.dtype):
        return x
    scale = 10.0 ** abs(decimals)
    if decimals >= 0:
        return jnp.round(x * scale) / scale
    return jnp.round(x / scale) * scale


@lowering(aten.atan2.default, aten.atan2.out)
def atan2(ctx, y, x, *, out=None):
    return jnp.arctan2(*_cast(ctx.dtype, y, x))


@lowering(aten.polygamma.default)
def polygamma(ctx, n, x):
    (x,) = _cast(ctx.dtype, x)
    return _polygamma(n, x)


@lowering(aten.mvlgamma.default)
def mvlgamma(ctx, x, p):
    (x,) = _cast(ctx.dtype, x)
    return jsp.multigammaln(x, p).astype(ctx.dtype)


@lowering(aten.logit.default)
def logit(ctx, x, eps=None):
    (x,) = _cast(ctx.dtype, x)
    if eps is not None:
        x = jnp.where(x < eps, eps, jnp.where(x > 1 - eps, 1 - eps, x))
    return jnp.log(x / (1 - x))


@lowering(aten.nan_to_num.default)
def nan_to_num(ctx, x, nan=None, posinf=None, neginf=None):
    if not _is_float(ctx.dtype):
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
    x, other = _cast(ctx.dtype, x, other)
    return x * jnp.power(jnp.asarray(2, ctx.dtype), other)


@lowering(aten.signbit.default)
def signbit(ctx, x):
    if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return jnp.zeros(x.shape, jnp.bool_)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x < 0
    return jnp.signbit(x)


# -- comparisons, logic, bits ---------------------------------------------------


def _register_compare(ops, fn):
    def lower(ctx, x, y):
        return fn(*_cast(_promoted_dtype(ctx), x, y))

    lower.__name__ = lower.__qualname__ = ops[0].name().split("::")[1]
    lowering(*ops)(lower)


for _name, _fn in {
    "eq": jnp.equal,
    "ne": jnp.not_equal,
    "lt": jnp.less,
    "le": jnp.less_equal,
    "gt": jnp.greater,
    "ge": jnp.greater_equal,
}.items():
    _register_compare((getattr(aten, _name).Tensor, getattr(aten, _name).Scalar), _fn)


def _register_logical(op, fn):
    def lower(ctx, *xs):
        return fn(*[jnp.asarray(x) != 0 for x in xs]).astype(ctx.dtype)

    lower.__name__ = lower.__qualname__ = op.name().split("::")[1]
    lowering(op)(lower)


for _op, _fn in {
    aten.logical_and.default: jnp.logical_and,
    aten.logical_or.default: jnp.logical_or,
    aten.logical_xor.default: jnp.logical_xor,
    aten.logical_not.default: jnp.logical_not,
}.items():
    _register_logical(_op, _fn)


def _register_bitwise(ops, fn):
    def lower(ctx, x, y):
        return fn(*_cast(ctx.dtype, x, y))

    lower.__name__ = lower.__qualname__ = ops[0].name().split("::")[1]
    lowering(*ops)(lower)


_register_bitwise((aten.bitwise_and.Tensor, aten.bitwise_and.Scalar), jnp.bitwise_and)
_register_bitwise((aten.bitwise_or.Tensor, aten.bitwise_or.Scalar), jnp.bitwise_or)
_register_bitwise((aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar), jnp.bitwise_xor)


@lowering(
    aten.bitwise_left_shift.Tensor,
    aten.bitwise_left_shift.Tensor_Scalar,
    aten.bitwise_left_shift.Scalar_Tensor,
    aten.__lshift__.Tensor,
    aten.__lshift__.Scalar,
)
def left_shift(ctx, x, y):
    x, y = _cast(ctx.dtype, x, y)
    return exact.left_shift(ctx, x, y, jnp.left_shift(x, y))


_register_bitwise(
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


@lowering(aten.isnan.default)
def isnan(ctx, x):
    return jnp.isnan(x)


@lowering(aten.isinf.default)
def isinf(ctx, x):
    return jnp.isinf(x)


@lowering(aten.isfinite.default)
def isfinite(ctx, x):
    return jnp.isfinite(x)


@lowering(aten.isposinf.default)
def isposinf(ctx, x):
    return jnp.isposinf(x)


@lowering(aten.isneginf.default)
def isneginf(ctx, x):
    return jnp.isneginf(x)


# -- selection: where, clamp, min/max ---------------------------------------------


@lowering(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def where(ctx, condition, x, y):
    x, y = _cast(ctx.dtype, x, y)
    return jnp.where(condition, x, y)


def _clamp(dtype, x, lo, hi):
    # torch: min(max(x, lo), hi), NaN in any operand propagates; the gradient
    # reaches x wherever lo <= x <= hi (bounds included).
    (x,) = _cast(dtype, x)
    nan_aware = _is_float(dtype)
    if lo is not None:
        (lo,) = _cast(dtype, lo)
        x = jnp.where((x < lo) | jnp.isnan(lo) if nan_aware else x < lo, lo, x)
    if hi is not None:
        (hi,) = _cast(dtype, hi)
        x = jnp.where((x > hi) | jnp.isnan(hi) if nan_aware else x > hi, hi, x)
    return x


@lowering(aten.clamp.default, aten.clamp.Tensor)
def clamp(ctx, x, min=None, max=None):
    return _clamp(ctx.dtype, x, min, max)


@lowering(aten.clamp_min.default, aten.clamp_min.Tensor)
def clamp_min(ctx, x, min):
    return _clamp(ctx.dtype, x, min, None)


@lowering(aten.clamp_max.default, aten.clamp_max.Tensor)
def clamp_max(ctx, x, max):
    return _clamp(ctx.dtype, x, None, max)


@lowering(aten.maximum.default, aten.max.other)
def maximum(ctx, x, y):
    return jnp.maximum(*_cast(ctx.dtype, x, y))


@lowering(aten.minimum.default, aten.min.other)
def minimum(ctx, x, y):
    return jnp.minimum(*_cast(ctx.dtype, x, y))


@lowering(aten.fmax.default)
def fmax(ctx, x, y):
    x, y = _cast(ctx.dtype, x, y)
    return jnp.where((x >= y) | jnp.isnan(y), x, y) if _is_float(ctx.dtype) else jnp.maximum(x, y)


@lowering(aten.fmin.default)
def fmin(ctx, x, y):
    x, y = _cast(ctx.dtype, x, y)
    return jnp.where((x <= y) | jnp.isnan(y), x, y) if _is_float(ctx.dtype) else jnp.minimum(x, y)


# -- activations ------------------------------------------------------------------


@lowering(aten.relu.default)
def relu(ctx, x):
    return jnp.where(x > 0, x, jnp.zeros_like(x)).astype(ctx.dtype)


@lowering(aten.threshold.default)
def threshold(ctx, x, threshold, value):
    (x,) = _cast(ctx.dtype, x)
    return jnp.where(x > threshold, x, jnp.asarray(value, ctx.dtype))


@lowering(aten.hardtanh.default)
def hardtanh(ctx, x, min_val=-1.0, max_val=1.0):
    # Unlike clamp, torch gives hardtanh a zero gradient at the bounds.
    x, lo, hi = _cast(ctx.dtype, x, min_val, max_val)
    return jnp.where(x <= lo, lo, jnp.where(x >= hi, hi, x))


@lowering(aten.relu6.default)
def relu6(ctx, x):
    return hardtanh(ctx, x, 0.0, 6.0)


@lowering(aten.leaky_relu.default)
def leaky_relu(ctx, x, negative_slope=0.01):
    return jnp.where(x > 0, x, x * negative_slope).astype(ctx.dtype)


def _elu(x, alpha, scale, input_scale):
    negative = alpha * jnp.expm1(_safe(x > 0, 0, x) * input_scale)
    return scale * jnp.where(x > 0, x, negative)


@lowering(aten.elu.default)
def elu(ctx, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return _elu(x, alpha, scale, input_scale).astype(ctx.dtype)


@lowering(aten.selu.default)
def selu(ctx, x):
    alpha, scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    return _elu(x, alpha, scale, 1.0).astype(ctx.dtype)


@lowering(aten.celu.default)
def celu(ctx, x, alpha=1.0):
    return _elu(x, alpha, 1.0, 1.0 / alpha).astype(ctx.dtype)


@lowering(aten.gelu.default)
def gelu(ctx, x, *, approximate="none"):
    return jax.nn.gelu(x, approximate=approximate == "tanh").astype(ctx.dtype)


@lowering(aten.silu.default)
def silu(ctx, x):
    return (x * jax.nn.sigmoid(x)).astype(ctx.dtype)


@lowering(aten.mish.default)
def mish(ctx, x):
    return (x * jnp.tanh(jax.nn.softplus(x))).astype(ctx.dtype)


@lowering(aten.hardsigmoid.default)
def hardsigmoid(ctx, x):
    inside = (x > -3) & (x < 3)
    return jnp.where(inside, x / 6 + 0.5, jnp.where(x <= -3, 0.0, 1.0)).astype(ctx.dtype)


@lowering(aten.hardswish.default)
def hardswish(ctx, x):
    return jnp.where(x < -3, 0.0, jnp.where(x <= 3, x * (x + 3) / 6, x)).astype(ctx.dtype)


@lowering(aten.softplus.default)
def softplus(ctx, x, beta=1.0, threshold=20.0):
    linear = x * beta > threshold
    return jnp.where(linear, x, jnp.log1p(jnp.exp(_safe(linear, 0, x * beta))) / beta).astype(ctx.dtype)


@lowering(aten.log_sigmoid.default)
def log_sigmoid(ctx, x):
    return jax.nn.log_sigmoid(x).astype(ctx.dtype)


@lowering(aten.log_sigmoid_forward.default)
def log_sigmoid_forward(ctx, x):
    # The second output is the buffer torch's backward reads (exp(-|x|) on CPU).
    buffer = jnp.broadcast_to(jnp.exp(-jnp.abs(x)), ctx.shape_of(1)).astype(ctx.dtype_of(1))
    return jax.nn.log_sigmoid(x).astype(ctx.dtype_of(0)), buffer


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
    (x,) = _cast(ctx.dtype, x)
    return jnp.where(jnp.isnan(x), x, jnp.where(x < 0, math.pi, 0.0).astype(ctx.dtype))


@lowering(aten.polar.default)
def polar(ctx, magnitude, phase):
    return complex_(ctx, magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))


@lowering(aten.complex.default)
def complex_(ctx, real, imag):
    return lax.complex(*jnp.broadcast_arrays(real, imag))
