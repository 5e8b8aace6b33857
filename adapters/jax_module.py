"""A JAX function and its parameters as a torch `nn.Module`: the module wrapper.

`JaxModule` holds the params (and state) pytree as `nn.Parameter`s (and
buffers) named after their pytree paths, sharing memory with the arrays it
was built from, and runs its `Spec` (jax_function.py) on them. It also owns
the rules for the mode keyword and the PRNG key a module passes its
function (`train_spec`, `rng_keyword`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch
from bridge.adapters.jax_boundary import differentiable, encode, remember_view
from bridge.adapters.jax_function import Spec, call_spec
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey
from torch import nn

from bridge.dlpack import to_jax, to_torch

__all__ = ["JaxModule", "keywords", "path_parts", "rng_keyword", "train_spec"]


def path_parts(path: tuple) -> list[str]:
    parts: list[str] = []
    for k in path:
        if isinstance(k, DictKey):
            parts.extend(str(k.key).split("."))
        elif isinstance(k, SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k).strip(".[]'\""))
    return parts


class _Params(nn.Module):
    """A container that names parameters and buffers after their pytree path.

    Entries are attributes (`m.layers`) and items (`m.layers[0]`, for keys
    that are not identifiers).
    """

    def __getitem__(self, key: str | int) -> Any:
        name = str(key)
        for table in (self._modules, self._parameters, self._buffers):
            if name in table:
                return table[name]
        raise KeyError(
            f"{name!r} (entries: {sorted([*self._modules, *self._parameters, *self._buffers])})"
        )

    def extra_repr(self) -> str:
        rows = [*self._parameters.items(), *self._buffers.items()]
        return "\n".join(f"{n}: {str(t.dtype)[6:]}{list(t.shape)}" for n, t in rows)


def _tensor_leaf(x: Any, where: str) -> tuple[torch.Tensor, jax.Array | None]:
    """A torch tensor sharing `x`'s memory, and the JAX array it came from."""
    if isinstance(x, torch.Tensor):
        return x.detach(), None
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), None
    if isinstance(x, jax.Array):
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"jax_to_torch got a traced JAX value at {where}; build the module outside "
                "jax.jit / grad / vmap, from concrete arrays."
            )
        x = encode(x)  # a typed PRNG key is held as its key data
        return to_torch(x), x
    raise TypeError(
        f"jax_to_torch: the leaf at {where} is a {type(x).__name__}; parameters and state "
        "must be arrays (jax.Array, numpy.ndarray or torch.Tensor). Wrap numbers with "
        "jnp.asarray, or pass non-array settings to apply through a closure."
    )


