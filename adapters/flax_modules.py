"""Flax modules as torch modules: `jax_to_torch(nnx_model)`, `jax_to_torch(linen, variables)`.

An nnx model's `nnx.Param`s become parameters and its other variables
(BatchNorm statistics, RNG streams) buffers; its train/eval mode follows
`module.training`. A Linen module's 'params' collection becomes parameters,
the other collections buffers, updated after each call; its RNG streams get
keys split from the module's PRNG key. flax is optional: `flax_kind` says
whether an object is a flax module at all without requiring it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from bridge.adapters.jax_function import Spec, Tree
from bridge.adapters.jax_module import JaxModule, keywords, path_parts, train_spec
from jax.tree_util import GetAttrKey

__all__ = ["flax_kind", "from_linen", "from_nnx"]


def flax_kind(obj: Any) -> str | None:
    """"nnx" or "linen" for a flax module, None for anything else (or without flax)."""
    try:
        from flax import linen, nnx
    except ImportError:  # flax is optional
        return None
    if isinstance(obj, nnx.Module):
        return "nnx"
    if isinstance(obj, linen.Module):
        return "linen"
    return None


def _nnx_names(path: tuple) -> list[str]:
    # An nnx Variable's array sits at `.value`; name the variable itself.
    if path and isinstance(path[-1], GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return path_parts(path)


def from_nnx(model: Any, remat_policy: Callable | None) -> JaxModule:
    """A torch module running nnx `model`, sharing its arrays (`model` is left as it is)."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    twin = nnx.merge(graphdef, params, rest)  # shares the arrays; leaves `model` as it is
    twin.train()
    graph_train = nnx.split(twin, nnx.Param, ...)[0]
    twin.eval()
    graph_eval = nnx.split(twin, nnx.Param, ...)[0]

    def apply(params: Any, state: Any, *args: Any, _train: bool, **kwargs: Any) -> tuple[Any, Any]:
        m = nnx.merge(graph_train if _train else graph_eval, params, state)
        out = m(*args, **kwargs)
        return out, nnx.split(m, nnx.Param, ...)[2]

    spec = Spec(
        apply,
        type(model).__name__,
        params=Tree(params),
        state=Tree(rest),
        train=("_train", False),
        remat_policy=remat_policy,
    )
    return JaxModule(spec, params, rest, name_of=_nnx_names)


def from_linen(
    module: Any,
    variables: Any,
    train_arg: str | None,
    rng_streams: Sequence[str],
    seed: int,
    remat_policy: Callable | None,
) -> JaxModule:
    """A torch module running Linen `module` with `variables` (what `module.init` returns)."""
    from flax.core import unfreeze

    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            f"jax_to_torch({type(module).__name__}, variables) needs the variables dict that "
            "`module.init(key, *example_inputs)` returns (with a 'params' collection); got "
            f"{type(variables).__name__}."
        )
    variables = unfreeze(variables)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    names, var_kw = keywords(module.__call__)
    streams = tuple(rng_streams)

    def apply(
        params: Any, state: Any, *args: Any, rng: Any = None, **kwargs: Any
    ) -> tuple[Any, Any]:
        rngs = {s: jax.random.fold_in(rng, i) for i, s in enumerate(streams)} if streams else None
        variables = {"params": params, **state}
        if not state:
            return module.apply(variables, *args, rngs=rngs, **kwargs), {}
        out, updates = module.apply(variables, *args, rngs=rngs, mutable=list(state), **kwargs)
        return out, {**state, **unfreeze(updates)}

    spec = Spec(
        apply,
        type(module).__name__,
        params=Tree(params),
        state=Tree(state),
        train=train_spec(train_arg, names, var_kw, type(module).__name__),
        rng="rng" if streams else None,
        remat_policy=remat_policy,
    )
    return JaxModule(spec, params, state, seed=seed)
