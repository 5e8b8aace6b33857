"""Saved autograd graphs: one torch forward for `jax.grad` / `jax.vjp`.

`jax.grad` / `jax.vjp` take a shortcut so torch's forward runs once: the
forward (`SaveFwd`) runs under torch autograd and keeps its graph in
`PENDING`, keyed by a small integer token that JAX carries as a residual to
the backward call (`SavedVjp`, the transpose of `SavedJvp`). Whenever that
graph is missing (the table was trimmed, the backward runs a second time, the
forward was batched) the backward recomputes it with `torch.func.vjp`, so the
token is an optimisation, never a source of truth.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jax._src import core

from bridge.callback.autodiff import (
    conj,
    converting_no_formula,
    splice,
    torch_jvp,
    torch_vjp,
    zeros_if_none,
)
from bridge.callback.errors import CallbackError
from bridge.callback.kernels import Call, Jvp, Kernel, Vjp, Vmap

__all__ = [
    "NO_GRAPH",
    "PENDING",
    "Graph",
    "GraphTable",
    "SaveFwd",
    "SavedJvp",
    "SavedVjp",
    "storage_ptr",
]


@dataclasses.dataclass(frozen=True)
class _InputView:
    """A saved tensor that is a view of input `index`: rebuilt at backward time
    from the backward call's buffers, since XLA reuses the forward's buffers."""

    index: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    conj: bool
    neg: bool

    def rebuild(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        base = inputs[self.index]
        t = base.as_strided(self.size, self.stride, base.storage_offset() + self.offset)
        if self.conj:
            t = t.conj()
        if self.neg:
            t = torch._neg_view(t)
        return t


class Graph:
    """A torch autograd graph waiting for its backward call."""

    def __init__(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor | None]):
        self.inputs = inputs  # the leaves, for torch.autograd.grad
        self.outputs = outputs  # None where an output does not depend on the leaves
        self.bwd_inputs: Sequence[torch.Tensor] | None = None
        self.owned_by_array = False  # eager: lives as long as the JAX token array
        self.nbytes = 0  # memory of the tensors it saved (set once the forward ran)

    def backward(
        self, xs: Sequence[torch.Tensor], cts: Sequence[torch.Tensor], batched: bool
    ) -> list[torch.Tensor]:
        pairs = [(o, c) for o, c in zip(self.outputs, conj(cts), strict=True) if o is not None]
        grads: Sequence[torch.Tensor | None] = [None] * len(self.inputs)
        if pairs:
            self.bwd_inputs = xs
            try:
                grads = torch.autograd.grad(
                    [o for o, _ in pairs],
                    self.inputs,
                    [c for _, c in pairs],
                    retain_graph=self.owned_by_array,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            finally:
                self.bwd_inputs = None
        batch = (cts[0].shape[0],) if batched and cts else ()
        return list(
            conj([zeros_if_none(g, x, batch) for g, x in zip(grads, self.inputs, strict=True)])
        )


class GraphTable:
    """Torch autograd graphs waiting for their backward call, by integer token.

    Why a process-wide table: the forward and the backward are two separate
    `torch_call` primitives, and under `jax.jit` the only thing that can pass
    from one to the other is an array. The forward stores its graph here and
    returns the graph's token as a residual; the backward reads the token and
    takes the graph. Nothing else can carry a Python object through a
    compiled JAX program.

    How it is bounded: it holds at most `max_graphs` graphs and, together,
    about `max_bytes` of their activations (saved tensors computed from the
    differentiated inputs; inputs and weights are not counted; the newest
    graph is always kept, whatever its size). Past either limit the oldest
    graphs are dropped, and their backward recomputes the forward with
    torch.func: a token is an optimisation, never the only way to a gradient.
    A graph leaves the table when its backward takes it; an eager `jax.vjp`
    ties it to the life of its JAX token array instead (`adopt`), so a
    `vjp_fn` can be called twice and the graph goes with it. The limits are
    `bridge.callback.MAX_PENDING_GRAPHS` and `MAX_PENDING_BYTES`.
    """

    def __init__(self, max_graphs: int, max_bytes: int) -> None:
        self.max_graphs = max_graphs
        self.max_bytes = max_bytes
        self._graphs: collections.OrderedDict[int, Graph] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.nbytes = 0

    def put(self, graph: Graph) -> int:
        with self._lock:
            token = next(self._ids) % (2**31 - 1) or next(self._ids)
            self._graphs[token] = graph
            self.nbytes += graph.nbytes
            while len(self._graphs) > self.max_graphs or (
                self.nbytes > self.max_bytes and len(self._graphs) > 1
            ):
                self.nbytes -= self._graphs.popitem(last=False)[1].nbytes
            return token

    def take(self, token: int) -> Graph | None:
        with self._lock:
            graph = self._graphs.get(token)
            if graph is not None and not graph.owned_by_array:
                del self._graphs[token]
                self.nbytes -= graph.nbytes
            return graph

    def adopt(self, token: int) -> bool:
        """Tie a graph's life to its JAX token array (eager `jax.vjp`): it may
        then be used by several backward calls, and is freed with the array."""
        with self._lock:
            graph = self._graphs.get(token)
            if graph is not None:
                graph.owned_by_array = True
            return graph is not None

    def release(self, token: int) -> None:
        with self._lock:
            graph = self._graphs.pop(token, None)
            if graph is not None:
                self.nbytes -= graph.nbytes

    def __len__(self) -> int:
        return len(self._graphs)


#: The graphs of this process waiting for their backward (see `GraphTable`).
#: By default at most 256 graphs and about 1 GiB of their activations.
PENDING = GraphTable(max_graphs=256, max_bytes=1 << 30)

#: The token of a forward that kept no graph: its backward recomputes.
NO_GRAPH = -1


def storage_ptr(t: torch.Tensor) -> int | None:
    """The address of `t`'s storage, or None where it has none that can be read."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class SaveFwd(Kernel):
    """xs -> (outputs, token): the forward of `base` under torch autograd, with
    its graph kept in `PENDING` for `SavedVjp`."""

    def __init__(self, base: Call, diff: tuple[int, ...], out_diff: tuple[int, ...]):
        self.base, self.diff, self.out_diff = base, diff, out_diff
        self.n_in = base.n_in

    @staticmethod
    def of(base: Call, diff: tuple[int, ...], out_diff: tuple[int, ...]) -> SaveFwd:
        return base.memo(("save", diff, out_diff), lambda: SaveFwd(base, diff, out_diff))

    def __repr__(self) -> str:
        return f"forward_saving_graph({self.base!r})"

    def run(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        if self.base.save_graphs:
            try:
                return self._run_saving(xs)
            except RuntimeError as e:
                if "saved tensor hooks" not in str(e):
                    raise
                self.base.save_graphs = False  # fn uses torch.func inside: recompute instead
        with torch.no_grad():
            outs = self.base.run(*xs)
        return [*outs, _token_tensor(NO_GRAPH, xs)]

    def _run_saving(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        by_storage = {}
        for i, x in enumerate(xs):
            ptr = storage_ptr(x)
            if ptr:
                by_storage[ptr] = i
        # A weak reference: the saved-tensor hooks live inside the autograd
        # graph, which the Graph holds; a strong one would close a cycle through
        # C++ that Python's collector cannot see, and the graph (inputs, saved
        # activations) would never be freed.
        graph_ref: list[weakref.ref[Graph]] = []
        activations: dict[int | None, int] = {}  # storage -> bytes, for the byte budget

        def pack(t: torch.Tensor) -> Any:
            ptr = storage_ptr(t)
            i = by_storage.get(ptr)
            if i is None:
                if t.grad_fn is not None:  # computed from the inputs (not a weight)
                    activations[ptr] = t.untyped_storage().nbytes()
                # Detached: a saved output (tanh, exp, sigmoid save their result)
                # would otherwise hold its own grad_fn, a cycle through C++ that
                # keeps the graph alive forever. The backward needs only values
                # (this graph is differentiated once; higher orders recompute).
                return t.detach()
            if t.dtype != xs[i].dtype:
                return t.clone()  # a reinterpreting view: keep a private copy
            offset = t.storage_offset() - xs[i].storage_offset()
            return _InputView(i, tuple(t.shape), t.stride(), offset, t.is_conj(), t.is_neg())

        def unpack(p: Any) -> torch.Tensor:
            if isinstance(p, _InputView):
                graph = graph_ref[0]()
                if graph is None or graph.bwd_inputs is None:
                    raise CallbackError(
                        "bridge.callback: a saved torch autograd graph was used after its "
                        "backward call ended; this is a bug in the bridge, please report it."
                    )
                return p.rebuild(graph.bwd_inputs)
            return p

        leaves = [xs[i].detach().requires_grad_(True) for i in self.diff]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            outs = self.base.run(*splice(xs, self.diff, leaves))
        saved = [outs[j] if outs[j].requires_grad else None for j in self.out_diff]
        graph = Graph(leaves, saved)
        graph.nbytes = sum(activations.values())
        graph_ref.append(weakref.ref(graph))
        token = PENDING.put(graph)
        return [*(o.detach() for o in outs), _token_tensor(token, xs)]

    def out_avals(self, in_avals):
        return (*self.base.out_avals(in_avals), core.ShapedArray((), np.dtype(np.int32)))


def _token_tensor(token: int, like: Sequence[torch.Tensor]) -> torch.Tensor:
    # torch.full, not torch.tensor: on a GPU it is a fill kernel on the current
    # (XLA's) stream rather than a synchronous host-to-device copy.
    return torch.full((), token, dtype=torch.int32, device=like[0].device if like else None)


class SavedJvp(Jvp):
    """(xs, token, tangents) -> output tangents. The linear half of `SaveFwd`;
    JAX transposes it into `SavedVjp`. Run forward, it recomputes."""

    token = True

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        n = self.base.n_in
        return list(torch_jvp(self.base, self.diff, self.out_diff, args[:n], args[n + 1 :]))

    def derivable(self):
        n = self.base.n_in
        return Jvp.of(self.base, self.diff, self.out_diff), (*range(n), *range(n + 1, self.n_in))

    def transposed(self, lin_avals, n_cts):
        return SavedVjp.of(self.base, self.diff, self.out_diff, False), tuple(
            range(self.n_nonlinear)
        )


class SavedVjp(Vjp):
    """(xs, token, output cotangents) -> input cotangents, through the graph
    that `SaveFwd` kept, or recomputed with torch.func.vjp when it is gone.
    With `batched`, the cotangents carry a leading batch axis (jacrev)."""

    token = True

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        n = self.base.n_in
        xs, token, cts = args[:n], int(args[n]), args[n + 1 :]
        graph = PENDING.take(token) if token != NO_GRAPH else None
        if graph is not None:
            return converting_no_formula(self.base, lambda: graph.backward(xs, cts, self.batched))
        return converting_no_formula(
            self.base,
            lambda: torch_vjp(self.base, self.diff, self.out_diff, xs, cts, self.batched),
        )

    def out_avals(self, in_avals):
        n = self.base.n_in
        batch = (in_avals[n + 1].shape[0],) if self.batched else ()
        return tuple(
            core.ShapedArray((*batch, *in_avals[i].shape), in_avals[i].dtype) for i in self.diff
        )

    def derivable(self):
        n = self.base.n_in
        vjp = Vjp.of(self.base, self.diff, self.out_diff)
        if self.batched:
            vjp = Vmap.of(vjp, (None,) * n + (0,) * len(self.out_diff))
        return vjp, (*range(n), *range(n + 1, self.n_in))

    def transposed(self, lin_avals, n_cts):
        n = self.base.n_in
        jvp = Jvp.of(self.base, self.diff, self.out_diff)
        if self.batched:
            jvp = Vmap.of(jvp, (None,) * n + (0,) * len(self.diff))
        return jvp, tuple(range(n))
