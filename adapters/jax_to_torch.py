"""JAX -> torch: (apply, params) -> nn.Module, JAX function -> torch function.

    module = bridge.jax_to_torch(apply, params)    # apply(params, *args, **kwargs)
    module = bridge.jax_to_torch(nnx_model)        # a flax.nnx.Module
    module = bridge.jax_to_torch(linen_module, variables)
    tfn = bridge.jax_to_torch(jax_function)        # a torch function with autograd

How a call runs. Every call reduces to one pure JAX function of a flat list
of arrays (`_JaxFn`), compiled with `jax.jit` once per input signature:

- Eager (and under `torch.func`): an `autograd.Function` runs the jitted
  forward, which also returns the VJP function of `jax.vjp` as a pytree, so
  the backward reuses the forward's residuals instead of recomputing it.
  Under `create_graph=True` (double backward, Hessians, gradient penalties,
  `torch.func.grad`) the backward is itself a JAX function of the inputs and
  cotangents, called the same way, so it can be differentiated again.
  `torch.func.vmap` maps through `jax.vmap`, forward-mode AD through `jax.jvp`.
- `torch.compile` / `torch.export`: the call is the custom op
  `bridge::jax_call(inputs, fn, diff)` with a fake implementation from
  `jax.eval_shape` and an autograd formula; when gradients are needed the op
  also returns the residual arrays, which the compiled graph keeps for the
  backward. The op's `fn` argument is a key into this process's registry of
  JAX functions, so an exported program runs in the process that exported it.

Memory. Parameters and buffers share memory with the arrays passed in (no
copy on the way in); `torch.optim` updates parameters in place, so those JAX
arrays change with them: treat them as owned by the module
(`module.jax_params()` returns the current values as JAX arrays, again
without copies). New state replaces the buffers after each call (in place
under torch.compile). Inputs reach JAX without copies and outputs come back
through DLPack without copies.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.autograd import forward_ad

from bridge import dtypes
from bridge.dlpack import to_jax, to_torch

__all__ = ["JaxModule", "jax_to_torch"]


# --------------------------------------------------------------------------
# Crossing the boundary on the hot path

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

# A module keeps JAX views of its parameters and buffers (`_Views`), keyed by
# id(tensor): the memory is shared, so a view stays valid while the tensor
# keeps its storage (in-place optimizer updates included) and is rebuilt when
# it moves. The table belongs to the module (through its `_Spec`), so it dies
# with it; it holds one entry per tensor the module was built with.
_Views = dict[int, tuple[weakref.ref, tuple, jax.Array]]


def _layout(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


def _remember_view(views: _Views, t: torch.Tensor, a: jax.Array) -> None:
    """Record `a` as the JAX view of `t` if the two share memory."""
    if t.numel() == 0 or a.unsafe_buffer_pointer() != t.data_ptr():
        return
    key = id(t)
    views[key] = (weakref.ref(t, lambda _, key=key: views.pop(key, None)), _layout(t), a)


@functools.cache
def _host_only() -> bool:
    """True when JAX runs on the CPU alone, so NumPy views land where tensors are."""
    return jax.default_backend() == "cpu"


def _jax_input(t: torch.Tensor, views: _Views | None = None) -> Any:
    """A JAX-readable value for tensor `t`, without copying its memory."""
    view = views.get(id(t)) if views else None
    if view is not None and view[0]() is t:
        if view[1] == _layout(t):
            return view[2]
        a = to_jax(t)
        _remember_view(views, t, a)
        return a
    if (
        t.device.type == "cpu"
        and t.dtype in _NUMPY_DTYPES
        and not t.is_conj()
        and not t.is_neg()
        and t.layout == torch.strided
        and _host_only()
    ):
        return t.detach().numpy()
    return to_jax(t)


_NUMPY_OUT = frozenset(dtypes.to_jax_dtype(t) for t in _NUMPY_DTYPES)
_quiet = False  # torch warns once per process about read-only NumPy memory


def _torch_outputs(arrays: Sequence[jax.Array]) -> list[torch.Tensor]:
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


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _conj(x: Any) -> Any:
    return jnp.conj(x) if jnp.iscomplexobj(x) else x


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode(x: Any) -> Any:
    """Typed PRNG keys cross as their raw key data (torch has no key dtype)."""
    return jax.random.key_data(x) if _is_key(x) else jnp.asarray(x)


def _var(x: Any) -> Any:
    # A traced value's jaxpr variable: two tracers of one input share it.
    return getattr(x, "val", x)


@jax.tree_util.register_pytree_node_class
class _Res:
    """The residuals of one forward's VJP, minus those that are just its inputs.

    `jax.vjp` keeps the primal inputs (weights, activations fed in) among its
    residuals; returning them from `jax.jit` would copy them on every call, so
    they are left out here and taken from the inputs again in the backward.
    `take[i]` is the input index of VJP leaf i, or -1 - j for `leaves[j]`.
    """

    def __init__(self, leaves: list[Any], treedef: Any, take: tuple[int, ...]) -> None:
        self.leaves, self.treedef, self.take = leaves, treedef, take

    @classmethod
    def of(cls, vjp: Callable, xs: Sequence[Any]) -> _Res:
        leaves, treedef = jax.tree_util.tree_flatten(vjp)
        where = {id(_var(x)): i for i, x in enumerate(xs)}
        take, kept = [], []
        for leaf in leaves:
            i = where.get(id(_var(leaf)))
            if i is None:
                take.append(-1 - len(kept))
                kept.append(leaf)
            else:
                take.append(i)
        return cls(kept, treedef, tuple(take))

    def vjp(self, xs: Sequence[Any]) -> Callable:
        leaves = [xs[i] if i >= 0 else self.leaves[-1 - i] for i in self.take]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def tree_flatten(self) -> tuple[list[Any], tuple]:
        return self.leaves, (self.treedef, self.take)

    @classmethod
    def tree_unflatten(cls, static: tuple, leaves: list[Any]) -> _Res:
        return cls(list(leaves), *static)


def _vjp_impl(res: _Res, xs: Sequence[Any], cts: Sequence[Any]) -> list[Any]:
    # torch's gradients of complex values are the conjugates of JAX's.
    return [_conj(g) for g in res.vjp(xs)([_conj(c) for c in cts])]


# --------------------------------------------------------------------------
# Pure JAX functions of flat arrays


# key -> function, for the custom op's `fn` argument. Weak: a function lives as
# long as the module or torch function that built it (its `_Spec` holds it);
# compiled graphs hold only the key.
_FNS: weakref.WeakValueDictionary[int, _JaxFn] = weakref.WeakValueDictionary()
_fn_keys = itertools.count()


class _JaxFn:
    """A pure JAX function `fn(*arrays) -> (primary, aux)` on flat lists of arrays.

    `primary` holds the outputs torch differentiates (those with a floating or
    complex dtype); `aux` holds outputs that carry no gradient (new state,
    residuals). Registered under `key` so compiled graphs can name it.
    """

    def __init__(self, fn: Callable, name: str, remat_policy: Callable | None = None) -> None:
        self.key = next(_fn_keys)
        self.remat_policy = remat_policy
        _FNS[self.key] = self
        self.name = name
        self._fn = fn
        self.n_primary: int | None = None
        self.n_aux: int | None = None
        self.out_def: Any = None  # set by functions that produce a user pytree
        self.views: _Views | None = None  # the owning module's views of its tensors
        self.plain = jax.jit(self.traced)
        self.fwd_vjp = jax.jit(self._fwd_vjp, static_argnums=0)

        # A jit of its own (not one shared by every function): jit caches its
        # traces per function, and the residuals' tree structure names this
        # function's VJP, so a shared jit would keep every wrapped function's
        # backward alive for the life of the process.
        def apply_vjp(res: _Res, xs: Sequence[Any], cts: Sequence[Any]) -> list[Any]:
            return _vjp_impl(res, xs, cts)

        self.apply_vjp = jax.jit(apply_vjp)
        self._derived: dict[tuple, _JaxFn] = {}
        self._residual_defs: dict[tuple, tuple[Any, tuple]] = {}

    def __repr__(self) -> str:
        return f"<JAX function {self.name}>"

    def traced(self, *xs: Any) -> tuple[list[Any], list[Any]]:
        try:
            prim, aux = self._fn(*xs)
        except Exception as e:
            avals = ", ".join(f"{x.dtype}{list(x.shape)}" for x in xs)
            e.add_note(f"(while bridge.jax_to_torch traced {self.name} on arrays [{avals}])")
            raise
        prim, aux = list(prim), list(aux)
        if self.n_primary is None:
            self.n_primary, self.n_aux = len(prim), len(aux)
        elif (self.n_primary, self.n_aux) != (len(prim), len(aux)):
            raise ValueError(
                f"{self.name} returned {len(prim)} outputs for these input shapes but "
                f"{self.n_primary} for earlier ones; jax_to_torch needs the output structure "
                "to be the same for every input shape."
            )
        return prim, aux

    def _fwd_vjp(self, diff: tuple[bool, ...], *xs: Any) -> tuple[list, list, _Res]:
        idx = [i for i, d in enumerate(diff) if d]
        layout: list[list[Any]] = []

        def g(*d: Any) -> tuple[list[Any], tuple[list[Any], list[Any]]]:
            full = list(xs)
            for i, v in zip(idx, d, strict=True):
                full[i] = v
            prim, aux = self.traced(*full)
            layout[:] = [[_inexact(p) for p in prim]]
            return [p for p in prim if _inexact(p)], ([p for p in prim if not _inexact(p)], aux)

        if self.remat_policy is not None:
            g = jax.checkpoint(g, policy=self.remat_policy)
        dp, vjp, (nd, aux) = jax.vjp(g, *[xs[i] for i in idx], has_aux=True)
        dp_it, nd_it = iter(dp), iter(nd)
        prim = [next(dp_it) if is_diff else next(nd_it) for is_diff in layout[0]]
        return prim, aux, _Res.of(vjp, xs)

    def _derive(self, key: tuple, make: Callable[[], tuple[Callable, str]]) -> _JaxFn:
        fn = self._derived.get(key)
        if fn is None:
            fn = self._derived[key] = _JaxFn(*make())
            fn.views = self.views
        return fn

    def recompute_vjp(self, diff: tuple[bool, ...]) -> _JaxFn:
        """`(*inputs, *cotangents) -> grads of the inputs marked in `diff``.

        Recomputes the forward, so the result can be differentiated again.
        """
        n = len(diff)

        def fn(*a: Any) -> tuple[list[Any], list[Any]]:
            _, _, res = self._fwd_vjp(diff, *a[:n])
            return _vjp_impl(res, a[:n], a[n:]), []

        return self._derive(("vjp", diff), lambda: (fn, f"vjp({self.name})"))

    def jvp(self, tangents: tuple[bool, ...]) -> _JaxFn:
        """`(*inputs, *tangents of the marked inputs) -> tangents of the primary outputs`."""
        n = len(tangents)
        idx = [i for i, t in enumerate(tangents) if t]

        def fn(*a: Any) -> tuple[list[Any], list[Any]]:
            xs = list(a[:n])

            def g(*d: Any) -> list[Any]:
                full = list(xs)
                for i, v in zip(idx, d, strict=True):
                    full[i] = v
                return [p for p in self.traced(*full)[0] if _inexact(p)]

            _, out = jax.jvp(g, tuple(xs[i] for i in idx), tuple(a[n:]))
            return list(out), []

        return self._derive(("jvp", tangents), lambda: (fn, f"jvp({self.name})"))

    def vmapped(self, in_axes: tuple[int | None, ...]) -> _JaxFn:
        """The same function over a batch: `jax.vmap` with every output batched at 0."""
        mapped = jax.vmap(self.traced, in_axes=in_axes, out_axes=0)
        return self._derive(("vmap", in_axes), lambda: (mapped, f"vmap({self.name})"))

    def with_residuals(self, diff: tuple[bool, ...]) -> _JaxFn:
        """`inputs -> (primary, aux + residuals)`: the forward that keeps the VJP's residuals."""

        def fn(*xs: Any) -> tuple[list[Any], list[Any]]:
            prim, aux, res = self._fwd_vjp(diff, *xs)
            impls = tuple(jax.random.key_impl(x) if _is_key(x) else None for x in res.leaves)
            sig = tuple((tuple(x.shape), np.dtype(x.dtype)) for x in xs)
            self._residual_defs[(diff, sig)] = (res.treedef, res.take, impls)
            return prim, [*aux, *[_encode(x) for x in res.leaves]]

        return self._derive(("res", diff), lambda: (fn, self.name))

    def residual_vjp(self, diff: tuple[bool, ...], sig: tuple) -> _JaxFn:
        """`(*inputs, *residuals, *cotangents) -> grads`, for `with_residuals(diff)`."""
        treedef, take, impls = self._residual_defs[(diff, sig)]
        n_in, n_res = len(sig), len(impls)

        def fn(*a: Any) -> tuple[list[Any], list[Any]]:
            leaves = [
                x if impl is None else jax.random.wrap_key_data(x, impl=impl)
                for x, impl in zip(a[n_in : n_in + n_res], impls, strict=True)
            ]
            res = _Res(leaves, treedef, take)
            return _vjp_impl(res, a[:n_in], a[n_in + n_res :]), []

        return self._derive(("resvjp", diff, sig), lambda: (fn, f"vjp({self.name})"))


