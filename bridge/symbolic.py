"""torch's symbolic sizes -> JAX dimensions, for graphs captured with dynamic shapes.

A graph torch.export captured with `dynamic_shapes` carries SymInts: sizes
such as `s0` or `2*s0 + 1` over symbols that stand for input dimensions.
`Dims` binds each symbol to the JAX dimension of the input axis it sizes (a
`jax.export` symbolic dimension when the program is traced with symbolic
shapes) and evaluates torch's expressions over them, so `ctx.shape`, the
interpreter's result checks and the graph's own size arithmetic (`sym_size`,
`operator.mul`, comparisons) all follow the inputs' shapes instead of the
example's.

Reading a SymInt's example value (`int(s)`) would silently bake the example
size into the program. torch records such a read as a new guard of its shape
environment; `Dims.guards` counts them, so the interpreter can refuse a
lowering that did.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import sympy
import torch
from torch.utils._sympy import functions as torch_sympy

__all__ = ["Dims", "SymbolicShapeError", "is_symbolic", "same_size"]

_SYMBOLIC = (torch.SymInt, torch.SymBool, torch.SymFloat)

_NARY = {
    sympy.Add: lambda xs: _fold(operator.add, xs),
    sympy.Mul: lambda xs: _fold(operator.mul, xs),
    sympy.Max: lambda xs: _fold(jax.core.max_dim, xs),
    sympy.Min: lambda xs: _fold(jax.core.min_dim, xs),
    sympy.And: lambda xs: all(xs),
    sympy.Or: lambda xs: any(xs),
    sympy.Not: lambda xs: not xs[0],
    sympy.Eq: lambda xs: _equal(*xs),
    sympy.Ne: lambda xs: not _equal(*xs),
    sympy.Lt: lambda xs: xs[0] < xs[1],
    sympy.Le: lambda xs: xs[0] <= xs[1],
    sympy.Gt: lambda xs: xs[0] > xs[1],
    sympy.Ge: lambda xs: xs[0] >= xs[1],
    torch_sympy.FloorDiv: lambda xs: xs[0] // xs[1],
    torch_sympy.Mod: lambda xs: xs[0] % xs[1],
    torch_sympy.PythonMod: lambda xs: xs[0] % xs[1],
    torch_sympy.CleanDiv: lambda xs: xs[0] // xs[1],
    torch_sympy.Max: lambda xs: _fold(jax.core.max_dim, xs),
    torch_sympy.Min: lambda xs: _fold(jax.core.min_dim, xs),
}


def _equal(a: Any, b: Any) -> bool:
    """`a == b` for every value of the symbols, False if for none; else `SymbolicShapeError`.

    (JAX's own `==` on dimensions says False when it cannot prove equality, which would turn
    `Ne(s0, 1)` into True for a size that may be 1.)
    """
    diff = a - b
    if isinstance(diff, int) or a == b:
        return diff == 0
    if diff >= 1 or diff <= -1:
        return False
    raise SymbolicShapeError(f"whether {a} == {b} depends on the values of the symbolic dimensions")


def _fold(op: Any, xs: list) -> Any:
    return functools.reduce(op, xs)


class SymbolicShapeError(NotImplementedError):
    """A size torch keeps symbolic that the JAX program cannot follow."""


def is_symbolic(value: Any) -> bool:
    """Whether `value` is a torch SymInt/SymBool/SymFloat that is not a constant."""
    return isinstance(value, _SYMBOLIC) and not _constant(value)


def _constant(value: Any) -> bool:
    return isinstance(value.node.expr, (sympy.Integer, sympy.logic.boolalg.BooleanAtom, sympy.Float))


class Dims:
    """torch's size symbols bound to the JAX dimensions of a graph's inputs."""

    def __init__(self) -> None:
        self.symbols: dict[str, Any] = {}
        self._env = None  # torch's ShapeEnv, whose guards `guards` counts

    def bind(self, meta: Any, value: Any, where: str) -> None:
        """Bind the symbols of a placeholder's recorded tensor (`meta`) to `value`'s shape."""
        if not isinstance(meta, torch.Tensor):
            return
        shape = tuple(getattr(value, "shape", ()))
        for axis, size in enumerate(meta.shape):
            if not is_symbolic(size):
                if axis < len(shape) and jax.export.is_symbolic_dim(shape[axis]):
                    raise SymbolicShapeError(
                        f"dimension {axis} of {where} is symbolic ({shape[axis]}), but torch's "
                        f"capture fixed it to {int(size)}: the model's code needs that size. "
                        "Leave this dimension out of dynamic_shapes (it stays static)."
                    )
                continue
            self._env = size.node.shape_env
            expr = size.node.expr
            if isinstance(expr, sympy.Symbol) and expr.name not in self.symbols:
                self.symbols[expr.name] = shape[axis]

    @property
    def active(self) -> bool:
        return bool(self.symbols)

    def guards(self) -> int:
        """How many guards torch has recorded so far (a read of an example size adds one)."""
        return len(self._env.guards) if self._env is not None else 0

    def last_guard(self) -> str:
        """The newest guard, over the inputs' dimension names (`Eq(batch, 4)`)."""
        if self._env is None or not self._env.guards:
            return "?"
        expr = self._env.guards[-1].expr
        names = {s: sympy.Symbol(str(self.symbols[s.name])) for s in expr.free_symbols if s.name in self.symbols}
        return str(expr.xreplace(names))

    def binds(self, value: Any) -> bool:
        """Whether `value` (an int, or a torch symbolic value) is known from the inputs' axes.

        False for a size read from tensor values (torch's unbacked symbols, e.g. from
        `.item()` or `nonzero`), which no input dimension determines."""
        if not isinstance(value, _SYMBOLIC) or _constant(value):
            return True
        return all(s.name in self.symbols for s in value.node.expr.free_symbols)

    def size(self, value: Any) -> Any:
        """An int, or the JAX dimension a torch SymInt stands for."""
        if not isinstance(value, _SYMBOLIC):
            return int(value)
        return self.value(value)

    def value(self, value: Any) -> Any:
        """A torch SymInt/SymBool/SymFloat evaluated over the bound JAX dimensions."""
        expr = value.node.expr
        if _constant(value):
            return bool(expr) if isinstance(value, torch.SymBool) else (
                int(expr) if isinstance(value, torch.SymInt) else float(expr))
        return self._evaluate(expr)

    def _evaluate(self, expr: Any) -> Any:
        if isinstance(expr, sympy.Symbol):
            if expr.name not in self.symbols:
                raise SymbolicShapeError(
                    f"the size {expr.name} is not the size of an input axis (a size computed from "
                    "tensor values, e.g. by nonzero); it cannot be exported symbolically"
                )
            return self.symbols[expr.name]
        if isinstance(expr, sympy.Integer):
            return int(expr)
        if isinstance(expr, sympy.logic.boolalg.BooleanAtom):
            return bool(expr)
        if isinstance(expr, sympy.Pow) and isinstance(expr.exp, sympy.Integer) and expr.exp >= 0:
            return _fold(operator.mul, [self._evaluate(expr.base)] * int(expr.exp) or [1])
        fn = _NARY.get(type(expr))
        if fn is not None:
            return fn([self._evaluate(a) for a in expr.args])
        raise SymbolicShapeError(f"the size expression {expr} has no JAX dimension equivalent")


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are equal; False where JAX cannot decide it for every value."""
    try:
        return bool(a == b)
    except Exception:  # jax's InconclusiveDimensionOperation
        return False
