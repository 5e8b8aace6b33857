"""Families of lowerings that differ only in the JAX function they apply.

Each helper builds the lowering of one kind of family around `fn` and
registers it with the same `@lowering` decorator as every other lowering,
named after its first ATen overload:

    unary(aten.sqrt.default, jnp.sqrt)

`ops` is one ATen overload or a tuple of them.
"""

from __future__ import annotations

import jax.numpy as jnp

from bridge.ops.operands import cast, promoted_dtype
from bridge.ops.registry import Lowering, lowering


def register(ops, lower: Lowering) -> Lowering:
    """Name a generated lowering after the first of `ops` and register it for all of them."""
    ops = ops if isinstance(ops, tuple) else (ops,)
    lower.__name__ = lower.__qualname__ = ops[0].name().split("::")[1]
    return lowering(*ops)(lower)


def unary(ops, fn) -> Lowering:
    """fn(x) computed in the output dtype (a complex operand is passed as it is)."""

    def lower(ctx, x):
        if not jnp.iscomplexobj(x):
            x = jnp.asarray(x, ctx.dtype)
        return fn(x).astype(ctx.dtype)

    return register(ops, lower)


def unary_as_is(ops, fn) -> Lowering:
    """fn(x) on the operand as it comes (predicates such as isnan)."""

    def lower(ctx, x):
        return fn(x)

    return register(ops, lower)


def binary(ops, fn) -> Lowering:
    """fn(x, y) with both operands cast to the output dtype."""

    def lower(ctx, x, y):
        return fn(*cast(ctx.dtype, x, y))

    return register(ops, lower)


def compare(ops, fn) -> Lowering:
    """fn(x, y) in torch's promoted dtype of the operands (the output is bool)."""

    def lower(ctx, x, y):
        return fn(*cast(promoted_dtype(ctx), x, y))

    return register(ops, lower)


def logical(ops, fn) -> Lowering:
    """fn of the operands' truth values (nonzero), in the output dtype."""

    def lower(ctx, *xs):
        return fn(*[jnp.asarray(x) != 0 for x in xs]).astype(ctx.dtype)

    return register(ops, lower)
