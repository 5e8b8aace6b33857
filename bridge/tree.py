"""Pytrees on both sides of the boundary, and call arguments split for caching.

`map_tree` walks any nesting of dicts, lists, tuples, namedtuples,
dataclasses (transformers' `ModelOutput` included) and types registered with
torch's or JAX's pytree registries, keeping every container's type; it is the
walker behind `to_jax` / `to_torch` and the adapters.

`partition` splits a call's arguments into array leaves and hashable static
values, the signature every cached wrapper (`callback.wrap`, `jax_to_torch`,
`xla_call`) keys its traces by; it owns the one error for an argument that is
neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import torch.utils._pytree as torch_pytree

__all__ = [
    "ARRAY",
    "STATIC",
    "Partition",
    "TorchNode",
    "map_tree",
    "partition",
    "register_jax_pytree",
]


def _is_model_output(obj: Any) -> bool:
    # transformers' ModelOutput: a dataclass that is also an OrderedDict whose
    # keys are the fields that are not None.
    return dataclasses.is_dataclass(obj) and isinstance(obj, dict)


def _rebuild_dataclass(obj: Any, fn: Callable[[Any], Any]) -> Any:
    if _is_model_output(obj):
        return type(obj)(**{k: fn(v) for k, v in obj.items()})
    fields = dataclasses.fields(obj)
    new = type(obj).__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    for f in fields:
        object.__setattr__(new, f.name, fn(getattr(obj, f.name)))
    return new


class TorchNode:
    """A torch-only pytree node (e.g. transformers' `DynamicCache`) carried through JAX.

    `to_jax` turns any type registered with torch's pytree registry (and not
    a plain container or dataclass) into a `TorchNode` holding its leaves as
    JAX arrays; it is a JAX pytree, so it can be returned from `jax.jit` and
    passed back into a converted function, where it becomes the torch object
    again. `to_torch` rebuilds the torch object.
    """

    __slots__ = ("node_type", "context", "children")

    def __init__(self, node_type: type, context: Any, children: list) -> None:
        self.node_type = node_type
        self.context = context
        self.children = list(children)

    def __repr__(self) -> str:
        return f"TorchNode({self.node_type.__name__}, {len(self.children)} children)"

    def to_torch_object(self, children: list) -> Any:
        return torch_pytree.SUPPORTED_NODES[self.node_type].unflatten_fn(children, self.context)


class _NodeAux:
    """Hashable stand-in for a torch pytree context (often lists)."""

    __slots__ = ("node_type", "context", "_key")

    def __init__(self, node_type: type, context: Any) -> None:
        self.node_type = node_type
        self.context = context
        self._key = (node_type, repr(context))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NodeAux) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)


jax.tree_util.register_pytree_node(
    TorchNode,
    lambda n: (n.children, _NodeAux(n.node_type, n.context)),
    lambda aux, children: TorchNode(aux.node_type, aux.context, children),
)


_JAX_REGISTERED: set[type] = set()


def register_jax_pytree(cls: type) -> None:
    """Register a dataclass-like output type (e.g. `ModelOutput`) with JAX.

    Converted outputs keep their type, so they must be JAX pytrees to be
    returned from `jax.jit`. Registration is idempotent.
    """
    if cls in _JAX_REGISTERED:
        return
    if issubclass(cls, dict):

        def flatten(obj):
            keys = tuple(obj.keys())
            return [(jax.tree_util.DictKey(k), obj[k]) for k in keys], keys

        def unflatten(keys, children):
            return cls(**dict(zip(keys, children, strict=True)))

    else:
        names = tuple(f.name for f in dataclasses.fields(cls))

        def flatten(obj):
            return [(jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in names], None

        def unflatten(_, children):
            new = cls.__new__(cls)
            for n, c in zip(names, children, strict=True):
                object.__setattr__(new, n, c)
            return new

    try:
        jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
    except ValueError:  # registered elsewhere already (e.g. by the user)
        pass
    _JAX_REGISTERED.add(cls)


def map_tree(
    tree: Any, leaf: Callable[[Any], Any], is_leaf: Callable[[Any], bool], registry: str
) -> Any:
    """Map `leaf` over `tree`, keeping every container's type."""

    def rec(x: Any) -> Any:
        if is_leaf(x):
            return leaf(x)
        if isinstance(x, TorchNode):
            children = [rec(c) for c in x.children]
            return (
                x.to_torch_object(children)
                if registry == "torch"
                else TorchNode(x.node_type, x.context, children)
            )
        if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
            return x
        if isinstance(x, tuple):
            items = [rec(v) for v in x]
            if hasattr(x, "_fields"):
                return type(x)._make(items)
            # torch.return_types.* are structseqs, which JAX does not know.
            return tuple(items) if registry == "jax" or type(x) is tuple else type(x)(items)
        if isinstance(x, list):
            return type(x)(rec(v) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            new = _rebuild_dataclass(x, rec)
            if registry == "jax":
                register_jax_pytree(type(x))
            return new
        if isinstance(x, dict):
            items = {k: rec(v) for k, v in x.items()}
            return items if type(x) is dict else type(x)(items)
        if isinstance(x, (set, frozenset)):
            if any(rec(v) is not v for v in x):
                what = "JAX array" if registry == "torch" else "torch tensor"
                name = "to_torch" if registry == "torch" else "to_jax"
                raise TypeError(
                    f"{name} got a {type(x).__name__} holding a {what}; a set has no order, "
                    "so it cannot be a pytree and its leaves cannot be matched up after "
                    "conversion. Use a list or a tuple (or a dict keyed by name)."
                )
            return x
        if registry == "jax" and type(x) in torch_pytree.SUPPORTED_NODES:
            children, context = torch_pytree.SUPPORTED_NODES[type(x)].flatten_fn(x)
            return TorchNode(type(x), context, [rec(c) for c in children])
        if registry == "torch":
            children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
            if treedef.num_nodes > 1:
                return jax.tree_util.tree_unflatten(treedef, [rec(c) for c in children])
        return x

    return rec(tree)


# --------------------------------------------------------------------------
# Call arguments: array leaves and hashable static values

ARRAY = object()  # marks an array slot in a Partition
STATIC = object()  # returned by a `take` function for a leaf that is a static value


class Partition(NamedTuple):
    """A call's structure with its static values: hashable, a cache key as it is."""

    treedef: Any
    slots: tuple  # per leaf: ARRAY, or (type(value), value) (the type keeps 1, 1.0, True apart)

    def fill(self, arrays: Sequence[Any]) -> Any:
        """The call's pytree with `arrays` in the array slots, in order."""
        it = iter(arrays)
        leaves = [next(it) if s is ARRAY else s[1] for s in self.slots]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    @property
    def mask(self) -> tuple[bool, ...]:
        return tuple(s is ARRAY for s in self.slots)


def partition(
    tree: Any, take: Callable[[Any, int], Any], who: str, *, array: str = "an array"
) -> tuple[Partition, list[Any]]:
    """Split the leaves of `tree` (JAX's pytree registry) into arrays and static values.

    `take(leaf, i)` returns the value to pass for an array leaf (converted as
    the caller needs), `STATIC` for a leaf that is a static value, or raises
    `TypeError` for a leaf of the wrong kind. Static values become part of the
    cache key, so they must be hashable; `who` names the caller and `array`
    what it takes as arrays ("an XLA tensor") in the error.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays: list[Any] = []
    slots: list[Any] = []
    for i, leaf in enumerate(leaves):
        value = take(leaf, i)
        if value is not STATIC:
            arrays.append(value)
            slots.append(ARRAY)
            continue
        try:
            hash(leaf)
        except TypeError:
            raise TypeError(
                f"{who}: argument leaf #{i} is a {type(leaf).__name__}, which is neither "
                f"{array} nor a hashable constant. Non-array arguments are static values (part "
                "of the cache key) and must be hashable: pass a tuple instead of a list or "
                "dict, or close over the value in the function."
            ) from None
        slots.append((type(leaf), leaf))
    return Partition(treedef, tuple(slots)), arrays
