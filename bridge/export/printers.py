"""The primitive table of the source printer: JAX primitive name -> Python spelling.

Each printer gets the equation (`eqn.params`, `eqn.invars`, `eqn.outvars`, all
with avals) and its operands already printed, and returns an expression tree
(`Call`, `Op`, `Raw`, `Seq`) that binds the same primitive with the same
parameters when it runs. A printer that meets a parameter it does not spell
raises `Unprintable`; the equation then goes to the generic fallback,
`lax.<name>_p.bind(*operands, **params)`, taken only when `lax.<name>_p` is the
primitive itself (public) and every parameter prints as a Python literal. A
primitive with neither is an `UnsupportedPrimitiveError` naming it: nothing is
ever printed approximately.

Primitives with sub-programs (`scan`, `while`, `cond`, `custom_jvp_call`) are
printed by bridge/export/source.py, which owns helper functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from jax import lax

from bridge.export.pyexpr import Call, Expr, Op, Raw, Seq, Unprintable

__all__ = ["PRINTERS", "Ctx", "UnsupportedPrimitiveError", "expect_params", "print_eqn",
           "returns_sequence"]


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive (or a parameter of one) the source printer cannot spell exactly."""


# ---------------------------------------------------------------- the table


class Ctx:
    """What a printer may ask of the function being printed."""

    def value(self, v: Any) -> Expr:  # a parameter value
        raise NotImplementedError

    def is_local(self, atom: Any) -> bool:  # made by an operation in this function
        raise NotImplementedError


Printer = Callable[[Ctx, Any, list], Expr]
PRINTERS: dict[str, Printer] = {}


def _printer(*names: str) -> Callable[[Printer], Printer]:
    def register(fn: Printer) -> Printer:
        for n in names:
            assert n not in PRINTERS, n
            PRINTERS[n] = fn
        return fn
    return register


def expect_params(eqn: Any, *handled: str, **defaults: Any) -> None:
    """Refuse an equation with a parameter this printer would drop."""
    for k, v in eqn.params.items():
        if k in handled:
            continue
        if k not in defaults or not (v is defaults[k] or v == defaults[k]):
            raise Unprintable(f"{eqn.primitive} parameter {k}={v!r}")


_UNARY = ("abs", "sign", "floor", "ceil", "is_finite", "exp", "exp2", "log", "log1p", "expm1",
          "tanh", "logistic", "sqrt", "rsqrt", "cbrt", "sin", "cos", "tan", "asin", "acos",
          "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "erf_inv", "lgamma",
          "digamma", "square", "real", "imag", "conj", "population_count", "clz", "stop_gradient",
          "bessel_i0e", "bessel_i1e")


@_printer(*_UNARY)
def _unary(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "accuracy")
    acc = eqn.params.get("accuracy")
    kwargs = (("accuracy", ctx.value(acc)),) if acc is not None else ()
    return Call(f"lax.{eqn.primitive.name}", tuple(args), kwargs)


_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<",
          "le": "<=", "gt": ">", "ge": ">=", "and": "&", "or": "|", "xor": "^"}
_LAX_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "eq": "eq", "ne": "ne",
               "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "and": "bitwise_and",
               "or": "bitwise_or", "xor": "bitwise_xor", "max": "max", "min": "min",
               "pow": "pow", "rem": "rem", "atan2": "atan2", "nextafter": "nextafter",
               "shift_left": "shift_left", "shift_right_logical": "shift_right_logical",
               "shift_right_arithmetic": "shift_right_arithmetic", "complex": "complex",
               "igamma": "igamma", "igammac": "igammac"}


