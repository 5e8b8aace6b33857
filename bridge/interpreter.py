"""ATen graph -> JAX: walk the graph and call the lowering table.

The interpreter knows nothing about individual ops. For each node it looks
the ATen overload up in `bridge.ops.LOWERINGS`, calls the lowering with JAX
values, and checks the result against torch's recorded output shape and dtype
(`node.meta["val"]`), so a lowering that disagrees with torch fails loudly
instead of returning a silently different answer. Ops with no lowering, and
ops whose lowering refuses the arguments at hand (`NotImplementedError`), run
through `bridge.callback` (torch itself behind a JAX primitive) when the
caller allows it.

Integers: with JAX's x64 mode off (the default) torch's int64 values are held
as int32. The lowerings of the ops that can leave the int32 range (sums,
products, shifts, casts from float) record a run-time check that the result
is exact (bridge/ops/exact.py), so a value that does not fit is an `X64Error`,
never a wrapped number.
"""

from __future__ import annotations

import operator
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.node import map_arg

from bridge import dtypes, layout
from bridge.checks import Check
from bridge.ops import LOWERINGS
from bridge.ops.registry import (
    DataDependentShapeError,
    LoweringContext,
    MissingKeyError,
    RefusedByTorchError,
)
from bridge.specialise import SYM_FUNCTIONS
from bridge.symbolic import Dims, SymbolicShapeError, is_symbolic, same_size

_with_effects = torch.ops.higher_order.with_effects


class LoweringError(RuntimeError):
    """A lowering returned something other than what torch computes."""


class UnsupportedOpsError(NotImplementedError):
    """The graph contains ATen ops with no JAX lowering."""


class TranslationError(RuntimeError):
    """A lowering failed on this node; the message says where in the torch code."""


def node_op(node: torch.fx.Node) -> Any:
    """The op a node runs: its target, or for `with_effects(token, op, ...)` the inner op."""
    return node.args[1] if node.target is _with_effects else node.target


_OWN_FILES = (f"{os.sep}bridge{os.sep}", f"{os.sep}adapters{os.sep}")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def describe_node(node: torch.fx.Node) -> str:
    """`aten.op.overload` with the module path and source line that made it."""
    where = []
    path = module_path(node)
    if path:
        where.append(f"in module '{path}'")
    frame = _user_frame(node)
    if frame:
        where.append(f"at {frame[0]}" + (f": {frame[1]}" if frame[1] else ""))
    return f"{node_op(node)}" + (f" ({', '.join(where)})" if where else "")


def _user_frame(node: torch.fx.Node) -> tuple[str, str] | None:
    """The innermost frame of the node's stack trace outside the bridge's own code:
    (`File "...", line N, in f`, its source line)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    frames = [
        (i, ln) for i, ln in enumerate(lines)
        if ln.startswith("File ") and not any(own in ln for own in _OWN_FILES)
    ]
    # The caller's line rather than torch's own (`F.embedding` inside nn.Embedding).
    frames = [f for f in frames if _TORCH_DIR not in f[1]] or frames
    if not frames:
        return None
    i, frame = frames[-1]
    code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
    return frame, code


def source_line(node: torch.fx.Node) -> str | None:
    """`file.py:123: code` of the torch source line that made `node`, where the graph records it."""
    frame = _user_frame(node)
    if frame is None:
        return None
    found = re.match(r'File "([^"]+)", line (\d+)', frame[0])
    if not found:
        return None
    where = f"{os.path.basename(found.group(1))}:{found.group(2)}"
    return f"{where}: {frame[1]}" if frame[1] else where


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the submodule whose forward made `node` ('' at the top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").removeprefix("m.").removeprefix("L__self___")
    return "" if path in ("L['self']", "m") else path


def node_scope(node: torch.fx.Node) -> str:
    """The JAX name scope a node's operations are traced under: `a/b/c/<node name>`.

    The module path becomes nested scopes, so profiles and HLO metadata show
    torch's module tree, and the last part is the graph node's unique name.
    """
    path = module_path(node)
    return "/".join([*path.split("."), node.name]) if path else node.name


def unsupported_error(nodes: Sequence[torch.fx.Node]) -> UnsupportedOpsError:
    ops = sorted({str(node_op(n)) for n in nodes})
    lines = "\n".join(f"  - {describe_node(n)}" for n in nodes)
    return UnsupportedOpsError(
        f"{len(ops)} ATen op(s) have no JAX lowering: {', '.join(ops)}\n{lines}\n"
        "Convert with bridge.torch_to_jax(..., mode='callback') to run torch itself for the "
        "whole module, or with strict=False to run only these ops through torch callbacks."
    )


def callback_fallback(node: torch.fx.Node) -> Callable:
    """A lowering that runs the node's ATen op in torch, behind a JAX primitive."""
    from bridge.callback import wrap

    run_in_torch = wrap(node_op(node))

    def lower(ctx: LoweringContext, *args: Any, **kwargs: Any) -> Any:
        return run_in_torch(*args, **kwargs)

    return lower


