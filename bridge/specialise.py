"""Specialise a data-dependent guard that only decides whether torch raises.

torch.export stops at a Python decision on a tensor's value. Many such
decisions are input validation: `if torch.any(var < 0): raise ValueError(...)`
in `F.gaussian_nll_loss`, a `TORCH_CHECK` on a value. On one side of the guard
torch raises; on the other it goes on. Such a guard can be decided safely:
`explore` captures once per outcome of each guard it meets (by deciding the
guard inside torch's ShapeEnv, `deciding`), and when exactly one outcome makes
the traced code raise, it assumes the other and has torch.export record the
assumption as a run-time assertion (`aten._assert_scalar`, the mechanism of
`torch._check`). The translated program checks it on every call: an input on
which torch would take the raising branch raises (the error torch raised, with
its message), so the program never computes a branch torch would not.

A guard on which both outcomes go on (a real branch, `if x.sum() > 0:`) is not
specialised: the capture error stands, and the caller falls back to torch.

The assertion's expression reads the tensor's value (`aten.item`) and combines
it with Python operators (`operator.eq`, `torch.sym_not`, ...): `SYM_FUNCTIONS`
evaluates those on JAX scalars, and `feeds_only_checks` tells the `.item()`
lowering that its value only reaches such assertions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import sympy
import torch
from torch.fx.experimental import symbolic_shapes

__all__ = [
    "MAX_GUARDS", "SYM_FUNCTIONS", "Assumption", "attempt_with", "deciding", "error_type", "explore",
    "feeds_only_checks", "label_assertions", "note_guard",
]

MAX_GUARDS = 8  # guards specialised per capture; each costs two more exports

# Python functions that torch.export's run-time assertions apply to symbolic
# values, as JAX functions of scalars.
SYM_FUNCTIONS: dict[Callable, Callable] = {
    operator.eq: operator.eq, operator.ne: operator.ne, operator.lt: operator.lt,
    operator.le: operator.le, operator.gt: operator.gt, operator.ge: operator.ge,
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.neg: operator.neg, operator.floordiv: operator.floordiv, operator.mod: operator.mod,
    operator.truediv: operator.truediv,
    operator.and_: jnp.logical_and, operator.or_: jnp.logical_or,
    torch.sym_not: jnp.logical_not, torch.sym_ite: jnp.where,
    torch.sym_max: jnp.maximum, torch.sym_min: jnp.minimum,
    torch.sym_float: lambda x: jnp.asarray(x, jnp.float32), math.floor: jnp.floor, math.ceil: jnp.ceil,
}
_CHECKS = {
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._functional_assert_scalar.default,
    torch.ops.aten.sym_constrain_range.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}

# The run-time assertions `explore` adds, by message: the exception type torch
# raised on the branch the assertion rules out (a process-wide table; one
# entry per specialised guard, so it stays small).
_ERRORS: dict[str, type[Exception]] = {}


def error_type(message: str) -> type[Exception]:
    """The exception a failed `aten._assert_scalar` with `message` raises."""
    return _ERRORS.get(message, AssertionError)


def feeds_only_checks(node: torch.fx.Node) -> bool:
    """Whether the value of `node` reaches only run-time assertions (through `SYM_FUNCTIONS`)."""
    seen, todo = set(), list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.target in _CHECKS:
            continue
        if user.op != "call_function" or user.target not in SYM_FUNCTIONS:
            return False
        todo.extend(user.users)
    return bool(seen)


@dataclasses.dataclass(frozen=True)
class Assumption:
    """A guard decided at capture: `expr` is `value`, checked at run time."""

    expr: str  # the guard as torch states it, e.g. Eq(u0, 1)
    value: bool
    source: str  # where the code decides, as torch names it (`nn/functional.py:3344 in gaussian_nll_loss`)
    error: type[Exception]  # what torch raised on the other branch
    message: str

    def describe(self) -> str:
        return f"{self.expr} assumed {self.value} at {self.source or 'an unknown line'}"


@dataclasses.dataclass
class _Trace:
    """One export attempt: the guards it decides (in order) and those it met."""

    decisions: list[tuple[str, bool]]
    seen: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (expr, source)
    asserted: list[str] = dataclasses.field(default_factory=list)  # the assertions' canonical expressions


_ACTIVE = threading.local()
_PATCH_LOCK = threading.Lock()


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_NN = os.path.join(_TORCH_DIR, "nn", "")
_OWN_DIRS = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + d + os.sep
                  for d in ("bridge", "adapters"))


def _deciding_line() -> str:
    """`file.py:12 in f: code` of the innermost frame outside torch's internals and bridge.

    torch.nn's functional code counts (the check in `F.gaussian_nll_loss`).
    """
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        internal = name.startswith(_TORCH_DIR) and not name.startswith(_TORCH_NN)
        if internal or name.startswith(_OWN_DIRS) or name.endswith(os.path.join("nn", "modules", "module.py")):
            continue
        code = (frame.line or "").strip()
        return f"{os.path.basename(name)}:{frame.lineno} in {frame.name}" + (f": {code}" if code else "")
    return ""


def _evaluate_expr(original: Callable) -> Callable:
    def evaluate(self, orig_expr, hint=None, fx_node=None, size_oblivious=False, fallback_value=None,
                 *, forcing_spec=False):
        try:
            return original(self, orig_expr, hint, fx_node, size_oblivious, fallback_value,
                            forcing_spec=forcing_spec)
        except symbolic_shapes.GuardOnDataDependentSymNode:
            trace = getattr(_ACTIVE, "trace", None)
            if trace is None or not isinstance(orig_expr, sympy.logic.boolalg.Boolean):
                raise
            i = len(trace.seen)
            trace.seen.append((str(orig_expr), _deciding_line()))
            if i >= len(trace.decisions) or trace.decisions[i][0] != str(orig_expr):
                raise
            value = trace.decisions[i][1]
            assumed = orig_expr if value else sympy.Not(orig_expr)
            trace.asserted.append(str(symbolic_shapes.canonicalize_bool_expr(assumed)))
            self.guard_or_defer_runtime_assert(assumed, f"bridge assumed {assumed}")
            return sympy.true if value else sympy.false

    return evaluate


@contextlib.contextmanager
def deciding(decisions: list[tuple[str, bool]]) -> Iterator[_Trace]:
    """Decide the data-dependent guards torch.export meets, in order, as `decisions` says.

    Only this thread's exports are affected (others see torch's own behaviour).
    """
    trace = _Trace(list(decisions))
    with _PATCH_LOCK:
        original = symbolic_shapes.ShapeEnv._evaluate_expr
        if not getattr(original, "_bridge_deciding", False):
            patched = _evaluate_expr(original)
            patched._bridge_deciding = True
            symbolic_shapes.ShapeEnv._evaluate_expr = patched
    _ACTIVE.trace = trace
    try:
        yield trace
    finally:
        _ACTIVE.trace = None


def _is_guard(error: BaseException) -> bool:
    return isinstance(error, symbolic_shapes.GuardOnDataDependentSymNode)


# Modules whose exceptions are the tracer's, not an error the traced code raises.
_TRACER_MODULES = ("torch._dynamo", "torch.fx", "torch._subclasses", "torch.export", "torch._export",
                   "torch._guards", "torch.utils._sympy")


# What torch raises when code reads a fake tensor's values (`.numpy()`, a data
# pointer): eager torch would not raise there.
_FAKE_VALUE_READS = ("not supported for tensor subclasses", "Cannot access data pointer", "FakeTensor")


def _raised_by_code(error: BaseException) -> bool:
    """Whether the traced code itself raised `error` (a validation), not torch.export's tracer."""
    name, module = type(error).__name__, type(error).__module__ or ""
    if "DataDependent" in name or "PendingUnbacked" in name or "DynamicOutputShape" in name:
        return False
    if any(marker in str(error) for marker in _FAKE_VALUE_READS):
        return False
    return not module.startswith(_TRACER_MODULES)


