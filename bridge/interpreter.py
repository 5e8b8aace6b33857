"""ATen graph -> JAX: walk the graph and call the lowering table.

The interpreter knows nothing about individual ops. For each node it looks
the ATen overload up in `bridge.ops.LOWERINGS`, calls the lowering with JAX
values, and checks the result against torch's recorded output shape and dtype
(`node.meta["val"]`), so a lowering that disagrees with torch fails loudly
instead of returning a silently different answer. Ops with no lowering run
through `bridge.callback` (torch itself behind a JAX primitive) when the
caller allows it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch
from torch.fx.node import map_arg

from bridge import dtypes
from bridge.ops import LOWERINGS
from bridge.ops.registry import LoweringContext


class LoweringError(RuntimeError):
    """A lowering returned something other than what torch computes."""


class UnsupportedOpsError(NotImplementedError):
    """The graph contains ATen ops with no JAX lowering."""


def describe_node(node: torch.fx.Node) -> str:
    """`aten.op.overload` with the module path and source line that made it."""
    where = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = path.removeprefix("L['self'].").removeprefix("m.").removeprefix("L__self___")
        if path and path != "L['self']":
            where.append(f"in module '{path}'")
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines()]
        frames = [ln for ln in lines if ln.startswith("File ")]
        if frames:
            code = lines[-1] if not lines[-1].startswith("File ") else ""
            where.append(f"at {frames[-1]}" + (f": {code}" if code else ""))
    return f"{node.target}" + (f" ({', '.join(where)})" if where else "")


def unsupported_error(nodes: Sequence[torch.fx.Node]) -> UnsupportedOpsError:
    ops = sorted({str(n.target) for n in nodes})
    lines = "\n".join(f"  - {describe_node(n)}" for n in nodes)
    return UnsupportedOpsError(
        f"{len(ops)} ATen op(s) have no JAX lowering: {', '.join(ops)}\n{lines}\n"
        "Convert with bridge.torch_to_jax(..., mode='callback') to run torch itself for the "
        "whole module, or with strict=False to run only these ops through torch callbacks."
    )


def callback_fallback(node: torch.fx.Node) -> Callable:
    """A lowering that runs the node's ATen op in torch, behind a JAX primitive."""
    from bridge.callback import wrap

    run_in_torch = wrap(node.target)

    def lower(ctx: LoweringContext, *args: Any, **kwargs: Any) -> Any:
        return run_in_torch(*args, **kwargs)

    return lower


def _check(node: torch.fx.Node, value: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        shape = tuple(int(s) for s in expected.shape)
        dtype = dtypes.canonical_jax_dtype(expected.dtype)
        got_shape = tuple(np.shape(value))
        got_dtype = np.dtype(getattr(value, "dtype", type(value)))
        if got_shape != shape or got_dtype != dtype:
            raise LoweringError(
                f"the lowering of {node.target} returned {got_dtype}{list(got_shape)}, "
                f"but torch computes {dtype}{list(shape)} for node '{node.name}'. "
                "This is a bug in bridge; please report it."
            )
    elif isinstance(expected, (tuple, list)) and isinstance(value, (tuple, list)):
        for v, e in zip(value, expected, strict=False):
            if e is not None and v is not None:
                _check(node, v, e)


def run(
    program: torch.export.ExportedProgram,
    inputs: Sequence[Any],
    rng: jax.Array | None,
    fallback: Callable[[torch.fx.Node], Callable] | None,
) -> list[Any]:
    """Evaluate `program`'s graph on JAX values, one per placeholder."""
    graph_module = program.graph_module
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(inputs)
    for index, node in enumerate(graph_module.graph.nodes):
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "call_function":
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            target = node.target
            if target is operator.getitem:
                env[node] = args[0][args[1]]
                continue
            if not isinstance(target, torch._ops.OpOverload):
                raise UnsupportedOpsError(
                    f"graph node {describe_node(node)} is not an ATen op ({type(target).__name__}); "
                    "bridge cannot translate it. Use mode='callback'."
                )
            lower = LOWERINGS.get(target)
            if lower is None:
                if fallback is None:
                    raise unsupported_error([node])
                lower = fallback(node)
            ctx = LoweringContext(node, node.meta.get("val"), rng, index)
            out = lower(ctx, *args, **kwargs)
            _check(node, out, node.meta.get("val"))
            env[node] = out
        elif node.op == "output":
            return list(map_arg(node.args[0], env.__getitem__))
        else:
            raise UnsupportedOpsError(f"unsupported graph node kind {node.op!r}: {node.format_node()}")
    raise LoweringError("graph has no output node")