def _check(node: torch.fx.Node, value: Any, expected: Any, dims: Dims) -> None:
    if isinstance(expected, torch.Tensor):
        if not all(dims.binds(s) for s in expected.shape):
            raise DataDependentShapeError(
                f"{describe_node(node)}: its output shape {tuple(expected.shape)} depends on tensor "
                "values (a number read from a tensor, e.g. tensor split points), which JAX's static "
                "shapes cannot express. Pass such numbers as Python values, or run the function "
                "with mode='callback' outside jax.jit."
            )
        shape = tuple(dims.size(s) for s in expected.shape)
        dtype = dtypes.canonical_jax_dtype(expected.dtype)
        got_shape = tuple(np.shape(value))
        got_dtype = np.dtype(getattr(value, "dtype", type(value)))
        same = len(got_shape) == len(shape) and all(map(same_size, got_shape, shape))
        if not same and dims.active:
            raise SymbolicShapeError(
                f"{describe_node(node)} gives shape {list(got_shape)} in JAX where torch computes "
                f"{list(shape)}, and the two cannot be proven equal for every value of the "
                "symbolic dimensions. Export with these dimensions static, or narrow their range."
            )
        if not same or got_dtype != dtype:
            raise LoweringError(
                f"the lowering of {node.target} returned {got_dtype}{list(got_shape)}, "
                f"but torch computes {dtype}{list(shape)} for node '{node.name}'. "
                "This is a bug in bridge; please report it."
            )
    elif isinstance(expected, (tuple, list)) and isinstance(value, (tuple, list)):
        for v, e in zip(value, expected, strict=False):
            if e is not None and v is not None:
                _check(node, v, e, dims)


def _token(node: torch.fx.Node) -> jax.Array:
    """A stand-in for an effect token: an empty array like the one torch records."""
    val = node.meta.get("val")
    dtype = dtypes.canonical_jax_dtype(val.dtype) if isinstance(val, torch.Tensor) else np.float32
    return jnp.zeros((0,), dtype)


def _effect_outputs(op: torch._ops.OpOverload, val: Any) -> Any:
    """The recorded outputs of the op inside `with_effects` (whose own are `(token, *outputs)`)."""
    returns = len(op._schema.returns)
    if val is None or returns == 0:
        return None
    return tuple(val[1:]) if returns > 1 else val[1]


def _lower(node, lower, ctx, args, kwargs, fallback, checks, dims: Dims) -> Any:
    """Call one lowering; failures carry the node's module path and source line.

    A lowering that read the example value of a symbolic size (torch records a guard) is
    refused whether it then failed or not: its program would hold only at that size.
    """
    before = len(checks) if checks is not None else 0
    guards = dims.guards()
    try:
        out = _call(node, lower, ctx, args, kwargs, fallback, dims)
    except Exception as e:
        if dims.guards() > guards:
            raise _example_read(node, dims) from e
        raise
    if dims.guards() > guards:
        raise _example_read(node, dims)
    if checks is not None and len(checks) > before:
        where = describe_node(node)
        for check in checks[before:]:
            check.where = check.where or where
    return out


def _example_read(node: torch.fx.Node, dims: Dims) -> SymbolicShapeError:
    return SymbolicShapeError(
        f"{describe_node(node)} cannot be exported with symbolic dimensions: its lowering "
        f"reads the example value of a symbolic size (torch recorded the guard "
        f"{dims.last_guard()}), so the program would be right only at the example's size. "
        "Export with this dimension static (leave it out of dynamic_shapes)."
    )


def _call(node, lower, ctx, args, kwargs, fallback, dims: Dims) -> Any:
    try:
        out = lower(ctx, *args, **kwargs)
    except (MissingKeyError, LoweringError, UnsupportedOpsError, SymbolicShapeError):
        raise
    except (DataDependentShapeError, RefusedByTorchError) as e:
        # The user's inputs or code: same error type, with where it happened.
        raise type(e)(f"{e} [{describe_node(node)}]") from e
    except NotImplementedError as e:
        # The lowering does not cover these arguments (e.g. LU without
        # pivoting); torch may, so run the op in torch when allowed.
        refused = UnsupportedOpsError(
            f"{describe_node(node)} cannot be translated: {e}. Convert with "
            "strict=False to run this op through a torch callback, or with "
            "mode='callback' to run the whole module in torch."
        )
        if fallback is None:
            raise refused from e
        try:
            out = fallback(node)(ctx, *args, **kwargs)
        except Exception:
            raise refused from e  # a callback cannot serve it either (e.g. `.item()`)
        warnings.warn(
            f"{describe_node(node)} cannot be translated ({e}); it runs through a torch "
            "callback. Pass strict=True to make this an error.",
            stacklevel=2,
        )
    except Exception as e:
        if dims.active:  # most likely JAX's refusal of a shape it cannot follow symbolically
            raise SymbolicShapeError(
                f"{describe_node(node)} cannot be traced with symbolic dimensions: "
                f"{type(e).__name__}: {e}. Export with these dimensions static (leave them out "
                "of dynamic_shapes)."
            ) from e
        raise TranslationError(
            f"translating {describe_node(node)} failed: {type(e).__name__}: {e}\n"
            "Convert with mode='callback' to run this module in torch instead, and please "
            "report the failure."
        ) from e
    return out