def _signature(tensors: Sequence[torch.Tensor]) -> tuple:
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


# --------------------------------------------------------------------------
# Eager and torch.func: an autograd.Function that keeps JAX's residuals


class _Residuals:
    """What the backward of one forward call needs, kept on the JAX side."""

    __slots__ = ("inputs", "n_primary", "res")

    def __init__(self, res: _Res | None, inputs: list[Any] | None, n_primary: int) -> None:
        self.res, self.inputs, self.n_primary = res, inputs, n_primary


def _call_forward(fn: _JaxFn, diff: tuple[bool, ...], tensors: Sequence[torch.Tensor]) -> tuple:
    arrays = [_jax_input(t, fn.views) for t in tensors]
    if any(diff):
        prim, aux, res = fn.fwd_vjp(diff, *arrays)
    else:
        (prim, aux), res = fn.plain(*arrays), None
    outs = _torch_outputs([*prim, *aux])
    return (*outs, _Residuals(res, arrays, len(prim)))


def _call_setup(ctx: Any, fn: _JaxFn, diff: tuple, tensors: Sequence, output: tuple) -> None:
    res = output[-1]
    outs = output[:-1]
    ctx.fn, ctx.diff, ctx.res = fn, diff, res
    ctx.out_diff = [
        i < res.n_primary and (o.is_floating_point() or o.is_complex()) for i, o in enumerate(outs)
    ]
    ctx.mark_non_differentiable(*[o for o, d in zip(outs, ctx.out_diff, strict=True) if not d])
    ctx.save_for_backward(*tensors)


