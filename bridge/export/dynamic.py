"""`export(dynamic_shapes=...)`: torch.export's spec -> symbolic shapes of the flat inputs.

The spec is torch.export's: keyed like the arguments of the module's forward
(a dict by argument name, or a tuple/list over the arguments in order), each
entry mirroring its argument (None for a static value or a tensor with no
symbolic dimension; for a tensor, `{axis: dim}` or a tuple with one entry per
axis). A dim is a `torch.export.Dim("batch", min=, max=)`, `Dim.AUTO` /
`Dim.DYNAMIC`, or a plain string (a name, like `Dim(name)`); None and
`Dim.STATIC` keep the axis static.

`symbolic_inputs` turns it into one shape per flat input leaf, with
`jax.export.symbolic_shape` dimensions (one JAX symbol per torch Dim name, its
range as JAX constraints), and the `SymbolicDim`s (example size and range)
that `bridge.capture` needs to capture those dimensions symbolic with
torch.export. Axes named by the same Dim are one symbol, so the program
requires them to be equal. `Dim.AUTO` and `Dim.DYNAMIC` axes get a symbol
named after the input and axis (`input_ids_1`), shared, as torch's duck
sizing does, by automatic axes whose example sizes are equal; unlike in
torch.export they are never specialised silently: if the model needs a
static size there, the export fails and says which.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import torch
from torch.export.dynamic_shapes import Dim

from bridge.capture import SymbolicDim

__all__ = ["symbolic_inputs"]

_AUTO = (Dim.AUTO, Dim.DYNAMIC)


def symbolic_inputs(
    module_or_fn: Any, args: tuple, kwargs: dict, spec: Any, leaves: list[torch.Tensor], names: list[str]
) -> tuple[list[tuple], dict[str, SymbolicDim]]:
    """Per flat input leaf (`leaves`, named `names`) its shape with symbolic dimensions, and
    the symbolic dimensions by name."""
    axes: dict[int, dict[int, Any]] = {}  # id(tensor) -> {axis: dim spec}
    for name, value, sub in _arguments(module_or_fn, args, kwargs, spec):
        _walk(value, sub, axes, name)
    named: dict[str, SymbolicDim] = {}
    auto: dict[int, str] = {}  # example size -> the symbol of automatic axes of that size
    shapes: list[list] = []
    for leaf, leaf_name in zip(leaves, names, strict=True):
        shape: list = list(leaf.shape)
        for axis, dim in sorted(axes.get(id(leaf), {}).items()):
            size = int(leaf.shape[axis])
            where = f"dimension {axis} of input {leaf_name}"
            if any(dim is a for a in _AUTO):
                symbol = auto.setdefault(size, f"{leaf_name}_{axis}")
                new = SymbolicDim(symbol, size, 0, None)
            else:
                lo, hi = getattr(dim, "min", None), getattr(dim, "max", None)
                new = SymbolicDim(_name(dim), size, _bound(lo, 0), _bound(hi, None))
            old = named.setdefault(new.name, new)
            if old.example != size:
                raise ValueError(
                    f"dynamic_shapes: {where} is the symbolic dimension {new.name!r}, of size {size} "
                    f"in the example inputs, but another axis of that dimension has size {old.example}. "
                    "Axes named by one Dim must have equal sizes; use another Dim for one of them."
                )
            if size < 2:
                raise ValueError(
                    f"dynamic_shapes: {where} ({new.name!r}) has size {size} in the example inputs; "
                    "torch.export specialises sizes 0 and 1, so a symbolic dimension needs an "
                    "example of size 2 or more."
                )
            if (new.min is not None and size < new.min) or (new.max is not None and size > new.max):
                raise ValueError(
                    f"dynamic_shapes: {where} ({new.name!r}) has size {size} in the example inputs, "
                    f"outside its range [{new.min}, {new.max}]."
                )
            shape[axis] = new.name
        shapes.append(shape)
    scope = jax.export.SymbolicScope(_constraints(named.values()))
    symbolic = []
    for shape in shapes:
        if all(isinstance(d, int) for d in shape):
            symbolic.append(tuple(shape))
        else:
            text = ", ".join(str(d) for d in shape)
            symbolic.append(tuple(jax.export.symbolic_shape(text, scope=scope)) if shape else ())
    return symbolic, named


def _constraints(dims: Any) -> list[str]:
    out = []
    for d in dims:
        if d.min is not None and d.min > 1:  # JAX's dimension variables are >= 1 already
            out.append(f"{d.name} >= {d.min}")
        if d.max is not None:
            out.append(f"{d.name} <= {d.max}")
    return out


def _bound(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) else default  # torch's int_oo: unbounded


def _name(dim: Any) -> str:
    if isinstance(dim, str):
        name = dim
    elif isinstance(dim, Dim) and type(dim) is Dim:
        name = dim.__name__
    elif isinstance(dim, Dim):
        raise NotImplementedError(
            f"dynamic_shapes: the derived dimension {dim.__name__} (an expression of another Dim, "
            "such as 2 * batch) is not supported by bridge.export; use a Dim of its own"
        )
    else:
        raise TypeError(
            f"dynamic_shapes: {dim!r} is not a dimension spec; use torch.export.Dim('name', "
            "min=..., max=...), Dim.AUTO, Dim.DYNAMIC, a name (str), or None / Dim.STATIC for static"
        )
    if not name.isidentifier():
        raise ValueError(f"dynamic_shapes: the dimension name {name!r} must be a Python identifier")
    return name


def _arguments(module_or_fn: Any, args: tuple, kwargs: dict, spec: Any) -> list[tuple[str, Any, Any]]:
    """(argument name, example value, its spec) for every argument the spec covers."""
    fn = module_or_fn.forward if isinstance(module_or_fn, torch.nn.Module) else module_or_fn
    bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(bound))
        if unknown:
            raise ValueError(
                f"dynamic_shapes names {unknown}, which are not arguments of this call; it is keyed "
                f"like the arguments of forward (here {sorted(bound)}), as in torch.export"
            )
        return [(k, bound[k], spec[k]) for k in bound if k in spec]
    if isinstance(spec, (tuple, list)):
        if len(spec) != len(bound):
            raise ValueError(
                f"dynamic_shapes has {len(spec)} entries for the {len(bound)} arguments of this call "
                f"({', '.join(bound)}); give one per argument (None for static ones), as in torch.export"
            )
        return [(k, v, s) for (k, v), s in zip(bound.items(), spec, strict=True)]
    raise TypeError(
        f"dynamic_shapes must be a dict keyed by argument name or a tuple/list over the arguments, "
        f"as in torch.export; got {type(spec).__name__}"
    )


def _walk(value: Any, spec: Any, axes: dict[int, dict[int, Any]], where: str) -> None:
    if spec is None:
        return
    if isinstance(value, torch.Tensor):
        if isinstance(spec, dict):
            entries = spec.items()
        elif isinstance(spec, (tuple, list)):
            entries = enumerate(spec)
        else:
            raise TypeError(f"dynamic_shapes[{where}] must be a dict {{axis: Dim}} or one entry per axis")
        found = {}
        for axis, dim in entries:
            if not isinstance(axis, int) or not -value.ndim <= axis < value.ndim:
                raise ValueError(f"dynamic_shapes[{where}]: {axis!r} is not an axis of a {value.ndim}-d tensor")
            if dim is not None and dim is not Dim.STATIC:
                found[axis % value.ndim] = dim
        axes[id(value)] = found
    elif isinstance(value, (tuple, list)) and isinstance(spec, (tuple, list)) and len(spec) == len(value):
        for i, (v, s) in enumerate(zip(value, spec, strict=True)):
            _walk(v, s, axes, f"{where}[{i}]")
    elif isinstance(value, dict) and isinstance(spec, dict) and set(spec) <= set(value):
        for k, s in spec.items():
            _walk(value[k], s, axes, f"{where}[{k!r}]")
    else:
        raise ValueError(
            f"dynamic_shapes[{where}] does not match its argument, a {type(value).__name__}: give None "
            "for a static value, {axis: Dim} for a tensor, and the same structure for tuples, lists and dicts"
        )
