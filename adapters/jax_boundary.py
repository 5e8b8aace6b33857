"""Tensors in and out of a JAX call on the hot path of `bridge.jax_to_torch`.

Every call of a wrapped JAX function crosses the boundary twice: torch
tensors become JAX-readable values (`jax_input`) and JAX outputs become
tensors (`torch_outputs`), both without copying memory. On the CPU a NumPy
view costs a fraction of a DLPack exchange, so the common dtypes take that
route; everything else goes through `bridge.to_jax` / `bridge.to_torch`,
whose rules (x64 narrowing, devices, sharded arrays) then apply.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge import dtypes
from bridge.dlpack import to_jax, to_torch

__all__ = [
    "Views",
    "avals",
    "decode",
    "differentiable",
    "encode",
    "is_key",
    "key_impls",
    "jax_input",
    "remember_view",
    "signature",
    "torch_outputs",
]

# dtypes whose CPU tensors JAX reads through `Tensor.numpy()` (no copy, and
# much cheaper per call than a DLPack import); everything else goes through
# `bridge.to_jax`, which also narrows 64-bit values exactly or raises.
_NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.float16,
        torch.float32,
        torch.complex64,
    }
)

# A module keeps JAX views of its parameters and buffers (`Views`), keyed by
# id(tensor): the memory is shared, so a view stays valid while the tensor
# keeps its storage (in-place optimizer updates included) and is rebuilt when
# it moves. The table belongs to the module (through its `Spec`), so it dies
# with it; it holds one entry per tensor the module was built with.
Views = dict[int, tuple[weakref.ref, tuple, jax.Array]]


def _layout(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


def remember_view(views: Views, t: torch.Tensor, a: jax.Array) -> None:
    """Record `a` as the JAX view of `t` if the two share memory."""
    if t.numel() == 0 or a.unsafe_buffer_pointer() != t.data_ptr():
        return
    key = id(t)
    views[key] = (weakref.ref(t, lambda _, key=key: views.pop(key, None)), _layout(t), a)


@functools.cache
def _host_only() -> bool:
    """True when JAX runs on the CPU alone, so NumPy views land where tensors are."""
    return jax.default_backend() == "cpu"


def jax_input(t: torch.Tensor, views: Views | None = None) -> Any:
    """A JAX-readable value for tensor `t`, without copying its memory."""
    view = views.get(id(t)) if views else None
    if view is not None and view[0]() is t:
        if view[1] == _layout(t):
            return view[2]
        a = to_jax(t)
        remember_view(views, t, a)
        return a
    if (
        t.is_cpu
        and t.dtype in _NUMPY_DTYPES
        and not t.is_conj()
        and not t.is_neg()
        and t.layout == torch.strided
        and _host_only()
    ):
        return t.detach().numpy()
    return to_jax(t)


_NUMPY_OUT = frozenset(dtypes.to_jax_dtype(t) for t in _NUMPY_DTYPES)
# torch warns once per process about read-only NumPy memory; after the first
# conversion there is nothing left to silence (a flag, not a growing table).
_quiet = False


def torch_outputs(arrays: Sequence[jax.Array]) -> list[torch.Tensor]:
    """Torch tensors sharing the memory of JAX outputs `arrays`.

    On the CPU a NumPy view is ~10x cheaper per array than a DLPack export.
    JAX marks that view read-only; the tensor may still be written (the
    buffer is the output's own, as with DLPack), so torch's one-time warning
    about it is silenced.
    """
    global _quiet
    if not _quiet and _host_only():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = _torch_outputs_now(arrays)
        _quiet = True
        return out
    return _torch_outputs_now(arrays)


def _torch_outputs_now(arrays: Sequence[jax.Array]) -> list[torch.Tensor]:
    host = _host_only()
    return [
        torch.from_numpy(np.asarray(a)) if host and a.dtype in _NUMPY_OUT else _torch_output(a)
        for a in arrays
    ]


def _torch_output(a: jax.Array) -> torch.Tensor:
    """A torch tensor sharing the memory of JAX output `a`."""
    try:
        return torch.from_dlpack(a)
    except (BufferError, RuntimeError, TypeError, ValueError):
        return to_torch(a)  # sharded or otherwise unusual arrays: its rules apply


def signature(tensors: Sequence[torch.Tensor]) -> tuple:
    """The JAX avals (shape, dtype) that `tensors` become; concrete shapes only."""
    try:
        return tuple(
            (tuple(int(s) for s in t.shape), dtypes.canonical_jax_dtype(t.dtype)) for t in tensors
        )
    except (TypeError, RuntimeError) as e:
        raise TypeError(
            "bridge.jax_to_torch needs concrete tensor shapes, but got symbolic ones "
            f"({[tuple(t.shape) for t in tensors]}). Compile with torch.compile(..., "
            "dynamic=False) or export without dynamic_shapes."
        ) from e


def avals(sig: tuple) -> list[jax.ShapeDtypeStruct]:
    """Abstract JAX arguments for a `signature`, to trace a function with."""
    return [jax.ShapeDtypeStruct(s, d) for s, d in sig]


def differentiable(t: torch.Tensor) -> bool:
    """Whether torch autograd gives tensor `t` a gradient: floating and complex dtypes."""
    return t.is_floating_point() or t.is_complex()


# Typed PRNG keys cross the boundary as their raw key data (torch has no key
# dtype): `encode` on the way out of JAX, `decode` with `key_impls` back in.


def is_key(x: Any) -> bool:
    """Whether `x` is a typed PRNG key array (torch has no dtype for it)."""
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def encode(x: Any) -> Any:
    """`x` as an array torch can hold: a typed PRNG key as its raw key data."""
    return jax.random.key_data(x) if is_key(x) else jnp.asarray(x)


def key_impls(leaves: Sequence[Any]) -> tuple:
    """Per leaf, its PRNG implementation if it is a typed key, else None (for `decode`)."""
    return tuple(jax.random.key_impl(x) if is_key(x) else None for x in leaves)


def decode(arrays: Sequence[Any], impls: tuple) -> list[Any]:
    """`encode`d leaves back as they were: key data becomes typed keys again."""
    return [
        x if impl is None else jax.random.wrap_key_data(x, impl=impl)
        for x, impl in zip(arrays, impls, strict=True)
    ]