def _call_backward(ctx: Any, grads: Sequence[torch.Tensor | None]) -> tuple:
    # Gradients of tensor outputs arrive materialised (zeros when unused); the
    # last output is the residuals, which get none.
    cts = [g for g, d in zip(grads[:-1], ctx.out_diff, strict=True) if d]
    if torch.is_grad_enabled() or ctx.res.res is None:
        # create_graph (or a torch.func transform): a differentiable backward.
        gin = _run(ctx.fn.recompute_vjp(ctx.diff), [*ctx.saved_tensors, *cts])
    else:
        ctx.saved_tensors  # noqa: B018 -- raises if an input was modified in place
        cts = [_jax_input(c) for c in cts]
        gin = _torch_outputs(ctx.fn.apply_vjp(ctx.res.res, ctx.res.inputs, cts))
    it = iter(gin)
    return (None, None, *[next(it) if d else None for d in ctx.diff])


class _JaxCallEager(torch.autograd.Function):
    """Plain eager autograd (the common case, with the least per-call work)."""

    @staticmethod
    def forward(ctx: Any, fn: _JaxFn, diff: tuple[bool, ...], *tensors: torch.Tensor) -> tuple:
        output = _call_forward(fn, diff, tensors)
        _call_setup(ctx, fn, diff, tensors, output)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        return _call_backward(ctx, grads)


