"""One wrapped JAX callable (`Spec`) and how torch calls it: the function wrapper.

    tfn = jax_function.torch_function(jax_fn, name, remat_policy=None)

A `Spec` holds everything static about a JAX function that
`bridge.jax_to_torch` wrapped, for a lone function (`torch_function`) or a
module (`jax_module.JaxModule`): the function, the structure of its params
and state, its train flag and PRNG key, and its compiled forms, one
`JaxFunction` per call signature. `call_spec` runs it on torch values:
tensor arguments become JAX arrays, every other argument is a static value
of the jitted function (`bridge.tree.partition`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from bridge.adapters import jax_boundary as boundary
from bridge.adapters.jax_call import run
from bridge.adapters.jax_flat import JaxFunction

from bridge import dtypes
from bridge.dlpack import to_torch
from bridge.tree import STATIC, Partition, partition

__all__ = ["Spec", "SpecHandle", "Tree", "call_spec", "split_args", "torch_function"]


# --------------------------------------------------------------------------
# Arguments: tensors become JAX arrays, everything else is static


def _take(leaf: Any, i: int) -> Any:
    """The tensor an argument leaf is passed as, or STATIC."""
    if isinstance(leaf, torch.Tensor):
        return leaf
    if isinstance(leaf, jax.Array):
        return to_torch(leaf)
    if isinstance(leaf, np.ndarray):
        return _numpy_input(leaf, i)
    return STATIC


def split_args(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Partition]:
    """Tensor leaves of `(args, kwargs)` (JAX and NumPy arrays become tensors) and the rest."""
    if not kwargs and all(type(a) is torch.Tensor for a in args):
        # The common call, module(x, ...): plain tensors, no pytree to walk.
        return list(args), _tensors_only(len(args))
    sig, tensors = partition((args, kwargs), _take, "jax_to_torch")
    return tensors, sig


@functools.cache
def _tensors_only(n: int) -> Partition:
    """What `partition` makes of `n` positional tensors and no keywords (one per arity)."""
    return partition((tuple(range(n)), {}), lambda leaf, i: leaf, "jax_to_torch")[0]


def _numpy_input(a: np.ndarray, i: int) -> torch.Tensor:
    """A NumPy argument as a tensor: shares its memory when torch can view it, else one copy."""
    try:
        dtypes.to_jax_dtype(torch.from_numpy(np.empty(0, a.dtype)).dtype)
    except TypeError:
        raise TypeError(
            f"jax_to_torch: argument leaf #{i} is a NumPy array of dtype {a.dtype}, which "
            "neither torch nor JAX holds as a tensor. Convert it to a numeric dtype first."
        ) from None
    if not a.flags.writeable:  # torch warns on read-only memory; it only reads it here
        a = a.copy()
    try:
        return torch.from_numpy(a)
    except ValueError:  # negative strides: torch cannot view them
        return torch.from_numpy(np.ascontiguousarray(a))


# --------------------------------------------------------------------------
# The wrapped callable


class Tree:
    """A pytree's structure plus which leaves are typed PRNG keys (held as key data)."""

    def __init__(self, tree: Any) -> None:
        leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        self.impls = boundary.key_impls(leaves)

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, boundary.decode(leaves, self.impls))

    def flatten(self, tree: Any, what: str) -> list[Any]:
        try:
            return self.treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{what} has structure {jax.tree_util.tree_structure(tree)}, but the module "
                f"was built with {self.treedef}; apply must return its new state with the "
                "structure of the state passed in."
            ) from e


