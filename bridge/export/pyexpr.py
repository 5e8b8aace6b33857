"""Python expressions for the source printer: a small tree laid out within the line
length, and exact spellings of values (dtypes, floats that parse back to the same bits,
small constant arrays, symbolic dimensions, lax's named tuples and enums)."""

from __future__ import annotations

import ast
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax import lax
from jax.export import is_symbolic_dim


class Unprintable(Exception):
    """A value with no exact Python spelling; the printer falls back or fails."""


# ---------------------------------------------------------------- expressions


class Expr:
    """An expression tree; `render` lays it out within the line length."""


@dataclass(frozen=True)
class Raw(Expr):
    text: str


@dataclass(frozen=True)
class Call(Expr):
    fn: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()


@dataclass(frozen=True)
class Seq(Expr):
    items: tuple[Expr, ...]
    kind: str = "tuple"  # "tuple" or "list"


@dataclass(frozen=True)
class Lambda(Expr):
    params: str
    body: Expr


@dataclass(frozen=True)
class Op(Expr):
    """An infix (`a + b`) or prefix (`-a`, left is None) operator on names and literals."""

    op: str
    left: Expr | None
    right: Expr


def flat(e: Expr) -> str:
    if isinstance(e, Raw):
        return e.text
    if isinstance(e, Op):
        return f"{e.op}{flat(e.right)}" if e.left is None else f"{flat(e.left)} {e.op} {flat(e.right)}"
    if isinstance(e, Lambda):
        return f"lambda {e.params}: {flat(e.body)}"
    if isinstance(e, Seq):
        inner = ", ".join(flat(i) for i in e.items)
        if e.kind == "list":
            return f"[{inner}]"
        return f"({inner},)" if len(e.items) == 1 else f"({inner})"
    assert isinstance(e, Call)
    parts = [flat(a) for a in e.args] + [f"{k}={flat(v)}" for k, v in e.kwargs]
    return f"{e.fn}({', '.join(parts)})"


def render(e: Expr, col: int, indent: int, tail: int = 0, width: int = 100) -> str:
    """`e` laid out starting at column `col` on a line indented by `indent`, with `tail`
    characters to follow it: one line when it fits, else one argument per line."""
    text = flat(e)
    if col + len(text) + tail <= width or isinstance(e, Raw):
        return text
    if isinstance(e, Op):
        if e.left is None:
            return text
        pad = " " * (indent + 4)
        return f"(\n{pad}{flat(e.left)}\n{pad}{e.op} {flat(e.right)}\n{' ' * indent})"
    if isinstance(e, Lambda):
        head = f"lambda {e.params}: "
        return head + render(e.body, col + len(head), indent, tail, width)
    inner = indent + 4
    pad = " " * inner
    if isinstance(e, Seq):
        opening, closing = ("[", "]") if e.kind == "list" else ("(", ")")
        items = [render(i, inner, inner, 1, width) for i in e.items]
    else:
        assert isinstance(e, Call)
        opening, closing = f"{e.fn}(", ")"
        items = [render(a, inner, inner, 1, width) for a in e.args]
        items += [f"{k}={render(v, inner + len(k) + 1, inner, 1, width)}" for k, v in e.kwargs]
    body = "".join(f"{pad}{item},\n" for item in items)
    return f"{opening}\n{body}{' ' * indent}{closing}"


# ---------------------------------------------------------------- values


_MODULE_DTYPES = {  # dtypes numpy itself does not name
    "bfloat16": "jnp.bfloat16",
    "float8_e4m3fn": "jnp.float8_e4m3fn",
    "float8_e5m2": "jnp.float8_e5m2",
}


def dtype_text(dtype: Any) -> str:
    dt = np.dtype(dtype)
    if dt.name in _MODULE_DTYPES:
        return _MODULE_DTYPES[dt.name]
    if dt == np.bool_:
        return "np.bool_"
    if dt.kind in "biufc" and hasattr(np, dt.name):
        return f"np.{dt.name}"
    raise Unprintable(f"dtype {dt}")


def float_text(v: float) -> str:
    """A Python literal for a float that parses back to the same value."""
    if math.isnan(v):
        return "np.nan"
    if math.isinf(v):
        return "np.inf" if v > 0 else "-np.inf"
    return repr(float(v))


def number_text(value: Any, dtype: Any) -> str:
    """A Python literal that becomes exactly `value` once converted to `dtype`: the
    shortest one that does (`0.1` for float32's 0.1), else the float64 repr."""
    dt = np.dtype(dtype)
    v = np.asarray(value, dt)
    if dt == np.bool_:
        return repr(bool(v))
    if dt.kind in "iu":
        return repr(int(v))
    if dt.kind == "c":
        return f"complex({float_text(v.real)}, {float_text(v.imag)})"
    x = float(v)
    if not math.isfinite(x):
        return float_text(x)
    text = str(v) if dt.name in ("float32", "float16") else repr(x)
    try:
        exact = np.asarray(float(text), dt).tobytes() == v.tobytes()
    except ValueError:
        exact = False
    return text if exact else repr(x)