class _JaxCall(torch.autograd.Function):
    """The same under torch.func transforms and forward-mode AD."""

    @staticmethod
    def forward(fn: _JaxFn, diff: tuple[bool, ...], *tensors: torch.Tensor) -> tuple:
        return _call_forward(fn, diff, tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        fn, diff, *tensors = inputs
        _call_setup(ctx, fn, diff, tensors, output)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        return _call_backward(ctx, grads)

    @staticmethod
    def jvp(ctx: Any, _fn: None, _diff: None, *tangents: torch.Tensor | None) -> tuple:
        mask = tuple(t is not None for t in tangents)
        given = [t for t in tangents if t is not None]
        tout = iter(_run(ctx.fn.jvp(mask), [*ctx.saved_tensors, *given]))
        return (*[next(tout) if d else None for d in ctx.out_diff], None)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, fn: _JaxFn, diff: tuple, *tensors: torch.Tensor) -> tuple:
        vfn = fn.vmapped(tuple(in_dims[2:]))
        outs = _run(vfn, list(tensors))
        return (*outs, _Residuals(None, None, vfn.n_primary)), (*[0] * len(outs), None)


# --------------------------------------------------------------------------
# torch.compile / torch.export: a custom op with a fake implementation


def _registered(key: int) -> _JaxFn:
    jfn = _FNS.get(key)
    if jfn is None:
        raise RuntimeError(
            f"bridge::jax_call: JAX function #{key} no longer exists: the module or function "
            "that bridge.jax_to_torch made was deleted, and a compiled or exported graph still "
            "calls it. Keep the module alive as long as graphs that call it run."
        )
    return jfn