class Spec:
    """Everything static about one wrapped JAX callable.

    Passed through torch.compile as a constant through its weak `handle`;
    owns one `JaxFunction` per call signature (and mode), and the JAX views
    of its module's tensors.
    """

    def __init__(
        self,
        fn: Callable,
        name: str,
        *,
        params: Tree | None = None,
        state: Tree | None = None,
        train: tuple[str, bool] | None = None,
        rng: str | None = None,
        remat_policy: Callable | None = None,
    ) -> None:
        self.fn, self.name = fn, name
        self.remat_policy = remat_policy
        self.params, self.state = params, state
        self.train, self.rng = train, rng
        self.rng_impl = jax.random.key_impl(jax.random.key(0)) if rng else None
        self._fns: dict[tuple, JaxFunction] = {}
        self.views: boundary.Views = {}
        self.handle = SpecHandle(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def jax_fn(
        self, sig: Partition, training: bool, tensors: Sequence[torch.Tensor]
    ) -> JaxFunction:
        """The JAX function for one call signature (and mode, if `fn` takes one).

        `tensors` are the call's (its shapes give a new function its output structure).
        """
        key = (sig, training and self.train is not None)
        jfn = self._fns.get(key)
        if jfn is None:
            example = boundary.avals(boundary.signature(tensors))
            jfn = self._fns[key] = self._build(sig, training, example)
        return jfn

    def _build(self, sig: Partition, training: bool, example: list) -> JaxFunction:
        n_params = 0 if self.params is None else len(self.params.impls)
        n_state = 0 if self.state is None else len(self.state.impls)
        n_rng = 0 if self.rng is None else 1

        def flat(*xs: Any) -> tuple[Any, list[Any]]:
            lead = []
            if self.params is not None:
                lead.append(self.params.unflatten(xs[:n_params]))
            if self.state is not None:
                lead.append(self.state.unflatten(xs[n_params : n_params + n_state]))
            args, kwargs = sig.fill(xs[n_params + n_state + n_rng :])
            kwargs = dict(kwargs)
            if self.train is not None:
                name, invert = self.train
                kwargs.setdefault(name, training != invert)
            new_key = []
            if self.rng is not None:
                key = jax.random.wrap_key_data(xs[n_params + n_state], impl=self.rng_impl)
                key, use = jax.random.split(key)
                kwargs.setdefault(self.rng, use)
                new_key = [jax.random.key_data(key)]
            out = self.fn(*lead, *args, **kwargs)
            new_state = []
            if self.state is not None:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"{self.name} was given a state, so it must return (output, new_state); "
                        f"it returned a {type(out).__name__}."
                    )
                out, new = out
                new_state = self.state.flatten(new, f"the new state returned by {self.name}")
            aux = [*[boundary.encode(x) for x in new_state], *new_key]
            return jax.tree_util.tree_map(boundary.encode, out), aux

        return JaxFunction(
            flat, self.name, example, remat_policy=self.remat_policy, views=self.views
        )


class SpecHandle:
    """A weak reference to a `Spec`: what torch.compile sees of it.

    torch.compile keeps the constants of a compiled graph for as long as it
    keeps the graph (dynamo stores compiled functions in this module's
    globals, past the module they were compiled for); a strong reference there
    would keep the user's JAX function, and whatever it closes over, alive.
    """

    __slots__ = ("_ref", "__weakref__")

    def __init__(self, spec: Spec) -> None:
        self._ref = weakref.ref(spec)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def spec(self) -> Spec:
        spec = self._ref()
        if spec is None:
            raise RuntimeError(
                "bridge.jax_to_torch: this compiled graph calls a module (or torch function) "
                "that was deleted. Keep the module alive as long as graphs compiled from it run."
            )
        return spec


torch_pytree.register_constant(SpecHandle)


@torch._dynamo.nonstrict_trace
def call_spec(
    handle: SpecHandle,
    training: bool,
    params: list[torch.Tensor],
    state: list[torch.Tensor],
    args: tuple,
    kwargs: dict,
) -> tuple[Any, list[torch.Tensor]]:
    """Run `spec` on torch values; returns (output pytree, new state tensors).

    torch.compile does not trace into this function (JAX is opaque to it);
    its tracer runs it on fake tensors, where `run` records the custom op.
    """
    tensors, sig = split_args(args, kwargs)
    inputs = [*params, *state, *tensors]
    jfn = handle.spec().jax_fn(sig, training, inputs)
    outs = run(jfn, inputs)
    n = jfn.n_primary
    return jax.tree_util.tree_unflatten(jfn.out_def, outs[:n]), outs[n:]


def torch_function(fn: Callable, name: str, remat_policy: Callable | None = None) -> Callable:
    """A torch function of tensors (and pytrees of them) that runs JAX function `fn`."""
    spec = Spec(fn, name, remat_policy=remat_policy)

    @functools.wraps(fn)
    def torch_fn(*args: Any, **kwargs: Any) -> Any:
        return call_spec(spec.handle, False, [], [], args, kwargs)[0]

    return torch_fn
