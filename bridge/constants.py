"""The tensors a captured graph holds as constants, and the ones it must not.

torch.export lifts every tensor the traced code reads that is neither an
input, a parameter nor a buffer (a plain module attribute, a closure
variable) into the program as a constant. For a tensor that is a value, that
is exact. It is not for a tensor the module computed from its own parameters
in an earlier call and kept: a cache such as the attention-bias table timm's
LeViT and EfficientFormer keep after an eval-mode forward. torch's autograd
still reaches the parameters through such a tensor, while the translation
would hold a frozen copy: the parameters' gradients through it would be
silently zero, and new parameter values would not reach it. `check` refuses
those, naming the attribute, the parameters and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from bridge import preserve

__all__ = ["StaleConstantError", "check"]

class StaleConstantError(ValueError):
    """A tensor the module derived from its parameters would become a constant."""


def check(program: ExportedProgram, module: torch.nn.Module, prefix: str = "") -> None:
    """Raise `StaleConstantError` if a constant of `program` was computed from `module`'s parameters.

    `prefix` is what the exported root prepends to `module`'s attribute names.
    """
    params = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    if not params:
        return
    stale: list[tuple[str, set[str], torch.Tensor]] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.CONSTANT_TENSOR:
            continue
        tensor = program.constants.get(spec.target)
        if not isinstance(tensor, torch.Tensor) or tensor.grad_fn is None:
            continue
        reached = _parameters_reached(tensor.grad_fn, params)
        if reached:
            where = next(_attribute_paths(module, tensor), None)
            if where is None:
                name = spec.target[len(prefix) :] if spec.target.startswith(prefix) else spec.target
                where = f"the tensor torch.export calls {name!r}"
            else:
                where = f"attribute {where}"
            stale.append((where, reached, tensor))
    if not stale:
        return
    where, reached, tensor = stale[0]
    others = ""
    if len(stale) > 1:
        listed = ", ".join(w for w, _, _ in stale[1:4]) + (", ..." if len(stale) > 4 else "")
        others = f" So are {len(stale) - 1} more ({listed})."
    raise StaleConstantError(
        f"The module's {where} is a tensor the module computed from its parameter(s) "
        f"{', '.join(repr(r) for r in sorted(reached))} in an earlier call and kept (it has "
        f"autograd history: {type(tensor.grad_fn).__name__}).{others} forward reads it instead "
        "of recomputing it, so the translation would hold it as a constant: gradients would not "
        "reach those parameters through it, and new parameter values would not change it. "
        "Clear the cached tensor before converting (for timm models, model.train() then "
        "model.eval() clears their caches), or compute it under torch.no_grad() if it is "
        "meant to be a constant."
    )


def _parameters_reached(fn: Any, params: dict[int, str]) -> set[str]:
    """The names of the parameters in `params` that the autograd graph from `fn` reaches."""
    reached: set[str] = set()
    seen: set[int] = set()
    stack = [fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None and id(variable) in params:
            reached.add(params[id(variable)])
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return reached


def _attribute_paths(module: torch.nn.Module, tensor: torch.Tensor) -> Iterator[str]:
    """Where `module` (or a submodule) holds `tensor` as a plain attribute, as `a.b['key']`."""
    for name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if not attr.startswith("_"):
                root = f"{name}.{attr}" if name else attr
                yield from (path for path, item in preserve.walk(value, root) if item is tensor)