@torch.library.custom_op("bridge::jax_call", mutates_args=())
def _jax_call_op(inputs: list[torch.Tensor], fn: int, diff: list[bool]) -> list[torch.Tensor]:
    """Run registered JAX function `fn`; with any `diff`, also return its VJP residuals."""
    jfn = _registered(fn)
    target = jfn.with_residuals(tuple(diff)) if any(diff) else jfn
    prim, aux = target.plain(*[_jax_input(t, jfn.views) for t in inputs])
    outs = _torch_outputs([*prim, *aux])
    # A custom op's outputs must not alias its inputs.
    ptrs = {t.data_ptr() for t in inputs if t.numel()}
    return [o.clone() if o.numel() and o.data_ptr() in ptrs else o for o in outs]


@_jax_call_op.register_fake
def _jax_call_fake(inputs: list[torch.Tensor], fn: int, diff: list[bool]) -> list[torch.Tensor]:
    jfn = _registered(fn)
    target = jfn.with_residuals(tuple(diff)) if any(diff) else jfn
    avals = [jax.ShapeDtypeStruct(s, d) for s, d in _signature(inputs)]
    prim, aux = jax.eval_shape(target.traced, *avals)
    device = inputs[0].device if inputs else torch.device("cpu")
    return [
        torch.empty(a.shape, dtype=dtypes.to_torch_dtype(a.dtype), device=device)
        for a in (*prim, *aux)
    ]


def _op_setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    tensors, key, diff = inputs
    jfn = _registered(key)
    n_out = jfn.n_primary + jfn.n_aux
    ctx.key, ctx.diff, ctx.n_in = key, tuple(diff), len(tensors)
    ctx.sig = _signature(tensors)
    ctx.out_diff = [
        i < jfn.n_primary and (o.is_floating_point() or o.is_complex())
        for i, o in enumerate(output)
    ]
    ctx.out_meta = [
        (o.shape, o.dtype, o.device) for o, d in zip(output, ctx.out_diff, strict=True) if d
    ]
    ctx.mark_non_differentiable(*[o for o, d in zip(output, ctx.out_diff, strict=True) if not d])
    ctx.save_for_backward(*tensors, *output[n_out:])


