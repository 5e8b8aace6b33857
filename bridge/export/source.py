"""A traced JAX program printed as readable, torch-free Python source.

The bridge translates a torch graph by calling its lowering table under one
`jax.named_scope` per graph node (`bridge.interpreter.node_scope`:
`transformer/h/0/attn/c_attn/addmm_3`). `emit_function` traces the converted
function with `jax.make_jaxpr` and prints the equations back as `jax.lax` /
`jax.numpy` calls, so the source comes from the same lowerings as
`torch_to_jax` (one translator) and runs the same XLA program:

- nested `jit`s (`jnp.where`, the adapter's graph function) and `checkpoint`
  are inlined, their equations keep their scope; dead equations are dropped;
- consecutive equations under one node's scope form a group: a group of one
  equation is one statement (`h_0_attn_c_attn_addmm = lax.dot_general(...)`), a
  larger one is a call of a helper function printed from its equations
  (`_addmm`, `_layer_norm`; helpers with the same text are emitted once, others
  get `_addmm_2`), so the main function has one statement per graph node;
- values are named after the module path and op, inputs after `arg_names`;
- `custom_jvp_call` becomes a `@jax.custom_jvp` helper whose rule is printed from
  the traced jvp, `custom_vjp_call` a `@jax.custom_vjp` one with `fwd` and `bwd`
  printed from the traced rules, so derivatives are the original's; `scan`,
  `while`, `cond` and a generic `reduce` become `lax.scan` / `lax.while_loop` /
  `lax.switch` / `lax.reduce` over helper functions;
- symbolic dimensions (`jax.export.symbolic_shape`) are read from the inputs'
  shapes (`b = x.shape[0]`) and shape parameters are printed over them;
- constants: scalars and arrays of at most 16 elements are printed exactly
  (`np.float32(0.1)` parses back to the same bits); larger closed-over arrays are
  an error (pass them as inputs).

The primitive table is bridge/export/printers.py, the expression trees and exact
value spellings bridge/export/pyexpr.py, the flattened program and the naming
rules bridge/export/program.py.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.export import is_symbolic_dim

from bridge.export import printers as P
from bridge.export import pyexpr as X
from bridge.export.printers import UnsupportedPrimitiveError
from bridge.export.program import (
    Const,
    Eqn,
    Namer,
    Var,
    dce,
    flatten,
    op_name,
    sanitize,
    scope_base,
)
from bridge.export.pyexpr import Call, Expr, Lambda, Raw, Seq

__all__ = ["UnsupportedPrimitiveError", "emit_function"]

_MODULES = ("jax", "jnp", "lax", "np", "math")
_RESERVED = frozenset(_MODULES) | {"carry", "xs", "primals", "tangents", "args", "res", "cts",
                                      "CONSTANTS"}
_PLACEHOLDER = "\x00"  # a helper's name in its text, until the text is deduplicated
_WIDTH = 100


# ---------------------------------------------------------------- the module


class Module:
    """The helper functions printed so far, each once, in order of first use."""

    def __init__(self, dim_names: dict[str, str], constants: dict | None = None) -> None:
        self.dim_names = dim_names
        # Arrays too large to print, by name (None: refuse them); the generated code reads
        # them from the global `CONSTANTS`, which the caller defines.
        self.constants = constants
        self.constant_names: dict[tuple, str] = {}
        self.names = Namer(_RESERVED | set(dim_names.values()))
        self.by_text: dict[str, str] = {}
        self.custom_jvps: dict[tuple[str, str, str], str] = {}
        self.custom_vjps: dict[tuple[str, str, str], str] = {}
        self.texts: list[str] = []

    def helper(self, base: str, template: str, suffixes: Sequence[str] = ("",)) -> str:
        """The name of the helper whose text is `template` (its name is the placeholder)."""
        if template not in self.by_text:
            name = self.names.fresh("_" + sanitize(base), suffixes)
            self.by_text[template] = name
            self.texts.append(template.replace(_PLACEHOLDER, name))
        return self.by_text[template]

    def constant(self, value: Any, dtype: Any) -> str:
        """The name of a large constant in `CONSTANTS` (identical arrays share one name)."""
        arr = np.ascontiguousarray(np.asarray(value, dtype))
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.constant_names:
            name = f"const_{len(self.constant_names)}"
            self.constant_names[key] = name
            self.constants[name] = arr
        return self.constant_names[key]


class ConstantError(ValueError):
    """A closed-over constant too large (or of a kind) to print as code."""


class Function(P.Ctx):
    """One Python function being printed: its parameters, body lines and names."""

    def __init__(self, module: Module, params: Sequence[Var], param_names: Sequence[str],
                 extra_dims: bool) -> None:
        self.module = module
        self.params = list(params)
        self.namer = Namer(_RESERVED | set(module.dim_names.values()) | set(param_names))
        self.names: dict[Var, str] = dict(zip(params, param_names, strict=True))
        self.param_names = list(param_names)
        self.local: set[Var] = set()
        self.lines: list[str] = []
        self.dims_used: list[str] = []
        self.extra_dims = extra_dims  # may take undeducible dimensions as parameters
        self.last_comment: str | None = None

    # -- printer context
    def value(self, v: Any) -> Expr:
        return X.value_expr(v, self.dim_text)

    def dim_text(self, d: Any) -> str:
        """A dimension expression: the size of a parameter's axis that is exactly `d` (`m + n`
        after a concatenation: a helper then needs neither m nor n), else over the variables."""
        if not str(d).isidentifier():
            for v in self.params:
                for j, e in enumerate(getattr(v.aval, "shape", ())):
                    if is_symbolic_dim(e) and str(e) == str(d):
                        return f"{self.names[v]}.shape[{j}]"
        return X.dim_text(d, self.dim_name)

    def dim_name(self, symbol: str) -> str:
        if symbol not in self.module.dim_names:
            raise UnsupportedPrimitiveError(f"dimension variable {symbol!r} is not an input's")
        if symbol not in self.dims_used:
            self.dims_used.append(symbol)
        return self.module.dim_names[symbol]

    def is_local(self, atom: Any) -> bool:
        return atom in self.local

    # -- operands and statements
    def arg(self, atom: Any) -> Expr:
        if isinstance(atom, Const):
            dtype = getattr(atom.aval, "dtype", None)
            if self.module.constants is not None and np.size(atom.val) > X.SMALL_CONSTANT:
                return Raw(f'CONSTANTS["{self.module.constant(atom.val, dtype)}"]')
            try:
                return X.constant_expr(atom.val, dtype)
            except X.Unprintable as e:
                raise ConstantError(str(e)) from e
        return Raw(self.names[atom])

    def define(self, v: Var, base: str) -> str:
        name = self.namer.fresh(sanitize(base))
        self.names[v] = name
        self.local.add(v)
        return name

    def statement(self, target: str, expr: Expr, comment: str | None = None) -> None:
        # A source line is printed once above the run of statements it made.
        comment, self.last_comment = (None if comment == self.last_comment else comment), comment
        if comment:
            text = " ".join(comment.split())
            room = _WIDTH - 6
            self.lines.append(f"    # {text if len(text) <= room else text[: room - 3] + '...'}")
        prefix = f"    {target} = " if target else "    "
        if len(prefix) > _WIDTH // 2 and ", " in target and not target.startswith("("):
            names = "".join(f"        {n},\n" for n in target.split(", "))
            prefix = f"    (\n{names}    ) = "
        col = len(prefix.split("\n")[-1])
        text = X.render(expr, col, 4)
        if col + len(text.split("\n")[0]) > _WIDTH:  # a long name: the value on its own lines
            text = "(\n        " + X.render(expr, 8, 8) + "\n    )"
        self.lines.append(prefix + text)

    def emit(self, eqn: Eqn, names: Sequence[str], comment: str | None = None) -> None:
        try:
            expr, target = self.expression(eqn, list(names))
        except ConstantError as e:
            if " (an operand of " in str(e):
                raise
            raise ConstantError(f"{e} (an operand of {eqn.primitive.name} in "
                                f"{eqn.scope or 'the unscoped program'})") from None
        self.statement(target, expr, comment)

    def expression(self, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
        """The expression of one equation and the assignment target for `names`."""
        special = _SPECIAL.get(eqn.primitive.name)
        if special is not None:
            return special(self, eqn, names)
        args = [self.arg(a) for a in eqn.invars]
        expr = P.print_eqn(self, eqn, args)
        if P.returns_sequence(eqn):
            return expr, _unpack(names)
        return expr, names[0]

    def returns(self, outs: Sequence[Any], structure: Sequence[int] | None = None,
                single: bool = True) -> None:
        """`return a` / `return a, b` / `return (a, b), (c,)` (`structure`: group sizes)."""
        items = [self.arg(o) for o in outs]
        if structure is not None:
            groups, i = [], 0
            for n in structure:
                groups.append(Seq(tuple(items[i:i + n])))
                i += n
            expr: Expr = Seq(tuple(groups))
        elif single and len(items) == 1:
            expr = items[0]
        else:
            expr = Seq(tuple(items))
        text = X.render(expr, 11, 4)
        if isinstance(expr, Seq) and text.startswith("(") and len(expr.items) > 1 and "\n" not in text:
            text = text[1:-1]
        self.lines.append(f"    return {text}")

    # -- the function's text
    def dim_bindings(self, prologue_names: dict[Var, str] | None = None) -> tuple[list[str], list[str]]:
        """Lines binding the used dimension variables from parameter shapes, and the
        dimensions that must come in as parameters."""
        lines, extra = [], []
        for symbol in sorted(self.dims_used, key=list(self.module.dim_names).index):
            found = None
            for v in self.params:
                for j, d in enumerate(getattr(v.aval, "shape", ())):
                    if is_symbolic_dim(d) and str(d) == symbol:
                        found = (v, j)
                        break
                if found:
                    break
            ident = self.module.dim_names[symbol]
            if found:
                lines.append(f"    {ident} = {self.names[found[0]]}.shape[{found[1]}]")
            elif self.extra_dims:
                extra.append(ident)
            else:
                raise UnsupportedPrimitiveError(
                    f"dimension {symbol!r} is used in a sub-function but is not the size of an "
                    "axis of its inputs")
        return lines, extra

    def text(self, name: str, signature: str | None = None, prologue: Sequence[str] = (),
             decorator: str | None = None) -> tuple[str, list[str]]:
        dims, extra = self.dim_bindings()
        sig = signature if signature is not None else ", ".join(self.param_names + extra)
        head = f"def {name}({sig}):"
        if len(head) > _WIDTH:
            head = f"def {name}(\n" + "".join(f"    {p},\n" for p in sig.split(", ")) + "):"
        lines = ([decorator] if decorator else []) + [head, *prologue, *dims, *self.lines]
        return "\n".join(lines) + "\n", extra


def _unpack(names: Sequence[str]) -> str:
    return f"({names[0]},)" if len(names) == 1 else ", ".join(names)


# ---------------------------------------------------------------- sub-programs


def _param_names(n: int, stem: str = "x") -> list[str]:
    return [stem] if n == 1 else [f"{stem}{i}" for i in range(n)]


def _body(fn: Function, eqns: Sequence[Eqn]) -> None:
    """One statement per equation, locals named after their primitive."""
    for e in eqns:
        names = [fn.define(v, e.primitive.name) for v in e.outvars]
        fn.emit(e, names)


def subfunction(caller: Function, closed: Any, base: str, structure: Sequence[int] | None,
                single: bool, extra_dims: bool = True) -> tuple[str, list[str]]:
    """A helper printed from a closed jaxpr; returns its name and the dimension
    parameters the caller must pass after the operands."""
    jaxpr = getattr(closed, "jaxpr", closed)
    params = [Var(v.aval) for v in jaxpr.invars]
    fn = Function(caller.module, params, _param_names(len(params)), extra_dims)
    eqns, outs = flatten(jaxpr, getattr(closed, "consts", ()), params)
    _body(fn, dce(eqns, outs))
    fn.returns(outs, structure, single)
    text, extra = fn.text(_PLACEHOLDER)
    return caller.module.helper(base, text), extra


def _call_args(caller: Function, names: Sequence[str]) -> tuple[Expr, ...]:
    for ident in names:  # the caller binds (or takes) these dimensions too
        symbol = next(s for s, i in caller.module.dim_names.items() if i == ident)
        caller.dim_name(symbol)
    return tuple(Raw(n) for n in names)


def _check_params(eqn: Eqn, handled: Sequence[str], **defaults: Any) -> None:
    try:
        P.expect_params(eqn, *handled, **defaults)
    except X.Unprintable as e:
        raise UnsupportedPrimitiveError(f"cannot print {eqn.primitive.name}: {e}") from e


def _scan(fn: Function, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
    p = eqn.params
    _check_params(eqn, ("jaxpr", "num_consts", "num_carry", "length", "reverse", "unroll",
                        "linear"), _split_transpose=False)
    nc, nk = p["num_consts"], p["num_carry"]
    ny = len(eqn.outvars) - nk
    body, extra = subfunction(fn, p["jaxpr"], "scan_body", (nk, ny), False)
    args = [fn.arg(a) for a in eqn.invars]
    call = Call(body, (*args[:nc], Raw("*carry"), Raw("*xs"), *_call_args(fn, extra)))
    expr = Call("lax.scan", (Lambda("carry, xs", call), Seq(tuple(args[nc:nc + nk])),
                             Seq(tuple(args[nc + nk:]))),
                (("length", fn.value(p["length"])), ("reverse", fn.value(p["reverse"])),
                 ("unroll", fn.value(p["unroll"]))))
    carry = f"({names[0]},)" if nk == 1 else f"({', '.join(names[:nk])})" if nk else "_"
    ys = names[nk:]
    ys_text = f"({ys[0]},)" if len(ys) == 1 else f"({', '.join(ys)})" if ys else "_"
    return expr, f"{carry}, {ys_text}"


def _while(fn: Function, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
    p = eqn.params
    _check_params(eqn, ("cond_jaxpr", "body_jaxpr", "cond_nconsts", "body_nconsts"))
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond, cond_extra = subfunction(fn, p["cond_jaxpr"], "while_cond", None, True)
    body, body_extra = subfunction(fn, p["body_jaxpr"], "while_body", None, False)
    args = [fn.arg(a) for a in eqn.invars]
    cond_call = Call(cond, (*args[:cn], Raw("*carry"), *_call_args(fn, cond_extra)))
    body_call = Call(body, (*args[cn:cn + bn], Raw("*carry"), *_call_args(fn, body_extra)))
    expr = Call("lax.while_loop", (Lambda("carry", cond_call), Lambda("carry", body_call),
                                   Seq(tuple(args[cn + bn:]))))
    return expr, _unpack(names)


def _cond(fn: Function, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
    _check_params(eqn, ("branches",))
    args = [fn.arg(a) for a in eqn.invars]
    branches = []
    for i, br in enumerate(eqn.params["branches"]):
        name, extra = subfunction(fn, br, f"branch_{i}", None, False)
        branch: Expr = Raw(name)
        if extra:
            branch = Lambda("*args", Call(name, (Raw("*args"), *_call_args(fn, extra))))
        branches.append(branch)
    expr = Call("lax.switch", (args[0], Seq(tuple(branches)), *args[1:]))
    return expr, _unpack(names)


def _reduce(fn: Function, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
    """`lax.reduce` with a computation printed from the traced one (not a monoid JAX would
    recognise, so it binds `reduce` again)."""
    _check_params(eqn, ("computation", "jaxpr", "dimensions"), out_sharding=None)
    n = len(eqn.outvars)
    reducer, _ = subfunction(fn, eqn.params["jaxpr"], "reducer", None, True, extra_dims=False)
    args = [fn.arg(a) for a in eqn.invars]
    dims = fn.value(eqn.params["dimensions"])
    if n == 1:
        return Call("lax.reduce", (args[0], args[1], Raw(reducer), dims)), names[0]
    computation = Lambda("a, b", Call(reducer, (Raw("*a"), Raw("*b"))))
    expr = Call("lax.reduce", (Seq(tuple(args[:n])), Seq(tuple(args[n:])), computation, dims))
    return expr, _unpack(names)


def _custom_jvp(fn: Function, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
    """A `@jax.custom_jvp` helper: the primal printed from `call_jaxpr`, the rule from the
    jvp traced with every tangent nonzero (constants' tangents are ignored, as JAX does).

    A rule may call its own primal (softmax's does): helpers are keyed by the primal's
    text and the two functions' names, and the name is reserved before the rule is printed.
    """
    p = eqn.params
    _check_params(eqn, ("call_jaxpr", "jvp_jaxpr_fun", "num_consts", "symbolic_zeros"))
    closed, nconsts, jvp_fun = p["call_jaxpr"], p["num_consts"], p["jvp_jaxpr_fun"]
    n = len(closed.jaxpr.invars)
    primal_text = _primal(fn, closed, "@jax.custom_jvp")
    base = _func_name(closed.jaxpr, "custom_jvp")
    key = (base, _func_name(jvp_fun, ""), primal_text)
    module = fn.module
    name = module.custom_jvps.get(key)
    if name is None:
        name = module.names.fresh("_" + sanitize(base), ("", "_jvp"))
        module.custom_jvps[key] = name
        rule_text = _jvp_rule(fn, jvp_fun, n, nconsts)
        text = primal_text + "\n\n" + rule_text
        module.texts.append(text.replace(_PLACEHOLDER, name))
    expr = Call(name, tuple(fn.arg(a) for a in eqn.invars))
    return expr, names[0] if len(eqn.outvars) == 1 else _unpack(names)


def _primal(fn: Function, closed: Any, decorator: str) -> str:
    params = [Var(v.aval) for v in closed.jaxpr.invars]
    primal = Function(fn.module, params, _param_names(len(params)), extra_dims=False)
    eqns, outs = flatten(closed.jaxpr, closed.consts, params)
    _body(primal, dce(eqns, outs))
    primal.returns(outs)
    return primal.text(_PLACEHOLDER, decorator=decorator)[0]


def _custom_vjp(fn: Function, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
    """A `@jax.custom_vjp` helper: the primal from `call_jaxpr`, `fwd` from the traced forward
    (returning every residual, the ones JAX forwards from the inputs included), `bwd` traced
    from the rule at the residuals' and cotangents' types (a zero cotangent is `None`, and so
    is every constant's, which JAX does not differentiate either)."""
    p = eqn.params
    _check_params(eqn, ("call_jaxpr", "fwd_jaxpr_thunk", "bwd", "num_consts", "out_trees",
                        "symbolic_zeros"))
    closed, nconsts = p["call_jaxpr"], p["num_consts"]
    n, n_out = len(closed.jaxpr.invars), len(closed.jaxpr.outvars)
    primal_text = _primal(fn, closed, "@jax.custom_vjp")
    base = _func_name(closed.jaxpr, "custom_vjp")
    key = (base, _func_name(p["bwd"], ""), primal_text)
    module = fn.module
    name = module.custom_vjps.get(key)
    if name is None:
        name = module.names.fresh("_" + sanitize(base), ("", "_fwd", "_bwd"))
        module.custom_vjps[key] = name
        fwd_text, residuals = _vjp_fwd(fn, p, n, n_out, nconsts)
        bwd_text = _vjp_bwd(fn, p["bwd"], residuals, closed.jaxpr.outvars, n, nconsts)
        ph = _PLACEHOLDER
        text = "\n\n".join([primal_text, fwd_text, bwd_text,
                             f"{ph}.defvjp({ph}_fwd, {ph}_bwd)\n"])
        module.texts.append(text.replace(ph, name))
    expr = Call(name, tuple(fn.arg(a) for a in eqn.invars))
    return expr, names[0] if n_out == 1 else _unpack(names)


def _vjp_fwd(fn: Function, p: dict, n: int, n_out: int, nconsts: int) -> tuple[str, list[Any]]:
    fwd_jaxpr, fwd_consts = p["fwd_jaxpr_thunk"].call_wrapped(*[True] * (n - nconsts))
    _, _, input_fwds = p["out_trees"]()
    params = [Var(v.aval) for v in p["call_jaxpr"].jaxpr.invars]
    fwd = Function(fn.module, params, _param_names(n), extra_dims=False)
    eqns, outs = flatten(fwd_jaxpr, fwd_consts, params[nconsts:])
    _body(fwd, dce(eqns, outs))
    pruned = iter(outs[:len(outs) - n_out])
    residuals = [params[i] if i is not None else next(pruned) for i in input_fwds]
    prim = [fwd.arg(o) for o in outs[len(outs) - n_out:]]
    ret = Seq((prim[0] if n_out == 1 else Seq(tuple(prim)), Seq(tuple(fwd.arg(r) for r in residuals))))
    fwd.lines.append("    return " + X.render(ret, 11, 4))
    return fwd.text(_PLACEHOLDER + "_fwd")[0], residuals


def _vjp_bwd(fn: Function, bwd: Any, residuals: list[Any], outvars: Sequence[Any], n: int,
             nconsts: int) -> str:
    kept: list[bool] = []

    def rule(*args: Any) -> list[Any]:
        cts = bwd.call_wrapped(*args)
        kept[:] = [isinstance(c, jax.Array) for c in cts]  # a zero cotangent is no array
        return [c for c in cts if isinstance(c, jax.Array)]

    avals = [r.aval for r in residuals] + [v.aval for v in outvars]
    closed = jax.make_jaxpr(rule)(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals))
    rs = [Var(r.aval) for r in residuals]
    cs = [Var(v.aval) for v in outvars]
    r_names, c_names = _param_names(len(rs), "r"), _param_names(len(cs), "c")
    bwd_fn = Function(fn.module, rs + cs, r_names + c_names, extra_dims=False)
    eqns, outs = flatten(closed.jaxpr, closed.consts, rs + cs)
    _body(bwd_fn, dce(eqns, outs))
    given = iter(outs)
    results = [Raw("None")] * nconsts + [bwd_fn.arg(next(given)) if k else Raw("None")
                                         for k in kept]
    bwd_fn.lines.append("    return " + X.render(Seq(tuple(results)), 11, 4))
    prologue = [f"    {_unpack(r_names)} = res"] if rs else []
    if len(cs) > 1:
        prologue.append(f"    {_unpack(c_names)} = cts")
    ct_param = c_names[0] if len(cs) == 1 else "cts"
    return bwd_fn.text(_PLACEHOLDER + "_bwd", f"res, {ct_param}", prologue)[0]


def _func_name(obj: Any, default: str) -> str:
    name = getattr(getattr(obj, "debug_info", None), "func_name", None) or default
    return name.split(".")[-1].split(" ")[0]


def _jvp_rule(fn: Function, jvp_fun: Any, n: int, nconsts: int) -> str:
    nd = n - nconsts
    jvp_jaxpr, jvp_consts, out_zeros = jvp_fun.call_wrapped(*[False] * nd)
    xs = [Var(v.aval) for v in jvp_jaxpr.invars[:nd]]
    ts = [Var(v.aval) for v in jvp_jaxpr.invars[nd:]]
    x_names, t_names = _param_names(nd, "x"), _param_names(nd, "t")
    rule = Function(fn.module, xs + ts, x_names + t_names, extra_dims=False)
    eqns, outs = flatten(jvp_jaxpr, jvp_consts, xs + ts)
    _body(rule, dce(eqns, outs))
    n_out = len(out_zeros)
    out_primals, nz = outs[:n_out], iter(outs[n_out:])
    prim_exprs = [rule.arg(o) for o in out_primals]
    tan_exprs = [Call("jnp.zeros_like", (e,)) if z else rule.arg(next(nz))
                 for e, z in zip(prim_exprs, out_zeros, strict=True)]
    if n_out == 1:
        ret: Expr = Seq((prim_exprs[0], tan_exprs[0]))
    else:
        ret = Seq((Seq(tuple(prim_exprs)), Seq(tuple(tan_exprs))))
    rule.lines.append("    return " + X.render(ret, 11, 4))
    cut = f"[{nconsts}:]" if nconsts else ""
    prologue = [f"    {_unpack(x_names)} = primals{cut}", f"    {_unpack(t_names)} = tangents{cut}"]
    text, _ = rule.text(_PLACEHOLDER + "_jvp", "primals, tangents", prologue,
                        decorator=f"@{_PLACEHOLDER}.defjvp")
    return text


def _refuse(reason: str) -> Callable:
    def refuse(fn: Function, eqn: Eqn, names: list[str]) -> tuple[Expr, str]:
        raise UnsupportedPrimitiveError(f"cannot print the JAX primitive {eqn.primitive.name!r}: "
                                        f"{reason}")
    return refuse


_SPECIAL: dict[str, Callable[[Function, Eqn, list[str]], tuple[Expr, str]]] = {
    "scan": _scan,
    "while": _while,
    "cond": _cond,
    "reduce": _reduce,
    "custom_jvp_call": _custom_jvp,
    "custom_vjp_call": _custom_vjp,
    "debug_callback": _refuse(
        "it calls back into Python (a bridge run-time check: convert with checks=False)"),
    "pure_callback": _refuse("it calls back into Python"),
    "io_callback": _refuse("it calls back into Python"),
}


# ---------------------------------------------------------------- the main function


def _groups(eqns: Sequence[Eqn]) -> list[tuple[str, list[Eqn]]]:
    """Consecutive equations under one node scope (or under a scope nested in it)."""
    groups: list[tuple[str, list[Eqn]]] = []
    for e in eqns:
        if groups and groups[-1][0] and (e.scope == groups[-1][0]
                                         or e.scope.startswith(groups[-1][0] + "/")):
            groups[-1][1].append(e)
        else:
            groups.append((e.scope, [e]))
    return groups


def _dim_names(example_args: Sequence[Any], arg_names: Sequence[str]) -> dict[str, str]:
    names = Namer(set(_RESERVED) | set(arg_names))
    out: dict[str, str] = {}
    for a in example_args:
        for d in getattr(a, "shape", ()):
            if is_symbolic_dim(d):
                for symbol in sorted(d.get_vars()):
                    if symbol not in out:
                        out[symbol] = names.fresh(sanitize(symbol))
    return out


def emit_function(fn: Callable, example_args: Sequence[Any], *, name: str,
                  arg_names: Sequence[str], comments: dict[str, str] | None = None,
                  constants: dict | None = None) -> str:
    """Python source defining `def <name>(<arg_names...>)`: the computation of the pure JAX
    function `fn(*flat_arrays) -> tuple of flat arrays`, traced at `example_args` (a tuple of
    jax.ShapeDtypeStruct, possibly with symbolic dims from jax.export.symbolic_shape). The defined
    function returns a tuple of flat arrays. Uses only `jax`, `jax.numpy as jnp`, `jax.lax as lax`,
    `numpy as np`, `math` (the text starts with a comment listing which ones it uses). `comments`
    maps a graph node name (the last part of the scope) to a short torch source line to attach as
    a comment.

    The returned text holds the helper functions the program uses (each once, before the main
    function) and the main function.

    Constants of more than `SMALL_CONSTANT` elements that the program closes over (tables a
    lowering computed with NumPy) are refused, unless `constants` is a dict: they are then put
    in it as NumPy arrays named `const_<n>` (in order of first use, identical arrays once) and
    the code reads them as `CONSTANTS["const_<n>"]`, a global the caller defines.
    """
    arg_names = list(arg_names)
    if len(arg_names) != len(example_args):
        raise ValueError(f"{len(arg_names)} arg_names for {len(example_args)} example_args")
    for a in arg_names:
        if not a.isidentifier() or keyword.iskeyword(a) or a in _RESERVED or a.startswith("_"):
            raise ValueError(f"argument name {a!r} is not usable in generated code")
    comments = comments or {}
    closed = jax.make_jaxpr(fn)(*example_args)
    for c in closed.consts:
        if constants is None and np.size(c) > X.SMALL_CONSTANT:
            raise ConstantError(
                f"{name}: the traced program closes over a constant array of shape "
                f"{np.shape(c)}; only constants of at most {X.SMALL_CONSTANT} elements are "
                "printed as code: pass it as an input (parameters and buffers are inputs).")
    module = Module(_dim_names(example_args, arg_names), constants)
    params = [Var(v.aval) for v in closed.jaxpr.invars]
    main = Function(module, params, arg_names, extra_dims=False)
    eqns, outs = flatten(closed.jaxpr, closed.consts, params)
    eqns = dce(eqns, outs)
    groups = _groups(eqns)

    where: dict[Var, int] = {}
    for g, (_, members) in enumerate(groups):
        for e in members:
            where.update((v, g) for v in e.outvars)
    escapes = {o for o in outs if isinstance(o, Var)}
    for g, (_, members) in enumerate(groups):
        for e in members:
            escapes.update(a for a in e.invars if isinstance(a, Var) and where.get(a, g) != g)

    for scope, members in groups:
        base = scope_base(scope) if scope else "tmp"
        comment = comments.get(scope.split("/")[-1]) if scope else None
        if len(members) == 1:
            e = members[0]
            names = ([main.define(v, base) for v in e.outvars] if len(e.outvars) == 1
                     else [main.define(v, f"{base}_{i}") for i, v in enumerate(e.outvars)])
            main.emit(e, names, comment)
            continue
        _group_call(main, scope, members, escapes, base, comment)
    main.returns(outs, single=False)
    text, _ = main.text(name)
    body = "\n\n".join([*module.texts, text])
    used = sorted(set(re.findall(r"\b(jax|jnp|lax|np|math)\.", body)),
                  key=_MODULES.index)
    return f"# uses: {', '.join(used)}\n\n\n{body}"


def _group_call(main: Function, scope: str, members: list[Eqn], escapes: set[Var], base: str,
                comment: str | None) -> None:
    """A group of equations printed as a helper function and one call of it."""
    defined = {v for e in members for v in e.outvars}
    inputs: list[Var] = []
    for e in members:
        for a in e.invars:
            if isinstance(a, Var) and a not in defined and a not in inputs:
                inputs.append(a)
    outputs = [v for e in members for v in e.outvars if v in escapes]
    helper = Function(main.module, inputs, _param_names(len(inputs)), extra_dims=True)
    _body(helper, members)
    helper.returns(outputs)
    text, extra = helper.text(_PLACEHOLDER)
    hname = main.module.helper(op_name(scope) if scope else "glue", text)
    call = Call(hname, (*(main.arg(a) for a in inputs), *_call_args(main, extra)))
    if len(outputs) == 1:
        names = [main.define(outputs[0], base)]
    else:
        names = [main.define(v, f"{base}_{i}") for i, v in enumerate(outputs)]
    main.statement(", ".join(names), call, comment)  # no names: a call for its effects