def _size_arithmetic(node: torch.fx.Node, val: Any, dims: Dims) -> Any:
    """A node computing on sizes (operator.mul, sym_max, a comparison torch checks at run time):
    torch's recorded expression for it, evaluated over the inputs' dimensions."""
    try:
        return dims.value(val)
    except Exception as e:  # jax's InconclusiveDimensionOperation, or a size from tensor values
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SymbolicShapeError(
            f"{describe_node(node)} computes {val.node.expr} on symbolic sizes, which cannot be "
            f"evaluated for every size ({first}); give the Dim a range (min=/max=) in which it "
            "is decided, or export this dimension static."
        ) from e


def _python_node(node: torch.fx.Node, target: Any, args: Any, kwargs: Any, val: Any, dims: Dims) -> Any:
    """A graph node that calls a Python function (`operator.mul`, `torch.sym_not`), not an ATen op.

    Arithmetic on the sizes of symbolic input axes follows the inputs' dimensions
    (dynamic_shapes); arithmetic on a value read from a tensor feeds a run-time
    assertion (bridge/specialise.py) and is computed on JAX scalars.
    """
    if is_symbolic(val) and dims.binds(val):
        return _size_arithmetic(node, val, dims)
    if target in SYM_FUNCTIONS:
        return SYM_FUNCTIONS[target](*args, **kwargs)
    if is_symbolic(val):
        return _size_arithmetic(node, val, dims)  # raises, naming what it cannot follow
    raise UnsupportedOpsError(
        f"graph node {describe_node(node)} is not an ATen op ({type(target).__name__}); "
        "bridge cannot translate it. Use mode='callback'."
    )


def run(
    program: torch.export.ExportedProgram,
    inputs: Sequence[Any],
    rng: jax.Array | None,
    fallback: Callable[[torch.fx.Node], Callable] | None,
    checks: list[Check] | None = None,
) -> list[Any]:
    """Evaluate `program`'s graph on JAX values, one per placeholder.

    Run-time conditions the lowerings record (`ctx.require`) are appended to
    `checks` (None: no checks).

    Effect tokens (graph inputs and outputs of kind TOKEN, which torch.export
    threads through ops with side effects, e.g. `_linalg_check_errors`) take no
    input: each token placeholder gets a stand-in, `with_effects(token, op, *args)`
    runs `op`'s lowering and passes the token on, and token outputs are dropped.
    `capture` leaves tokens out of its input and output lists the same way.
    """
    graph_module = program.graph_module
    signature = program.graph_signature
    token_inputs = {s.arg.name for s in signature.input_specs if s.kind == InputKind.TOKEN}
    token_outputs = [s.kind == OutputKind.TOKEN for s in signature.output_specs]
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(inputs)
    dims = Dims()  # torch's size symbols -> the inputs' (possibly symbolic) JAX dimensions
    # bridge/layout.py: convolutional regions run channels-last where the backend is faster so.
    channels_last = layout.enabled()
    for index, node in enumerate(graph_module.graph.nodes):
        if node.op == "placeholder":
            env[node] = _token(node) if node.name in token_inputs else next(placeholders)
            dims.bind(node.meta.get("val"), env[node], f"input {node.name}")
        elif node.op == "call_function":
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            target = node.target
            if target is operator.getitem:
                env[node] = args[0][args[1]]
                continue
            val = node.meta.get("val")
            effect_token = None
            if target is _with_effects:
                effect_token, target, *args = args
                val = _effect_outputs(target, val)
            if not isinstance(target, torch._ops.OpOverload):
                env[node] = _python_node(node, target, args, kwargs, val, dims)
                continue
            lower = layout.rule(target, args, kwargs) if channels_last else None
            if lower is None:
                if channels_last:
                    args, kwargs = layout.torch_layout(args), layout.torch_layout(kwargs)
                lower = LOWERINGS.get(target)
            if lower is None:
                if fallback is None:
                    raise unsupported_error([node])
                lower = fallback(node)
            ctx = LoweringContext(node, val, rng, index, checks, dims.size)
            with jax.named_scope(node_scope(node)):
                out = _lower(node, lower, ctx, args, kwargs, fallback, checks, dims)
            _check(node, out, val, dims)
            if node.target is _with_effects:
                out = (effect_token, *out) if isinstance(out, (tuple, list)) else (effect_token, out)
            env[node] = out
        elif node.op == "output":
            outs = layout.torch_layout(list(map_arg(node.args[0], env.__getitem__)))
            if len(token_outputs) == len(outs):
                outs = [v for v, token in zip(outs, token_outputs, strict=True) if not token]
            return outs
        else:
            raise UnsupportedOpsError(f"unsupported graph node kind {node.op!r}: {node.format_node()}")
    raise LoweringError("graph has no output node")