def scalar_text(value: Any, dtype: Any) -> str:
    """`np.float32(0.1)`: a typed scalar whose bits are exactly `value`'s."""
    return f"{dtype_text(dtype)}({number_text(value, dtype)})"


SMALL_CONSTANT = 16  # elements: larger constants are not printed as code


def constant_expr(value: Any, dtype: Any = None) -> Expr:
    """A constant operand (of `dtype`, its aval's): a typed scalar, or `np.array([...], dtype)`
    when it is small."""
    arr = np.asarray(value) if dtype is None else np.asarray(value, dtype)
    if arr.dtype.kind not in "biufc" and arr.dtype.name not in _MODULE_DTYPES:
        raise Unprintable(f"constant of dtype {arr.dtype}")
    if arr.ndim == 0:
        return Raw(scalar_text(arr, arr.dtype))
    if arr.size > SMALL_CONSTANT:
        raise Unprintable(
            f"a constant array of shape {arr.shape} ({arr.size} elements) is closed over by the "
            f"program; only constants of at most {SMALL_CONSTANT} elements are printed as code. "
            "Pass it as an input instead (parameters and buffers are inputs of an export)."
        )

    def nested(a: np.ndarray) -> Expr:
        if a.ndim == 0:
            return Raw(number_text(a, a.dtype))
        return Seq(tuple(nested(i) for i in a), "list")

    return Call("np.array", (nested(arr),), (("dtype", Raw(dtype_text(arr.dtype))),))


def dim_text(d: Any, name_of: Callable[[str], str]) -> str:
    """A symbolic dimension as Python over the dimension variables (`name_of` spells them)."""
    try:
        tree = ast.parse(str(d), mode="eval")
    except SyntaxError as e:
        raise Unprintable(f"dimension expression {d}") from e

    class Rewrite(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.copy_location(ast.Name(id=name_of(node.id), ctx=ast.Load()), node)

        def visit_Call(self, node: ast.Call) -> ast.AST:
            self.generic_visit(node)
            fn = node.func.id if isinstance(node.func, ast.Name) else ""
            ops = {"floordiv": ast.FloorDiv(), "mod": ast.Mod()}
            if fn in ops and len(node.args) == 2:
                return ast.BinOp(left=node.args[0], op=ops[fn], right=node.args[1])
            if fn in ("max", "min") and len(node.args) == 2:
                func = ast.parse(f"jax.core.{fn}_dim", mode="eval").body
                return ast.Call(func=func, args=node.args, keywords=[])
            if fn == "non_negative" and len(node.args) == 1:
                func = ast.parse("jax.core.max_dim", mode="eval").body
                return ast.Call(func=func, args=[node.args[0], ast.Constant(0)], keywords=[])
            raise Unprintable(f"dimension expression {d}")

    return ast.unparse(Rewrite().visit(tree))


_PUBLIC_TYPES: dict[type, str] = {}
for _name in ("GatherDimensionNumbers", "ScatterDimensionNumbers", "ConvDimensionNumbers",
              "GatherScatterMode", "Precision", "RoundingMethod", "RandomAlgorithm",
              "DotAlgorithmPreset", "AccuracyMode"):
    if isinstance(getattr(lax, _name, None), type):
        _PUBLIC_TYPES[getattr(lax, _name)] = f"lax.{_name}"


def value_expr(v: Any, dim: Callable[[Any], str]) -> Expr:
    """A parameter value as a Python expression (`dim` prints symbolic dimensions)."""
    if v is None or isinstance(v, (bool, str)):
        return Raw(repr(v))
    if is_symbolic_dim(v):
        return Raw(dim(v))
    if isinstance(v, (int, np.integer)):
        return Raw(repr(int(v)))
    if isinstance(v, float):
        return Raw(float_text(v))
    if isinstance(v, np.generic):
        return Raw(scalar_text(v, v.dtype))
    if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
        return Raw(dtype_text(v))
    if isinstance(v, enum.Enum) and type(v) in _PUBLIC_TYPES:
        return Raw(f"{_PUBLIC_TYPES[type(v)]}.{v.name}")
    if type(v) in _PUBLIC_TYPES and hasattr(v, "_fields"):  # lax's named tuples
        fields = tuple((f, value_expr(getattr(v, f), dim)) for f in v._fields)
        return Call(_PUBLIC_TYPES[type(v)], (), fields)
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu":  # axes, sizes
        return Seq(tuple(Raw(repr(int(i))) for i in v))
    if isinstance(v, tuple):
        return Seq(tuple(value_expr(i, dim) for i in v))
    if isinstance(v, list):
        return Seq(tuple(value_expr(i, dim) for i in v), "list")
    raise Unprintable(f"{type(v).__name__} value {v!r}")
