"""A converted module as one flat JAX function: the program every export format writes.

`build` converts the module (or function) with the public adapters, exactly as
`torch_to_jax_with_state` / `torch_to_jax` do for users, with `strict=True` (an op
with no lowering would be a host callback, which cannot be serialised) and
`checks=False` (run-time checks are host callbacks too; see docs/export.md). It
then fixes one flat calling convention, shared by every format and by the
runtime copied into model.py (bridge/export/runtime.py):

    flat(*params, *state, [rng key data], *input leaves) -> (*output leaves, *updated buffers)

and describes the structures around it as JSON-able trees: ["array", i],
["static", value], ["tuple"|"list", [children]], ["dict", [[key, child], ...]].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch

from bridge.capture import CaptureError

_STATIC = (type(None), bool, int, float, str)


@dataclasses.dataclass
class FlatProgram:
    fn: Callable  # (*flat) -> tuple of arrays
    example: tuple  # jax.ShapeDtypeStruct per flat input
    arg_names: list[str]  # a Python identifier per flat input
    params: list  # [name, shape, dtype] in named_parameters() order
    state: list  # [name, shape, dtype] in named_buffers() order
    rng: str | None  # the key implementation the program takes the data of; None: no key
    inputs: dict  # {"tree": ..., "leaves": [[shape, dtype], ...]}; a symbolic dimension is its name
    outputs: dict  # the same for the outputs
    state_updates: list[str]  # buffers the forward updates, in the order they follow the outputs
    param_tensors: dict[str, torch.Tensor]
    state_tensors: dict[str, torch.Tensor]
    comments: dict[str, str]  # graph node name -> the torch source line that made it
    dims: dict[str, list]  # symbolic dimension name -> [min, max] (None: unbounded)


def build(module_or_fn: Any, args: tuple, kwargs: dict, dynamic_shapes: Any = None) -> FlatProgram:
    """Convert `module_or_fn` once and trace it at the example inputs (a torch capture, cached).

    With `dynamic_shapes` (torch.export's spec, see bridge/export/dynamic.py) the inputs it
    names are traced with symbolic dimensions, and torch captures them symbolic too.
    """
    import bridge  # at call time: bridge/__init__.py imports this package

    if isinstance(module_or_fn, torch.nn.Module):
        apply, params, state = bridge.torch_to_jax_with_state(module_or_fn, strict=True, checks=False)
        converted = apply.converted
        param_tensors = dict(module_or_fn.named_parameters())
        state_tensors = dict(module_or_fn.named_buffers())
    elif callable(module_or_fn):
        fn = bridge.torch_to_jax(module_or_fn, strict=True, checks=False)
        converted = fn.converted

        def apply(p, s, *a, rng=None, **k):
            return fn(*a, rng=rng, **k), s

        params, state, param_tensors, state_tensors = {}, {}, {}, {}
    else:
        raise TypeError(f"export takes an nn.Module or a function of torch tensors, got {type(module_or_fn).__name__}")

    example_inputs = bridge.to_jax((list(args), dict(kwargs)))
    in_leaves: list = []
    in_tree = _describe_inputs(example_inputs, in_leaves, "inputs")
    in_names = _input_names(in_tree)
    in_shapes = [tuple(x.shape) for x in in_leaves]
    dims: dict = {}
    if dynamic_shapes is not None:
        from bridge.export.dynamic import symbolic_inputs

        torch_leaves: list = []
        _describe_inputs((list(args), dict(kwargs)), torch_leaves, "inputs", torch.Tensor)
        in_shapes, dims = symbolic_inputs(module_or_fn, args, kwargs, dynamic_shapes, torch_leaves, in_names)
        converted.dims.update(dims)
    pnames, snames = list(params), list(state)
    traced: dict[str, Any] = {}

    def make(rng_impl: str | None) -> Callable:
        def flat_fn(*flat):
            p = dict(zip(pnames, flat[: len(pnames)], strict=True))
            rest = flat[len(pnames):]
            s = dict(zip(snames, rest[: len(snames)], strict=True))
            rest = rest[len(snames):]
            key = None
            if rng_impl is not None:
                key, rest = jax.random.wrap_key_data(rest[0], impl=rng_impl), rest[1:]
            a, k = _rebuild(in_tree, list(rest))
            out, new_state = apply(p, s, *a, rng=key, **k)
            out_leaves: list = []
            traced["tree"] = _describe_outputs(out, out_leaves)
            traced["out"] = [[_shape_json(x.shape), np.dtype(x.dtype).name] for x in out_leaves]
            updates = traced["updates"] = [n for n in snames if new_state[n] is not s[n]]
            return (*out_leaves, *(new_state[n] for n in updates))

        return flat_fn

    base = [_sds(params[n]) for n in pnames] + [_sds(state[n]) for n in snames]
    leaves_sds = [jax.ShapeDtypeStruct(s, x.dtype) for s, x in zip(in_shapes, in_leaves, strict=True)]
    rng_impl = None
    try:
        jax.eval_shape(make(None), *base, *leaves_sds)
    except Exception as e:
        if dims and "Constraints violated" in str(e):  # torch.export's refusal of a Dim
            where = ", ".join(f"L['tensors'][{i}] is input {n}" for i, n in enumerate(in_names))
            raise CaptureError(f"{e}\nIn torch's message, {where}.") from e
        if not _missing_key(e):
            raise
        rng_impl = str(jax.random.key_impl(jax.random.key(0)))
    rng_sds = []
    if rng_impl is not None:
        rng_sds = [_sds(jax.random.key_data(jax.random.key(0, impl=rng_impl)))]
        jax.eval_shape(make(rng_impl), *base, *rng_sds, *leaves_sds)

    names = [_identifier("p_" + n) for n in pnames] + [_identifier("s_" + n) for n in snames]
    names += ["rng"] * len(rng_sds) + in_names
    return FlatProgram(
        fn=make(rng_impl),
        example=(*base, *rng_sds, *leaves_sds),
        arg_names=_unique(names),
        params=[[n, list(params[n].shape), np.dtype(params[n].dtype).name] for n in pnames],
        state=[[n, list(state[n].shape), np.dtype(state[n].dtype).name] for n in snames],
        rng=rng_impl,
        inputs={"tree": in_tree, "leaves": [[_shape_json(s), np.dtype(x.dtype).name]
                                            for s, x in zip(in_shapes, in_leaves, strict=True)]},
        outputs={"tree": traced["tree"], "leaves": traced["out"]},
        state_updates=traced["updates"],
        param_tensors=param_tensors,
        state_tensors=state_tensors,
        comments=_source_lines(converted),
        dims={d.name: [d.min, d.max] for d in dims.values()},
    )


def _shape_json(shape: tuple) -> list:
    """A shape for export.json: ints, and symbolic dimensions as text (`batch`)."""
    return [d if isinstance(d, int) else str(d) for d in shape]


def _source_lines(converted: Any) -> dict[str, str]:
    """Graph node name -> torch source line, from the captures behind a converted `apply`."""
    from bridge.interpreter import source_line

    lines = {}
    for captured in converted.captures.values():
        for node in captured.program.graph.nodes:
            line = source_line(node)
            if line is not None:
                lines[node.name] = line
    return lines


def _missing_key(e: BaseException) -> bool:
    from bridge.adapters.torch_to_jax import MissingKeyError

    while e is not None:
        if isinstance(e, MissingKeyError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _sds(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _describe_inputs(x: Any, leaves: list, where: str, array_type: Any = None) -> list:
    if _is_array(x) if array_type is None else isinstance(x, array_type):
        leaves.append(x)
        return ["array", len(leaves) - 1]
    if isinstance(x, _STATIC):
        return ["static", x]
    if isinstance(x, (tuple, list)) and type(x) in (tuple, list):
        return [type(x).__name__, [_describe_inputs(v, leaves, f"{where}[{i}]", array_type) for i, v in enumerate(x)]]
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return ["dict", [[k, _describe_inputs(v, leaves, f"{where}[{k!r}]", array_type)] for k, v in x.items()]]
    raise TypeError(
        f"export: the example input {where} is a {type(x).__name__}; exported models take arrays, "
        "plain tuples, lists and dicts (str keys) of them, and None/bool/int/float/str values, "
        "which are fixed at export."
    )


def _describe_outputs(x: Any, leaves: list) -> list:
    if _is_array(x):
        leaves.append(x)
        return ["array", len(leaves) - 1]
    if isinstance(x, _STATIC):
        return ["static", x]
    if isinstance(x, dict):  # dicts, and transformers' ModelOutput (a dict subclass)
        return ["dict", [[str(k), _describe_outputs(v, leaves)] for k, v in x.items()]]
    if isinstance(x, list):
        return ["list", [_describe_outputs(v, leaves) for v in x]]
    if isinstance(x, tuple):  # tuples and namedtuples
        return ["tuple", [_describe_outputs(v, leaves) for v in x]]
    # any other pytree node (e.g. a transformers cache carried as bridge.tree.TorchNode): its children
    children = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)[0]
    return ["tuple", [_describe_outputs(v, leaves) for v in children]]


def _rebuild(tree: list, leaves: list) -> Any:
    kind = tree[0]
    if kind == "array":
        return leaves[tree[1]]
    if kind == "static":
        return tree[1]
    if kind in ("tuple", "list"):
        items = [_rebuild(sub, leaves) for sub in tree[1]]
        return tuple(items) if kind == "tuple" else items
    return {k: _rebuild(sub, leaves) for k, sub in tree[1]}


def _input_names(tree: list) -> list[str]:
    """A name per input leaf: the keyword (input_ids), or argN for positional arguments."""
    names: list[str] = []

    def walk(node, path):
        if node[0] == "array":
            names.append(_identifier("_".join(path)))
        elif node[0] in ("tuple", "list"):
            for i, sub in enumerate(node[1]):
                walk(sub, [*path, str(i)])
        elif node[0] == "dict":
            for k, sub in node[1]:
                walk(sub, [*path, k])

    args_tree, kwargs_tree = tree[1]
    for i, sub in enumerate(args_tree[1]):
        walk(sub, [f"arg{i}"])
    for k, sub in kwargs_tree[1]:
        walk(sub, [k])
    return names


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return name if name.isidentifier() and not name[0].isdigit() else "v_" + name


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            n = f"{n}_{seen[n]}"
        seen.setdefault(n, 0)
        out.append(n)
    return out