def _op_backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple:
    jfn = _registered(ctx.key)
    saved = ctx.saved_tensors
    tensors, residuals = list(saved[: ctx.n_in]), list(saved[ctx.n_in :])
    cts = [g for g, d in zip(grads, ctx.out_diff, strict=True) if d]
    cts = [
        g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
        for g, (shape, dtype, device) in zip(cts, ctx.out_meta, strict=True)
    ]
    if torch.is_grad_enabled() or not any(ctx.diff):
        gin = _run(jfn.recompute_vjp(ctx.diff), [*tensors, *cts])
    else:
        bwd = jfn.residual_vjp(ctx.diff, ctx.sig)
        inputs = [*tensors, *residuals, *cts]
        gin = list(torch.ops.bridge.jax_call(inputs, bwd.key, [False] * len(inputs)))
    it = iter(gin)
    return [next(it) if d else None for d in ctx.diff], None, None


torch.library.register_autograd("bridge::jax_call", _op_backward, setup_context=_op_setup_context)


# --------------------------------------------------------------------------
# Dispatch


def _tracing(tensors: Sequence[torch.Tensor]) -> bool:
    """True under torch.compile / torch.export tracing (fake or proxy tensors)."""
    return (
        torch.compiler.is_compiling()
        or any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    )


def _run(fn: _JaxFn, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Call `fn` on `tensors` with torch autograd; returns primary + aux outputs."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    diff = tuple(
        grad and t.requires_grad and (t.is_floating_point() or t.is_complex()) for t in tensors
    )
    if tensors and any(t.device.type == "xla" for t in tensors):
        # On torch_xla devices the JAX computation joins torch_xla's own graph.
        from bridge import xla

        prim, aux = xla.xla_call(fn.traced, *tensors)
        return [*prim, *aux]
    if _tracing(tensors):
        outs = torch.ops.bridge.jax_call(tensors, fn.key, list(diff))
        return list(outs[: fn.n_primary + fn.n_aux])
    transformed = torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    if not grad and not transformed:
        prim, aux = fn.plain(*[_jax_input(t, fn.views) for t in tensors])
        return _torch_outputs([*prim, *aux])
    call = _JaxCall if transformed else _JaxCallEager
    return list(call.apply(fn, diff, *tensors)[:-1])


# --------------------------------------------------------------------------
# Arguments: tensors become JAX arrays, everything else is static

_TENSOR = object()  # marks a tensor slot in a call signature


