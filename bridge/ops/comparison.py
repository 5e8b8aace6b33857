"""Comparison ATen ops: comparisons, logic, float predicates, and selection by comparison.

Comparisons compute in torch's promoted dtype of their operands (the output
dtype, bool, says nothing about it); selection (where, clamp, min/max) in the
output dtype. NaN propagates as in torch, and clamp passes the gradient to `x`
at its bounds, as torch's clamp does.
"""

from __future__ import annotations

import jax.numpy as jnp
import torch

from bridge.ops.families import binary, compare, logical, unary_as_is
from bridge.ops.operands import cast, is_float
from bridge.ops.registry import lowering

aten = torch.ops.aten


# -- comparisons, logic, float predicates -----------------------------------------


compare((aten.eq.Tensor, aten.eq.Scalar), jnp.equal)
compare((aten.ne.Tensor, aten.ne.Scalar), jnp.not_equal)
compare((aten.lt.Tensor, aten.lt.Scalar), jnp.less)
compare((aten.le.Tensor, aten.le.Scalar), jnp.less_equal)
compare((aten.gt.Tensor, aten.gt.Scalar), jnp.greater)
compare((aten.ge.Tensor, aten.ge.Scalar), jnp.greater_equal)

logical(aten.logical_and.default, jnp.logical_and)
logical(aten.logical_or.default, jnp.logical_or)
logical(aten.logical_xor.default, jnp.logical_xor)
logical(aten.logical_not.default, jnp.logical_not)

unary_as_is(aten.isnan.default, jnp.isnan)
unary_as_is(aten.isinf.default, jnp.isinf)
unary_as_is(aten.isfinite.default, jnp.isfinite)
unary_as_is(aten.isposinf.default, jnp.isposinf)
unary_as_is(aten.isneginf.default, jnp.isneginf)


# -- selection: where, clamp, min/max ---------------------------------------------


@lowering(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def where(ctx, condition, x, y):
    x, y = cast(ctx.dtype, x, y)
    return jnp.where(condition, x, y)


def _clamp(dtype, x, lo, hi):
    # torch: min(max(x, lo), hi), NaN in any operand propagates; the gradient
    # reaches x wherever lo <= x <= hi (bounds included).
    (x,) = cast(dtype, x)
    nan_aware = is_float(dtype)
    if lo is not None:
        (lo,) = cast(dtype, lo)
        x = jnp.where((x < lo) | jnp.isnan(lo) if nan_aware else x < lo, lo, x)
    if hi is not None:
        (hi,) = cast(dtype, hi)
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


binary((aten.maximum.default, aten.max.other), jnp.maximum)
binary((aten.minimum.default, aten.min.other), jnp.minimum)


@lowering(aten.fmax.default)
def fmax(ctx, x, y):
    x, y = cast(ctx.dtype, x, y)
    return jnp.where((x >= y) | jnp.isnan(y), x, y) if is_float(ctx.dtype) else jnp.maximum(x, y)


@lowering(aten.fmin.default)
def fmin(ctx, x, y):
    x, y = cast(ctx.dtype, x, y)
    return jnp.where((x <= y) | jnp.isnan(y), x, y) if is_float(ctx.dtype) else jnp.minimum(x, y)
