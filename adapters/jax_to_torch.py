"""JAX -> torch: (apply, params) -> nn.Module, JAX function -> torch function.

    module = bridge.jax_to_torch(apply, params)    # apply(params, *args, **kwargs)
    module = bridge.jax_to_torch(nnx_model)        # a flax.nnx.Module
    module = bridge.jax_to_torch(linen_module, variables)
    tfn = bridge.jax_to_torch(jax_function)        # a torch function with autograd

How a call runs. Every call reduces to one pure JAX function of a flat list
of arrays (`jax_flat.JaxFunction`), compiled with `jax.jit` once per input
signature; `jax_call.run` picks how to call it:

- Eager (and under `torch.func`): an `autograd.Function`
  (`jax_autograd.py`) runs the jitted forward, which also returns the VJP
  function of `jax.vjp` as a pytree, so the backward reuses the forward's
  residuals instead of recomputing it. Under `create_graph=True` (double
  backward, Hessians, gradient penalties, `torch.func.grad`) the backward is
  itself a JAX function of the inputs and cotangents, called the same way,
  so it can be differentiated again. `torch.func.vmap` maps through
  `jax.vmap`, forward-mode AD through `jax.jvp`.
- `torch.compile` / `torch.export`: the call is the custom op
  `bridge::jax_call(inputs, fn, diff)` (`jax_call.py`) with a fake
  implementation from `jax.eval_shape` and an autograd formula; when
  gradients are needed the op also returns the residual arrays, which the
  compiled graph keeps for the backward. The op's `fn` argument is a key into
  this process's weak table of JAX functions, so an exported program runs in
  the process that exported it.

Where things live: `jax_function.py` (the wrapped callable and its
per-signature functions, argument splitting, lone functions),
`jax_module.py` (the module), `flax_modules.py` (nnx and Linen),
`jax_boundary.py` (tensors in and out on the hot path).

Memory. Parameters and buffers share memory with the arrays passed in (no
copy on the way in); `torch.optim` updates parameters in place, so those JAX
arrays change with them: treat them as owned by the module
(`module.jax_params()` returns the current values as JAX arrays, again
without copies). New state replaces the buffers after each call (in place
under torch.compile). Inputs reach JAX without copies and outputs come back
through DLPack without copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bridge.adapters.flax_modules import flax_kind, from_linen, from_nnx
from bridge.adapters.jax_function import Spec, Tree, torch_function
from bridge.adapters.jax_module import JaxModule, keywords, rng_keyword, train_spec
from torch import nn

__all__ = ["JaxModule", "jax_to_torch"]


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def jax_to_torch(
    fn: Callable | Any,
    params: Any = None,
    *,
    state: Any = None,
    train_arg: str | None = "auto",
    rng_arg: str | None = "auto",
    seed: int = 0,
    rng_streams: Sequence[str] = ("dropout",),
    remat_policy: Callable | None = None,
) -> JaxModule | Callable[..., Any]:
    """Turn a JAX function (with its parameters) into a torch module or function.

    Args:
        fn: one of
            - `apply(params, *args, **kwargs)`, a pure JAX function, with `params`;
            - `apply(params, state, *args, **kwargs) -> (out, new_state)` with
              `params` and `state` (state becomes buffers, updated after each call);
            - a `flax.nnx.Module` (no `params`): `nnx.Param`s become parameters,
              all other variables (BatchNorm statistics, RNG streams) buffers;
            - a `flax.linen.Module` with its `variables` as `params`: the
              'params' collection becomes parameters, the others buffers;
            - a JAX function alone: returns a torch function of tensors.
        params: any pytree of arrays (jax, numpy or torch); they become
            `nn.Parameter`s sharing their memory, named after their pytree path
            (dict keys containing '.' are split, so a torch-style flat dict
            keeps its names).
        state: a pytree of arrays passed to `apply` after `params`; see above.
        train_arg: the keyword through which `apply` learns the mode: the
            module passes `module.training` (inverted for `deterministic` and
            `use_running_average`). "auto" picks `train`, `training`,
            `is_training`, `deterministic` or `use_running_average` if `apply`
            has one; None passes nothing. An explicit keyword in the call wins.
        rng_arg: the keyword through which `apply` gets a PRNG key ("auto":
            `rng`, `key` or `prng_key`). The module keeps a key as the buffer
            `rng_key` (seeded by `seed`, saved in `state_dict`) and splits it
            on every call.
        seed: the seed of the module's PRNG key.
        rng_streams: for Linen, the RNG stream names given a key (`rngs=`).
        remat_policy: a `jax.checkpoint` policy choosing which residuals the
            forward keeps for the backward (e.g.
            `jax.checkpoint_policies.dots_saveable`: keep matmul results,
            recompute elementwise ops). None keeps all of `jax.vjp`'s.

    Returns:
        A `JaxModule` (an `nn.Module`), or for a lone function a torch
        function. Calls take tensors and pytrees of them (other values are
        static arguments of the jitted function) and return the JAX output
        structure with tensors; gradients reach parameters and every input
        tensor that requires grad.
    """
    if isinstance(fn, nn.Module):
        raise TypeError(
            "jax_to_torch got a torch nn.Module; it converts JAX functions to torch. "
            "For torch -> JAX use bridge.torch_to_jax(module)."
        )
    kind = flax_kind(fn)
    if kind == "nnx":
        if params is not None or state is not None:
            raise TypeError(
                "jax_to_torch(nnx_module) takes no params or state: an nnx.Module carries its "
                "own. Call jax_to_torch(model)."
            )
        return from_nnx(fn, remat_policy)
    if kind == "linen":
        if params is None:
            raise TypeError(
                f"jax_to_torch({type(fn).__name__}) needs the module's variables: "
                "jax_to_torch(module, module.init(key, *example_inputs))."
            )
        return from_linen(fn, params, train_arg, rng_streams, seed, remat_policy)
    if not callable(fn):
        raise TypeError(
            f"jax_to_torch expects a JAX function, a flax module or (apply, params); got a "
            f"{type(fn).__name__}."
        )
    name = _name(fn)
    if params is None:
        if state is not None:
            raise TypeError(
                "jax_to_torch(fn, state=...) needs params too: "
                "jax_to_torch(apply, params, state=state)."
            )
        if train_arg not in ("auto", None) or rng_arg not in ("auto", None):
            raise TypeError(
                f"jax_to_torch({name}): a lone function has no module to hold the mode or a "
                "PRNG key; pass them as arguments, or wrap it as jax_to_torch(apply, params)."
            )
        return torch_function(fn, name, remat_policy)
    names, var_kw = keywords(fn)
    spec = Spec(
        fn,
        name,
        params=Tree(params),
        state=None if state is None else Tree(state),
        train=train_spec(train_arg, names, var_kw, name),
        rng=rng_keyword(rng_arg, names, var_kw, name),
        remat_policy=remat_policy,
    )
    return JaxModule(spec, params, state, seed=seed)