@_printer(*_LAX_BINARY)
def _binary(ctx: Ctx, eqn: Any, args: list) -> Expr:
    """`a + b` where jnp's operator binds the same primitive (left operand made by a lax
    operation, so never a NumPy value; same dtypes, so no promotion), else `lax.add(a, b)`."""
    expect_params(eqn, out_dtype=None)
    name = eqn.primitive.name
    x, y = eqn.invars
    kind = np.dtype(x.aval.dtype).kind
    infix = name in _INFIX and ctx.is_local(x) and x.aval.dtype == y.aval.dtype
    if name in ("add", "sub", "mul"):
        infix = infix and kind in "iufc"
    elif name == "div":
        infix = infix and kind in "fc"
    elif name in ("and", "or", "xor"):
        infix = infix and kind in "biu"
    if infix:
        return Op(_INFIX[name], args[0], args[1])
    return Call(f"lax.{_LAX_BINARY[name]}", tuple(args))


@_printer("neg", "not")
def _prefix(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn)
    name = eqn.primitive.name
    kind = np.dtype(eqn.invars[0].aval.dtype).kind
    if ctx.is_local(eqn.invars[0]) and (kind in "fc" if name == "neg" else kind in "biu"):
        return Op("-" if name == "neg" else "~", None, args[0])
    return Call("lax.neg" if name == "neg" else "lax.bitwise_not", tuple(args))


@_printer("integer_pow")
def _integer_pow(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "y")
    return Call("lax.integer_pow", (args[0], ctx.value(eqn.params["y"])))


@_printer("round")
def _round(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "rounding_method")
    return Call("lax.round", (args[0], ctx.value(eqn.params["rounding_method"])))


@_printer("reduce_precision")
def _reduce_precision(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "exponent_bits", "mantissa_bits")
    p = eqn.params
    return Call("lax.reduce_precision", (args[0],), (
        ("exponent_bits", ctx.value(p["exponent_bits"])),
        ("mantissa_bits", ctx.value(p["mantissa_bits"]))))


@_printer("convert_element_type", "bitcast_convert_type")
def _convert(ctx: Ctx, eqn: Any, args: list) -> Expr:
    # weak_type only marks how jnp promotes the result later; every later
    # operation here is printed with explicit dtypes, so it changes nothing.
    expect_params(eqn, "new_dtype", "weak_type", sharding=None)
    return Call(f"lax.{eqn.primitive.name}", (args[0], ctx.value(eqn.params["new_dtype"])))


@_printer("broadcast_in_dim")
def _broadcast_in_dim(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "shape", "broadcast_dimensions", sharding=None)
    p = eqn.params
    return Call("lax.broadcast_in_dim", (args[0], ctx.value(p["shape"]),
                                         ctx.value(p["broadcast_dimensions"])))


@_printer("reshape")
def _reshape(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "new_sizes", dimensions=None, sharding=None)
    return Call("lax.reshape", (args[0], ctx.value(eqn.params["new_sizes"])))


def _positional(fn: str, *names: str, **defaults: Any) -> Printer:
    def printer(ctx: Ctx, eqn: Any, args: list) -> Expr:
        expect_params(eqn, *names, **defaults)
        return Call(fn, (*args, *(ctx.value(eqn.params[n]) for n in names)))
    return printer


for _name, _params in {"transpose": ("permutation",), "rev": ("dimensions",),
                       "squeeze": ("dimensions",), "pad": ("padding_config",),
                       "select_n": (), "clamp": ()}.items():
    PRINTERS[_name] = _positional(f"lax.{_name}", *_params)
PRINTERS["random_unwrap"] = _positional("jax.random.key_data")
PRINTERS["random_fold_in"] = _positional("jax.random.fold_in")
for _name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
              "reduce_or", "reduce_xor"):
    PRINTERS[_name] = _positional(f"lax.{_name}", "axes", out_sharding=None)


@_printer("slice")
def _slice(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "start_indices", "limit_indices", "strides")
    p = eqn.params
    extra = (ctx.value(p["strides"]),) if p["strides"] is not None else ()
    return Call("lax.slice", (args[0], ctx.value(p["start_indices"]),
                              ctx.value(p["limit_indices"]), *extra))


@_printer("concatenate")
def _concatenate(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "dimension")
    return Call("lax.concatenate", (Seq(tuple(args), "list"), ctx.value(eqn.params["dimension"])))