def _split_args(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], tuple]:
    """Tensor leaves of `(args, kwargs)` and a hashable signature of the rest."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    tensors: list[torch.Tensor] = []
    statics: list[Any] = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array):
            leaf = to_torch(leaf)
        elif isinstance(leaf, np.ndarray):
            leaf = _numpy_input(leaf, i)
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            statics.append(_TENSOR)
            continue
        try:
            hash(leaf)
        except TypeError:
            raise TypeError(
                f"jax_to_torch: argument leaf #{i} is a {type(leaf).__name__}, which is neither "
                "a tensor nor a hashable constant. Pass tensors (they become JAX arrays) or "
                "hashable Python values (they become static arguments of the jitted function); "
                "containers must be tuples, lists, dicts or other JAX pytrees."
            ) from None
        statics.append((type(leaf), leaf))  # the type keeps 1, 1.0 and True apart
    return tensors, (treedef, tuple(statics))


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


def _fill(sig: tuple, arrays: Sequence[Any]) -> tuple[tuple, dict]:
    treedef, statics = sig
    it = iter(arrays)
    leaves = [next(it) if s is _TENSOR else s[1] for s in statics]
    return jax.tree_util.tree_unflatten(treedef, leaves)


class _Tree:
    """A pytree's structure plus which leaves are typed PRNG keys (held as key data)."""

    def __init__(self, tree: Any) -> None:
        leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        self.impls = tuple(jax.random.key_impl(x) if _is_key(x) else None for x in leaves)

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        leaves = [
            x if impl is None else jax.random.wrap_key_data(x, impl=impl)
            for x, impl in zip(leaves, self.impls, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def flatten(self, tree: Any, what: str) -> list[Any]:
        try:
            return self.treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{what} has structure {jax.tree_util.tree_structure(tree)}, but the module "
                f"was built with {self.treedef}; apply must return its new state with the "
                "structure of the state passed in."
            ) from e


class _Spec:
    """Everything static about one wrapped JAX callable.

    Passed through torch.compile as a constant through its weak `handle`;
    holds one `_JaxFn` per call signature.
    """

    def __init__(
        self,
        fn: Callable,
        name: str,
        *,
        params: _Tree | None = None,
        state: _Tree | None = None,
        train: tuple[str, bool] | None = None,
        rng: str | None = None,
        remat_policy: Callable | None = None,
    ) -> None:
        self.fn, self.name = fn, name
        self.remat_policy = remat_policy
        self.params, self.state = params, state
        self.train, self.rng = train, rng
        self.rng_impl = jax.random.key_impl(jax.random.key(0)) if rng else None
        self._fns: dict[tuple, _JaxFn] = {}
        self.views: _Views = {}
        self.handle = _SpecHandle(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def jax_fn(self, sig: tuple, training: bool) -> _JaxFn:
        """The JAX function for one call signature (and mode, if `fn` takes one)."""
        key = (sig, training and self.train is not None)
        jfn = self._fns.get(key)
        if jfn is None:
            jfn = self._fns[key] = self._build(sig, training)
        return jfn

    def _build(self, sig: tuple, training: bool) -> _JaxFn:
        n_params = 0 if self.params is None else len(self.params.impls)
        n_state = 0 if self.state is None else len(self.state.impls)
        n_rng = 0 if self.rng is None else 1

        def flat(*xs: Any) -> tuple[list[Any], list[Any]]:
            lead = []
            if self.params is not None:
                lead.append(self.params.unflatten(xs[:n_params]))
            if self.state is not None:
                lead.append(self.state.unflatten(xs[n_params : n_params + n_state]))
            args, kwargs = _fill(sig, xs[n_params + n_state + n_rng :])
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
            leaves, out_def = jax.tree_util.tree_flatten(out)
            if jfn.out_def is not None and jfn.out_def != out_def:
                raise ValueError(
                    f"{self.name} returned {out_def} for these input shapes but "
                    f"{jfn.out_def} before; the output structure must not depend on shapes."
                )
            jfn.out_def = out_def
            return [_encode(x) for x in leaves], [*[_encode(x) for x in new_state], *new_key]

        jfn = _JaxFn(flat, self.name, self.remat_policy)
        jfn.views = self.views
        return jfn


class _SpecHandle:
    """A weak reference to a `_Spec`: what torch.compile sees of it.

    torch.compile keeps the constants of a compiled graph for as long as it
    keeps the graph (dynamo stores compiled functions in this module's
    globals, past the module they were compiled for); a strong reference there
    would keep the user's JAX function, and whatever it closes over, alive.
    """

    __slots__ = ("_ref", "__weakref__")

    def __init__(self, spec: _Spec) -> None:
        self._ref = weakref.ref(spec)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def spec(self) -> _Spec:
        spec = self._ref()
        if spec is None:
            raise RuntimeError(
                "bridge.jax_to_torch: this compiled graph calls a module (or torch function) "
                "that was deleted. Keep the module alive as long as graphs compiled from it run."
            )
        return spec


@torch._dynamo.nonstrict_trace
def _call_spec(
    handle: _SpecHandle,
    training: bool,
    params: list[torch.Tensor],
    state: list[torch.Tensor],
    args: tuple,
    kwargs: dict,
) -> tuple[Any, list[torch.Tensor]]:
    """Run `spec` on torch values; returns (output pytree, new state tensors).

    torch.compile does not trace into this function (JAX is opaque to it);
    its tracer runs it on fake tensors, where `_run` records the custom op.
    """
    tensors, sig = _split_args(args, kwargs)
    jfn = handle.spec().jax_fn(sig, training)
    outs = _run(jfn, [*params, *state, *tensors])
    n = jfn.n_primary
    return jax.tree_util.tree_unflatten(jfn.out_def, outs[:n]), outs[n:]


torch_pytree.register_constant(_SpecHandle)


# --------------------------------------------------------------------------
# The module


def _path_parts(path: tuple) -> list[str]:
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
        if _is_key(x):
            x = jax.random.key_data(x)
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
        spec: _Spec,
        params: Any,
        state: Any = None,
        *,
        seed: int | None = None,
        name_of: Callable[[tuple], list[str]] = _path_parts,
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
                p = nn.Parameter(t, requires_grad=t.is_floating_point() or t.is_complex())
                _remember_view(spec.views, p, to_jax(p) if a is None else a)
                made[id(leaf)] = p
            self._param_slots.append(self._register(parts, made[id(leaf)], "_parameters"))
        leaves = jax.tree_util.tree_flatten_with_path(state)[0] if state is not None else []
        for path, leaf in leaves:
            parts = name_of(path)
            t, a = _tensor_leaf(leaf, ".".join(parts) or "the root of state")
            _remember_view(spec.views, t, to_jax(t) if a is None else a)
            self._buffer_slots.append(self._register(parts, t, "_buffers"))
        if spec.rng is not None:
            key = jax.random.key_data(jax.random.key(seed or 0, impl=spec.rng_impl))
            t = to_torch(key)
            _remember_view(spec.views, t, key)
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
        out, new_state = _call_spec(self._spec.handle, self.training, params, state_in, args, kwargs)
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


def _keywords(fn: Callable) -> tuple[set[str], bool]:
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


def _train_spec(
    arg: str | None, names: set[str], var_kw: bool, fn_name: str
) -> tuple[str, bool] | None:
    name = _resolve(arg, names, var_kw, list(_TRAIN_NAMES), "train_arg", fn_name)
    return None if name is None else (name, _TRAIN_NAMES.get(name, False))


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


# --------------------------------------------------------------------------
# Flax


def _flax_kind(obj: Any) -> str | None:
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
    return _path_parts(path)


def _from_nnx(model: Any, remat_policy: Callable | None) -> JaxModule:
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

    spec = _Spec(
        apply,
        type(model).__name__,
        params=_Tree(params),
        state=_Tree(rest),
        train=("_train", False),
        remat_policy=remat_policy,
    )
    return JaxModule(spec, params, rest, name_of=_nnx_names)


def _from_linen(
    module: Any,
    variables: Any,
    train_arg: str | None,
    rng_streams: Sequence[str],
    seed: int,
    remat_policy: Callable | None,
) -> JaxModule:
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
    names, var_kw = _keywords(module.__call__)
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

    spec = _Spec(
        apply,
        type(module).__name__,
        params=_Tree(params),
        state=_Tree(state),
        train=_train_spec(train_arg, names, var_kw, type(module).__name__),
        rng="rng" if streams else None,
        remat_policy=remat_policy,
    )
    return JaxModule(spec, params, state, seed=seed)


# --------------------------------------------------------------------------
# The public entry point


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
    kind = _flax_kind(fn)
    if kind == "nnx":
        if params is not None or state is not None:
            raise TypeError(
                "jax_to_torch(nnx_module) takes no params or state: an nnx.Module carries its "
                "own. Call jax_to_torch(model)."
            )
        return _from_nnx(fn, remat_policy)
    if kind == "linen":
        if params is None:
            raise TypeError(
                f"jax_to_torch({type(fn).__name__}) needs the module's variables: "
                "jax_to_torch(module, module.init(key, *example_inputs))."
            )
        return _from_linen(fn, params, train_arg, rng_streams, seed, remat_policy)
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
        spec = _Spec(fn, name, remat_policy=remat_policy)

        @functools.wraps(fn)
        def torch_fn(*args: Any, **kwargs: Any) -> Any:
            return _call_spec(spec.handle, False, [], [], args, kwargs)[0]

        return torch_fn
    names, var_kw = _keywords(fn)
    spec = _Spec(
        fn,
        name,
        params=_Tree(params),
        state=None if state is None else _Tree(state),
        train=_train_spec(train_arg, names, var_kw, name),
        rng=_resolve(rng_arg, names, var_kw, _RNG_NAMES, "rng_arg", name),
        remat_policy=remat_policy,
    )
    return JaxModule(spec, params, state, seed=seed)
