"""The flat program the source printer prints: a traced jaxpr with nested calls inlined
(each equation keeps its name scope), dead equations dropped, and the names of values."""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

_INLINE = ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat")
_BUILTINS = frozenset(dir(builtins))


# ---------------------------------------------------------------- the flat program


class Var:
    """A value of the flattened program (identity is the value)."""

    __slots__ = ("aval",)

    def __init__(self, aval: Any) -> None:
        self.aval = aval


class Const:
    """A constant operand: a jaxpr literal or a closed-over constant."""

    __slots__ = ("aval", "val")

    def __init__(self, val: Any, aval: Any) -> None:
        self.val, self.aval = val, aval


class Eqn:
    __slots__ = ("effects", "invars", "outvars", "params", "primitive", "scope")

    def __init__(self, e: Any, invars: list, outvars: list[Var], scope: str) -> None:
        self.primitive, self.params, self.effects = e.primitive, e.params, e.effects
        self.invars, self.outvars, self.scope = invars, outvars, scope


def _join(prefix: str, scope: str) -> str:
    return "/".join(s for s in (prefix, scope) if s)


def flatten(jaxpr: Any, consts: Sequence[Any], inputs: Sequence[Any], prefix: str = ""):
    """`jaxpr`'s equations on `inputs` with nested calls inlined: (equations, outputs)."""
    env: dict[Any, Any] = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = Const(c, v.aval)
    for v, a in zip(jaxpr.invars, inputs, strict=True):
        env[v] = a

    def read(a: Any) -> Any:
        return Const(a.val, a.aval) if isinstance(a, jcore.Literal) else env[a]

    eqns: list[Eqn] = []
    for e in jaxpr.eqns:
        scope = _join(prefix, str(e.source_info.name_stack))
        ins = [read(a) for a in e.invars]
        if e.primitive.name in _INLINE:
            sub = e.params.get("jaxpr", e.params.get("call_jaxpr"))
            sub_consts = getattr(sub, "consts", ())
            inner, outs = flatten(getattr(sub, "jaxpr", sub), sub_consts, ins, scope)
            eqns += inner
        else:
            outs = [Var(v.aval) for v in e.outvars]
            eqns.append(Eqn(e, ins, outs, scope))
        for v, o in zip(e.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return eqns, [read(v) for v in jaxpr.outvars]


def dce(eqns: list[Eqn], outs: Sequence[Any]) -> list[Eqn]:
    """The equations that outputs depend on (and those with effects)."""
    live = {o for o in outs if isinstance(o, Var)}
    kept = []
    for e in reversed(eqns):
        if e.effects or any(v in live for v in e.outvars):
            kept.append(e)
            live.update(a for a in e.invars if isinstance(a, Var))
    return kept[::-1]


# ---------------------------------------------------------------- names


def sanitize(text: str) -> str:
    """A lower-case identifier: non-alphanumerics become underscores; Python's keywords and
    builtins (`and`, `slice`, `max`) get a trailing underscore."""
    name = re.sub(r"_+", "_", re.sub(r"[^0-9a-zA-Z_]", "_", text.lower())).strip("_")
    if not name:
        return "v"
    if name[0].isdigit():
        name = "m" + name
    return name + "_" if keyword.iskeyword(name) or name in _BUILTINS else name


class Namer:
    def __init__(self, reserved: Any = ()) -> None:
        self.used = set(reserved)

    def fresh(self, base: str, suffixes: Sequence[str] = ("",)) -> str:
        i = 1
        while True:
            name = base if i == 1 else f"{base}_{i}"
            if all(name + s not in self.used for s in suffixes):
                self.used.update(name + s for s in suffixes)
                return name
            i += 1


# ATen names whose long form says nothing a reader needs
_SHORT = {"native_batch_norm_legit_no_training": "batch_norm",
          "native_batch_norm_legit_functional": "batch_norm", "native_batch_norm_legit": "batch_norm",
          "native_layer_norm": "layer_norm", "native_group_norm": "group_norm",
          "safe_softmax": "softmax"}


def op_name(scope: str) -> str:
    """The op of a node scope: `h/0/attn/c_attn/addmm_3` -> `addmm`."""
    op = sanitize(re.sub(r"_\d+$", "", scope.split("/")[-1]))
    return _SHORT.get(op, op)


def scope_base(scope: str) -> str:
    """`h/0/attn/c_attn/addmm_3` -> `h_0_attn_c_attn_addmm`."""
    return sanitize("_".join([*scope.split("/")[:-1], op_name(scope)]))
