"""The public wrapper: `wrap(fn)`, a torch function as a JAX function."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from jax._src import core

from bridge.callback.kernels import Call, fn_name, shaped_aval
from bridge.callback.primitive import torch_call_p
from bridge.tree import STATIC, Partition, partition

__all__ = ["wrap"]


class _Wrapped:
    """The JAX function returned by `wrap`."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._kernels: dict[Partition, Call] = {}  # per call structure and static values
        functools.update_wrapper(self, fn, updated=())

    def __repr__(self) -> str:
        return f"bridge.callback.wrap({fn_name(self.fn)})"

    def kernel(self, args: tuple, kwargs: dict) -> tuple[Call, list[Any]]:
        """The kernel of this call signature (cached on the wrapper), and its arrays."""

        def take(leaf: Any, i: int) -> Any:
            if isinstance(leaf, (jax.Array, core.Tracer)):
                return leaf
            if isinstance(leaf, (np.ndarray, np.generic)):
                return jnp.asarray(leaf)
            if isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{self!r} got a torch tensor of shape {tuple(leaf.shape)}; it takes JAX "
                    "arrays. Convert it with bridge.to_jax, or close over it in the torch function."
                )
            return STATIC

        part, arrays = partition((args, kwargs), take, repr(self))
        kernel = self._kernels.get(part)
        if kernel is None:
            kernel = self._kernels[part] = Call(self.fn, part)
        return kernel, arrays

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kernel, arrays = self.kernel(args, kwargs)
        info = kernel.info([shaped_aval(a) for a in arrays])
        outs = iter(torch_call_p.bind(*arrays, kernel=kernel))
        leaves = [
            next(outs) if is_tensor else static
            for is_tensor, static in zip(info.is_tensor, info.static_leaves, strict=True)
        ]
        return torch_pytree.tree_unflatten(leaves, info.spec)


# id(fn) -> its wrapper, for as long as the wrapper lives (it holds fn, so the
# id cannot be reused meanwhile); a bound method is keyed by its parts, since
# `module.forward` is a new object at every access. This table exists for the
# documented promise `wrap(fn) is wrap(fn)` (one wrapper, so one kernel cache
# and one shape inference per function, however often the function is
# wrapped, as `torch_to_jax`'s callback fallback does per graph node). Its
# values are weak: it holds exactly the wrappers alive elsewhere, each
# wrapper's caches live on the wrapper, and nothing here keeps a function or
# a wrapper alive.
_WRAPPERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _wrap_key(fn: Callable[..., Any]) -> Any:
    if inspect.ismethod(fn):
        return id(fn.__self__), id(fn.__func__)
    return id(fn)


def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a torch function behind a JAX primitive.

    Args:
        fn: a torch function taking torch tensors, in any pytree of dicts,
            lists and tuples, and returning a tensor or a pytree of tensors
            (tuples, lists, dicts, namedtuples, `ModelOutput` dataclasses).
            It must be pure: no in-place writes into its inputs, and output
            shapes that depend only on input shapes, dtypes and static values.

    Returns:
        `jax_fn(*args, **kwargs)`, taking the same structure with JAX arrays
        as leaves and returning `fn`'s output structure with JAX arrays. Other
        leaves (ints, floats, bools, strings, None, dtypes) reach `fn`
        unchanged as static values and are part of the cache key. `jax_fn`
        works under `jax.jit`, `grad`, `vjp`, `jvp`, `vmap` and `eval_shape`,
        and composes them (see docs/callback.md for limits).

    `wrap` is cached per function object: while a `jax_fn` is alive, wrapping
    the same `fn` again returns it. Each `jax_fn` caches its kernels and shape
    inference per input signature (tree structure, static values, shapes,
    dtypes). Wrap once and keep `jax_fn`, rather than wrapping a new lambda
    per call.

    Example:
        >>> jfn = bridge.callback.wrap(lambda x, n: torch.linalg.matrix_power(x, n))
        >>> jax.jit(jfn, static_argnums=1)(jnp.eye(3), 2)
    """
    if not callable(fn):
        raise TypeError(
            f"bridge.callback.wrap expects a torch function (a callable such as a function or "
            f"an nn.Module); got {fn!r:.80} of type {type(fn).__name__}."
        )
    key = _wrap_key(fn)
    wrapped = _WRAPPERS.get(key)
    if wrapped is None:
        wrapped = _WRAPPERS[key] = _Wrapped(fn)
    return wrapped