@_printer("stack")
def _stack(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "axis")
    return Call("lax.stack", (Seq(tuple(args), "list"),), (("axis", ctx.value(eqn.params["axis"])),))


@_printer("split")
def _split(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "sizes", "axis")
    p = eqn.params
    return Call("lax.split", (args[0], ctx.value(tuple(p["sizes"]))), (("axis", ctx.value(p["axis"])),))


@_printer("dot_general")
def _dot_general(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "dimension_numbers", "precision", "preferred_element_type", out_sharding=None)
    p = eqn.params
    kwargs = tuple((k, ctx.value(p[k])) for k in ("precision", "preferred_element_type")
                   if p[k] is not None)
    return Call("lax.dot_general", (*args, ctx.value(p["dimension_numbers"])), kwargs)


_CONV = ("window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers",
         "feature_group_count", "batch_group_count", "precision", "preferred_element_type")


@_printer("conv_general_dilated")
def _conv(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, *_CONV, out_sharding=None)
    p = eqn.params
    kwargs = tuple((k, ctx.value(p[k])) for k in _CONV
                   if k not in ("precision", "preferred_element_type") or p[k] is not None)
    return Call("lax.conv_general_dilated", tuple(args), kwargs)


@_printer("iota")
def _iota(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "dtype", "shape", "dimension", sharding=None)
    p = eqn.params
    if len(p["shape"]) == 1:
        return Call("lax.iota", (ctx.value(p["dtype"]), ctx.value(p["shape"][0])))
    return Call("lax.broadcasted_iota", (ctx.value(p["dtype"]), ctx.value(p["shape"]),
                                         ctx.value(p["dimension"])))


@_printer("argmax", "argmin")
def _argmax(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "axes", "index_dtype")
    p = eqn.params
    (axis,) = p["axes"]
    return Call(f"lax.{eqn.primitive.name}", (args[0], ctx.value(axis), ctx.value(p["index_dtype"])))