class JaxModule(_Params):
    """A JAX function and its parameters as a torch `nn.Module`.

    Build it with `bridge.jax_to_torch(apply, params)`. Parameters (and
    buffers, for state) are named after their pytree path, so `state_dict()`
    reads like the params tree and round-trips through `load_state_dict`.
    """

    def __init__(
        self,
        spec: Spec,
        params: Any,
        state: Any = None,
        *,
        seed: int | None = None,
        name_of: Callable[[tuple], list[str]] = path_parts,
    ) -> None:
        super().__init__()
        self._spec = spec
        self._param_slots: list[tuple[nn.Module, str]] = []
        self._buffer_slots: list[tuple[nn.Module, str]] = []
        made: dict[int, torch.Tensor] = {}  # a tied (repeated) array is one tensor
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            parts = name_of(path)
            where = ".".join(parts) or "the root of params"
            if id(leaf) not in made:
                t, a = _tensor_leaf(leaf, where)
                p = nn.Parameter(t, requires_grad=differentiable(t))
                remember_view(spec.views, p, to_jax(p) if a is None else a)
                made[id(leaf)] = p
            self._param_slots.append(self._register(parts, made[id(leaf)], "_parameters"))
        leaves = jax.tree_util.tree_flatten_with_path(state)[0] if state is not None else []
        for path, leaf in leaves:
            parts = name_of(path)
            t, a = _tensor_leaf(leaf, ".".join(parts) or "the root of state")
            remember_view(spec.views, t, to_jax(t) if a is None else a)
            self._buffer_slots.append(self._register(parts, t, "_buffers"))
        if spec.rng is not None:
            key = jax.random.key_data(jax.random.key(seed or 0, impl=spec.rng_impl))
            t = to_torch(key)
            remember_view(spec.views, t, key)
            self._buffer_slots.append(self._register(["rng_key"], t, "_buffers"))

    def _register(self, parts: list[str], t: torch.Tensor, kind: str) -> tuple[nn.Module, str]:
        name = ".".join(parts)
        if not parts or any(not p for p in parts):
            raise ValueError(
                f"jax_to_torch cannot name the leaf at path {name!r}: every key on a path "
                "must be a non-empty string or an index."
            )
        owner: nn.Module = self
        for i, part in enumerate(parts[:-1]):
            child = owner._modules.get(part)
            if child is None:
                if part in owner._parameters or part in owner._buffers:
                    raise ValueError(
                        f"jax_to_torch: {'.'.join(parts[: i + 1])!r} is both a leaf and a subtree."
                    )
                child = owner._modules[part] = _Params()
            owner = child
        last = parts[-1]
        if last in owner._parameters or last in owner._buffers or last in owner._modules:
            raise ValueError(
                f"jax_to_torch: two leaves are both named {name!r} (keys containing '.' are "
                "split into nested names). Rename one of them."
            )
        getattr(owner, kind)[last] = t
        return owner, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the JAX function on torch tensors (and pytrees of them).

        Returns:
            The JAX function's output with torch tensors in place of arrays.
        """
        params = [owner._parameters[name] for owner, name in self._param_slots]
        state = [owner._buffers[name] for owner, name in self._buffer_slots]
        compiling = torch.compiler.is_compiling()
        if compiling:
            # Compiled graphs update buffers in place; the call keeps the old values.
            state_in = [buf.clone() for buf in state]
        else:
            state_in = state
        out, new_state = call_spec(self._spec.handle, self.training, params, state_in, args, kwargs)
        if compiling:
            with torch.no_grad():
                for buf, new in zip(state, new_state, strict=True):
                    buf.copy_(new)
        else:
            # The new state replaces the old (no copy, and the arrays the module was
            # built from, or a pending backward, keep their values).
            for (owner, name), new in zip(self._buffer_slots, new_state, strict=True):
                owner._buffers[name] = new
        return out

    def jax_params(self) -> Any:
        """The current parameters as the original JAX pytree, sharing memory.

        Returns:
            The params pytree the module was built from, with the module's
            current values (typed PRNG keys included).
        """
        tree = self._spec.params
        return tree.unflatten([to_jax(o._parameters[n]) for o, n in self._param_slots])

    def jax_state(self) -> Any:
        """The current state as the original JAX pytree (None without state).

        Returns:
            The state pytree the module was built from, with the module's
            current buffer values.
        """
        if self._spec.state is None:
            return None
        n = len(self._spec.state.impls)
        return self._spec.state.unflatten(
            [to_jax(o._buffers[name]) for o, name in self._buffer_slots[:n]]
        )

    def extra_repr(self) -> str:
        return "\n".join([f"apply={self._spec.name}", super().extra_repr()]).strip()


# --------------------------------------------------------------------------
# Modes: the train flag and the PRNG key

# Keyword names read as "the module is training", and whether they mean the
# opposite (deterministic=True is eval mode).
_TRAIN_NAMES = {
    "train": False,
    "training": False,
    "is_training": False,
    "deterministic": True,
    "use_running_average": True,
}
_RNG_NAMES = ("rng", "key", "prng_key")


def keywords(fn: Callable) -> tuple[set[str], bool]:
    """Names `fn` accepts by keyword, and whether it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _resolve(
    arg: str | None, names: set[str], var_kw: bool, known: Sequence[str], what: str, fn_name: str
) -> str | None:
    if arg is None:
        return None
    if arg == "auto":
        return next((n for n in known if n in names), None)
    if arg not in names and not var_kw:
        raise ValueError(
            f"jax_to_torch: {what}={arg!r}, but {fn_name} takes no keyword argument {arg!r} "
            f"(it takes {sorted(names)}). Name one of its arguments, or pass {what}=None."
        )
    return arg


def train_spec(
    arg: str | None, names: set[str], var_kw: bool, fn_name: str
) -> tuple[str, bool] | None:
    """The keyword through which the module passes its mode, and whether it is inverted."""
    name = _resolve(arg, names, var_kw, list(_TRAIN_NAMES), "train_arg", fn_name)
    return None if name is None else (name, _TRAIN_NAMES.get(name, False))


def rng_keyword(arg: str | None, names: set[str], var_kw: bool, fn_name: str) -> str | None:
    """The keyword through which the module passes its PRNG key (None: none)."""
    return _resolve(arg, names, var_kw, _RNG_NAMES, "rng_arg", fn_name)
