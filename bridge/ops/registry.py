"""The lowering table: one JAX function per ATen overload.

A lowering is registered with `@lowering(aten.op.overload, ...)` and called as
`fn(ctx, *args, **kwargs)`, where `args`/`kwargs` follow the ATen schema with
every tensor replaced by a JAX array (lists of tensors become lists of arrays)
and every other value (ints, floats, bools, dtypes, devices) left as it is.
`ctx` tells the lowering what torch recorded for this node:

    ctx.dtype   the JAX dtype of the (single) output, as torch computed it
                (type promotion included), canonicalised for x64 mode
    ctx.shape   the output shape (JAX symbolic dimensions where torch's is symbolic)
    ctx.out     the raw `node.meta["val"]` (FakeTensor, tuple, SymInt, ...)
    ctx.size(s) a size from torch's metadata (int or SymInt) as an int or JAX dimension;
                never `int(s)` on a SymInt: that reads the example's size
    ctx.key()   a fresh PRNG key for this node (random ops only)
    ctx.require(ok, error, message)
                a condition torch checks at run time (an index in range, a
                nonzero integer divisor); see bridge/checks.py

Lowerings use `ctx.dtype`/`ctx.shape` instead of re-deriving torch's rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from bridge import dtypes
from bridge.checks import Check

Lowering = Callable[..., Any]

LOWERINGS: dict[torch._ops.OpOverload, Lowering] = {}


def lowering(*ops: torch._ops.OpOverload) -> Callable[[Lowering], Lowering]:
    """Register `fn` as the JAX lowering of each ATen overload in `ops`."""

    def register(fn: Lowering) -> Lowering:
        for op in ops:
            if not isinstance(op, torch._ops.OpOverload):
                raise TypeError(f"lowering() takes ATen overloads, got {op!r}")
            if op in LOWERINGS:
                raise ValueError(f"{op} already has a lowering: {LOWERINGS[op].__qualname__}")
            LOWERINGS[op] = fn
        return fn

    return register


class MissingKeyError(ValueError):
    """A random op ran without an `rng=` key."""


class RefusedByTorchError(TypeError):
    """torch itself refuses these arguments (e.g. mixed dtypes in a matmul)."""


class DataDependentShapeError(NotImplementedError):
    """An op whose output shape depends on the values of a tensor."""


class LoweringContext:
    """What the interpreter knows about the node being lowered."""

    __slots__ = ("node", "out", "_rng", "_index", "_checks", "_size")

    def __init__(
        self,
        node: Any,
        out: Any,
        rng: jax.Array | None,
        index: int,
        checks: list[Check] | None = None,
        size: Callable[[Any], Any] = int,
    ) -> None:
        self.node = node
        self.out = out
        self._rng = rng
        self._index = index
        self._checks = checks
        self._size = size  # a recorded size (int or torch SymInt) -> int or JAX dimension

    @property
    def checking(self) -> bool:
        """Whether `require` records checks (the caller did not pass `checks=False`)."""
        return self._checks is not None

    def require(self, ok: Any, error: type[Exception], message: str) -> None:
        """Record that torch raises `error(message)` at run time unless `ok` holds everywhere.

        A no-op when the caller turned checks off (`checks=False`).
        """
        if self._checks is not None:
            self._checks.append(Check(jax.numpy.all(ok), error, message))

    @property
    def dtype(self) -> np.dtype:
        return dtypes.canonical_jax_dtype(self.out.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._size(s) for s in self.out.shape)

    def size(self, value: Any) -> Any:
        """A size torch recorded (an int or a SymInt) as an int, or as the JAX dimension a
        symbolic one stands for (an export with dynamic shapes)."""
        return self._size(value)

    def dtype_of(self, i: int) -> np.dtype:
        """The dtype of output `i` of a multi-output op."""
        return dtypes.canonical_jax_dtype(self.out[i].dtype)

    def shape_of(self, i: int) -> tuple[int, ...]:
        return tuple(self._size(s) for s in self.out[i].shape)

    def key(self) -> jax.Array:
        """A PRNG key for this node, derived from the caller's `rng` key."""
        if self._rng is None:
            raise MissingKeyError(
                f"the operation {self.node.target} draws random numbers, so apply() needs a "
                "JAX key: call apply(params, ..., rng=jax.random.key(0)) (or put the module "
                "in eval() mode if it should be deterministic)."
            )
        return jax.random.fold_in(self._rng, self._index)