@_printer("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def _cumulative(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "axis", "reverse")
    p = eqn.params
    return Call(f"lax.{eqn.primitive.name}", (args[0],), (("axis", ctx.value(p["axis"])),
                                                         ("reverse", ctx.value(p["reverse"]))))


@_printer("sort")
def _sort(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "dimension", "is_stable", "num_keys")
    p = eqn.params
    operand = args[0] if len(args) == 1 else Seq(tuple(args))
    return Call("lax.sort", (operand,), tuple((k, ctx.value(p[k]))
                                              for k in ("dimension", "is_stable", "num_keys")))


_GATHER = ("dimension_numbers", "slice_sizes", "unique_indices", "indices_are_sorted", "mode",
           "fill_value")


@_printer("gather")
def _gather(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, *_GATHER)
    return Call("lax.gather", tuple(args), tuple((k, ctx.value(eqn.params[k])) for k in _GATHER))


_SCATTER = ("dimension_numbers", "indices_are_sorted", "unique_indices", "mode")


@_printer("scatter", "scatter-add", "scatter-sub", "scatter-mul", "scatter-min", "scatter-max")
def _scatter(ctx: Ctx, eqn: Any, args: list) -> Expr:
    # update_jaxpr is what lax.scatter_<op> builds from its op; plain scatter has none.
    name = eqn.primitive.name.replace("-", "_")
    if name == "scatter" and eqn.params.get("update_jaxpr") is not None:
        raise Unprintable("scatter with a custom combiner")
    expect_params(eqn, *_SCATTER, "update_jaxpr", update_consts=())
    return Call(f"lax.{name}", tuple(args), tuple((k, ctx.value(eqn.params[k])) for k in _SCATTER))


@_printer("dynamic_slice")
def _dynamic_slice(ctx: Ctx, eqn: Any, args: list) -> Expr:
    # The primitive clamps the start indices; lax.dynamic_slice would first wrap negative ones.
    expect_params(eqn, "slice_sizes")
    return Call("lax.dynamic_slice", (args[0], Seq(tuple(args[1:])),
                                      ctx.value(eqn.params["slice_sizes"])),
                (("allow_negative_indices", Raw("False")),))


@_printer("dynamic_update_slice")
def _dynamic_update_slice(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn)
    return Call("lax.dynamic_update_slice", (args[0], args[1], Seq(tuple(args[2:]))),
                (("allow_negative_indices", Raw("False")),))


@_printer("dim_as_value")
def _dim_as_value(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "dim")
    return Call("jnp.asarray", (ctx.value(eqn.params["dim"]),),
                (("dtype", ctx.value(eqn.outvars[0].aval.dtype)),))


@_printer("optimization_barrier")
def _optimization_barrier(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn)
    return Call("lax.optimization_barrier", (Seq(tuple(args)),))


# ---------------------------------------------------------------- random


_BITS = {8: "np.uint8", 16: "np.uint16", 32: "np.uint32", 64: "np.uint64"}


@_printer("random_bits")
def _random_bits(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "bit_width", "shape")
    p = eqn.params
    return Call("jax.random.bits", (args[0], ctx.value(p["shape"]), Raw(_BITS[p["bit_width"]])))


def _with_impl(fn: str) -> Printer:
    """`jax.random.key(seed, impl='threefry2x32')`, `jax.random.wrap_key_data(...)`."""
    def printer(ctx: Ctx, eqn: Any, args: list) -> Expr:
        expect_params(eqn, "impl")
        name = getattr(eqn.params["impl"], "name", None)
        if not isinstance(name, str):
            raise Unprintable(f"PRNG implementation {eqn.params['impl']!r}")
        return Call(fn, (args[0],), (("impl", Raw(repr(name))),))
    return printer


PRINTERS["random_wrap"] = _with_impl("jax.random.wrap_key_data")
PRINTERS["random_seed"] = _with_impl("jax.random.key")


@_printer("random_split")
def _random_split(ctx: Ctx, eqn: Any, args: list) -> Expr:
    expect_params(eqn, "shape")
    return Call("jax.random.split", (args[0], ctx.value(eqn.params["shape"])))


# ---------------------------------------------------------------- the fallback


_PUBLIC_PRIMITIVES = {getattr(lax, a).name: a for a in sorted(dir(lax)) if a.endswith("_p")}


def generic(ctx: Ctx, eqn: Any, args: list) -> Expr:
    """`lax.<name>_p.bind(*operands, **params)`, for a public primitive whose parameters
    all print as literals."""
    name = eqn.primitive.name
    attr = _PUBLIC_PRIMITIVES.get(name)
    if attr is None or getattr(lax, attr) is not eqn.primitive:
        raise UnsupportedPrimitiveError(
            f"the source printer has no spelling for the JAX primitive {name!r} "
            f"(params: {sorted(eqn.params)}); add one to bridge/export/printers.py")
    try:
        kwargs = tuple((k, ctx.value(v)) for k, v in sorted(eqn.params.items()))
    except Unprintable as e:
        raise UnsupportedPrimitiveError(
            f"the JAX primitive {name!r} has a parameter the source printer cannot spell "
            f"exactly ({e}); add a printer for it to bridge/export/printers.py") from e
    return Call(f"lax.{attr}.bind", tuple(args), kwargs)


def print_eqn(ctx: Ctx, eqn: Any, args: list) -> Expr:
    """The expression for one equation: its table entry, else the generic fallback."""
    printer = PRINTERS.get(eqn.primitive.name)
    if printer is not None:
        try:
            return printer(ctx, eqn, args)
        except Unprintable:
            pass
    return generic(ctx, eqn, args)


def returns_sequence(eqn: Any) -> bool:
    """Whether the printed call returns a sequence of arrays to unpack (else one array)."""
    name = eqn.primitive.name
    if name == "sort":
        return len(eqn.invars) > 1
    return len(eqn.outvars) > 1 or name in ("split", "optimization_barrier")
