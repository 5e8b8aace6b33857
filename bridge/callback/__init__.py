"""Run torch itself behind a JAX primitive.

`wrap(fn)` turns a torch function into a JAX function. At run time JAX calls
torch: under `jax.jit` through `jax.experimental.buffer_callback`, which hands
torch the very device buffers JAX holds (DLPack, no copy); outside `jit`
through `bridge.to_torch` / `bridge.to_jax`, which share memory both ways.

Everything happens in one primitive, `torch_call_p`, whose only parameter is
a *kernel*: a torch function on flat tensors. Every JAX transformation maps a
kernel to another kernel built with `torch.func`, so the rules compose the
way JAX's own primitives do. `jax.grad` / `jax.vjp` run torch's forward once
and keep its autograd graph for the backward, in a bounded table.

Output shapes and dtypes come from running `fn` on fake tensors
(`FakeTensorMode`, no compute), cached per input signature; functions that a
fake run cannot follow (data-dependent control flow, custom ops with no fake
implementation) are run once on zeros instead, and every real run is checked
against the prediction.

Modules, each one concept:

    errors.py     CallbackError
    autodiff.py   torch.func jvp / vjp of a kernel, with their checks
    kernels.py    the kernels: the user's call and its jvp, vjp, vmap, transposes
    graphs.py     saved autograd graphs waiting for their backward (PENDING)
    runner.py     running a kernel on tensors, shared by the eager and jit paths
    primitive.py  torch_call_p and its rules (impl, lowering, jvp, transpose, batching, dce)
    wrap.py       the public wrapper

`MAX_PENDING_GRAPHS` and `MAX_PENDING_BYTES` bound the saved graphs: at most
that many torch autograd graphs (256), keeping together about that many bytes
of activations (1 GiB), wait for their backward call; past them the oldest are
dropped and their backward recomputes the forward. Both can be set here
(`bridge.callback.MAX_PENDING_GRAPHS = 16`); they are the limits of
`graphs.PENDING`.
"""

from __future__ import annotations

import sys
import types

from bridge.callback.errors import CallbackError
from bridge.callback.graphs import PENDING
from bridge.callback.primitive import TRANSPORT, torch_call_p
from bridge.callback.wrap import wrap

__all__ = [
    "MAX_PENDING_BYTES",
    "MAX_PENDING_GRAPHS",
    "TRANSPORT",
    "CallbackError",
    "torch_call_p",
    "wrap",
]


class _Package(types.ModuleType):
    """`bridge.callback` itself: its two limits read and write `PENDING`'s."""

    @property
    def MAX_PENDING_GRAPHS(self) -> int:  # a module constant, as documented
        return PENDING.max_graphs

    @MAX_PENDING_GRAPHS.setter
    def MAX_PENDING_GRAPHS(self, value: int) -> None:
        PENDING.max_graphs = value

    @property
    def MAX_PENDING_BYTES(self) -> int:
        return PENDING.max_bytes

    @MAX_PENDING_BYTES.setter
    def MAX_PENDING_BYTES(self, value: int) -> None:
        PENDING.max_bytes = value


sys.modules[__name__].__class__ = _Package