def explore(attempt: Callable[[list[tuple[str, bool]]], Any], error: BaseException,
            ) -> tuple[Any, list[Assumption], _Trace]:
    """Capture by deciding the validation guards that stopped torch.export.

    `attempt(decisions)` exports once with those guards decided (under
    `deciding`) and returns `(result, trace)`, or raises. `error` is the
    undecided attempt's error. Returns the first attempt that succeeds and
    the assumptions it makes; raises `error` if a guard is a real branch
    (both outcomes go on), if both outcomes raise, or past `MAX_GUARDS`.
    """
    decisions: list[tuple[str, bool]] = []
    assumptions: list[Assumption] = []
    current = error
    for _ in range(MAX_GUARDS):
        guard = getattr(current, "_bridge_guard", None)
        if not _is_guard(current) or guard is None:
            raise error
        expr, source = guard
        outcomes: dict[bool, Any] = {}
        for value in (False, True):
            try:
                outcomes[value] = attempt([*decisions, (expr, value)])
            except Exception as e:
                outcomes[value] = e
        raises = [v for v, o in outcomes.items() if isinstance(o, Exception) and _raised_by_code(o)]
        if len(raises) != 1:
            raise error  # a real branch, or torch raises either way: nothing safe to assume
        bad = outcomes[raises[0]]
        value = not raises[0]
        decisions.append((expr, value))
        assumptions.append(Assumption(expr, value, source, type(bad), str(bad).strip().split("\n")[0]))
        if not isinstance(outcomes[value], Exception):
            result, trace = outcomes[value]
            return result, assumptions, trace
        current = outcomes[value]
    raise error


def note_guard(error: BaseException, trace: _Trace) -> None:
    """Mark `error` with the undecided guard it stopped at (for `explore`), if it did."""
    if _is_guard(error) and len(trace.seen) > len(trace.decisions):
        error._bridge_guard = trace.seen[len(trace.decisions)]


def attempt_with(export: Callable[[], Any]) -> Callable[[list[tuple[str, bool]]], Any]:
    """`explore`'s `attempt` for `export()`: its error carries the guard it stopped at."""

    def attempt(decisions: list[tuple[str, bool]]) -> Any:
        with deciding(decisions) as trace:
            try:
                return export(), trace
            except Exception as e:
                note_guard(e, trace)
                raise

    return attempt


def label_assertions(program: torch.export.ExportedProgram, assumptions: list[Assumption], trace: _Trace) -> None:
    """Give the run-time assertions of `assumptions` torch's own error and message."""
    labels = {}
    for assumption, asserted in zip(assumptions, trace.asserted, strict=False):
        message = (
            f"{assumption.message} (torch raises {assumption.error.__name__} on this input: the "
            f"translation assumed {assumption.expr} is {assumption.value} at "
            f"{assumption.source or 'a data-dependent check'}, the branch on which torch does not "
            "raise, and checks it on every call)"
        )
        labels[f"expression {asserted} on node"] = message
        _ERRORS[message] = assumption.error
    for node in program.graph.nodes:
        if node.target not in _CHECKS or len(node.args) < 2 or not isinstance(node.args[1], str):
            continue
        for needle, message in labels.items():
            if needle in node.args[1]:
                node.args = (node.args[0], message, *node.args[2:])
