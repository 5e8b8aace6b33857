"""Run torch itself behind a JAX primitive.

`wrap(fn)` turns a torch function into a JAX function. At run time JAX calls
torch: under `jax.jit` through `jax.experimental.buffer_callback`, which hands
torch the very device buffers JAX holds (DLPack, no copy); outside `jit`
through `bridge.to_torch` / `bridge.to_jax`, which share memory both ways.

Everything happens in one primitive, `torch_call`, whose only parameter is a
*kernel*: a torch function on flat tensors. Every JAX transformation maps a
kernel to another kernel built with `torch.func`, so the rules compose the way
JAX's own primitives do:

    vmap                  -> torch.func.vmap(kernel)          (batched once, no loop)
    jvp                   -> torch.func.jvp(kernel)           (linear in the tangents)
    transpose of the jvp  -> torch.func.vjp(kernel)           (so grad/vjp work)
    jvp/vmap of any of these -> the same rules again       (higher order)

`jax.grad` / `jax.vjp` take a shortcut so torch's forward runs once: the
forward runs under torch autograd and keeps its graph in a side table, keyed
by a small integer token that JAX carries as a residual to the backward call
(see `_SaveFwd`). Whenever that graph is missing (the table was trimmed, the
backward runs a second time, the forward was batched) the backward recomputes
it with `torch.func.vjp`, so the token is an optimisation, never a source of
truth.

Output shapes and dtypes come from running `fn` on fake tensors
(`FakeTensorMode`, no compute), cached per input signature; functions that a
fake run cannot follow (data-dependent control flow, custom ops with no fake
implementation) are run once on zeros instead, and every real run is checked
against the prediction.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from jax._src import core
from jax._src.interpreters import ad, batching, mlir
from jax._src.interpreters import partial_eval as pe
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

from bridge import dlpack, dtypes
from bridge.tree import register_jax_pytree

try:  # jax >= 0.7 on CPU and GPU
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older jax: pure_callback fallback
    _buffer_callback = None

#: "buffer_callback" (zero-copy: torch reads and writes XLA's buffers) or
#: "pure_callback" (inputs and outputs copied through host arrays).
TRANSPORT = "buffer_callback" if _buffer_callback is not None else "pure_callback"

__all__ = ["CallbackError", "wrap"]


class CallbackError(RuntimeError):
    """A wrapped torch function broke the contract of `bridge.callback.wrap`."""


# Platforms whose device buffers torch can read in place (through DLPack).
_PLATFORMS = frozenset({"cpu", "cuda", "rocm"})

#: At most this many torch autograd graphs wait for their backward call. When
#: more are pending (a `jax.vjp` whose `vjp_fn` is never called, a long scan)
#: the oldest are dropped and their backward recomputes the forward instead.
MAX_PENDING_GRAPHS = 256

#: ... and together they keep at most about this many bytes of activations
#: (saved tensors computed from the differentiated inputs; inputs and weights
#: are not counted). The newest graph is always kept, whatever its size.
MAX_PENDING_BYTES = 1 << 30


# --------------------------------------------------------------------------
# Avals and dtypes


def _aval(x: Any) -> core.ShapedArray:
    a = core.typeof(x)
    return core.ShapedArray(a.shape, a.dtype)


def _is_inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _out_jax_dtype(t_dtype: torch.dtype, where: str) -> np.dtype:
    """The JAX dtype of a torch output, following `bridge.dlpack`'s x64 rules."""
    if t_dtype in dtypes.WIDE_DTYPES and not dtypes.x64_enabled():
        if t_dtype in (torch.float64, torch.complex128):
            narrow = torch.float32 if t_dtype == torch.float64 else torch.complex64
            raise dlpack.X64Error(
                f"{where} is {t_dtype}, but JAX's x64 mode is off and narrowing to {narrow} "
                "would change its values. Enable 64-bit JAX with "
                "`jax.config.update('jax_enable_x64', True)`, or return `.to("
                f"{narrow})` from the torch function."
            )
        # int64/uint64 are narrowed at run time, with a range check.
        return np.dtype(np.int32 if t_dtype == torch.int64 else np.uint32)
    return dtypes.to_jax_dtype(t_dtype)


def _torch_device() -> str:
    return "cuda" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"


def _fn_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name and name.startswith("_VariableFunctionsClass."):  # torch.sin and friends
        return "torch." + fn.__name__
    return name or type(fn).__name__


# --------------------------------------------------------------------------
# Kernels: torch functions on flat tensors, the parameter of `torch_call_p`
#
# A kernel is hashed by identity; derived kernels are memoised on their parent,
# so tracing the same function twice gives the same primitive parameters and
# jit's caches hit.


class _Kernel:
    """A torch computation on a flat list of tensors.

    Attributes:
        n_in: number of inputs.
        n_nonlinear: for kernels linear in their trailing inputs, how many
            leading inputs are not linear; None for non-linear kernels.
    """

    n_in: int
    n_nonlinear: int | None = None
    _derived: dict

    def run(self, *tensors: torch.Tensor) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def out_avals(self, in_avals: Sequence[core.ShapedArray]) -> tuple[core.ShapedArray, ...]:
        raise NotImplementedError

    def derivable(self) -> tuple[_Kernel, tuple[int, ...]]:
        """A kernel that torch.func can transform, and which inputs it takes.

        Kernels that use a saved autograd graph are not pure functions of
        their inputs; their derivatives use the recomputing equivalent.
        """
        return self, tuple(range(self.n_in))

    def transposed(
        self, lin_avals: Sequence[core.ShapedArray], n_cts: int
    ) -> tuple[_Kernel, tuple[int, ...]]:
        """The transpose of a linear kernel and the non-linear inputs it takes."""
        raise NotImplementedError(f"bridge.callback: {self} is not linear; it cannot be transposed")

    def _memo(self, key: Any, make: Callable[[], _Kernel]) -> _Kernel:
        try:
            derived = self._derived
        except AttributeError:
            derived = self._derived = {}
        k = derived.get(key)
        if k is None:
            k = derived[key] = make()
        return k


class _Call(_Kernel):
    """The user's function: rebuilds the argument pytree around the tensors."""

    def __init__(
        self, fn: Callable[..., Any], in_tree: Any, mask: tuple[bool, ...], statics: tuple
    ):
        self.fn = fn
        self.in_tree = in_tree
        self.mask = mask
        self.statics = statics
        self.n_in = sum(mask)
        self.name = _fn_name(fn)
        # fn(*tensors) needs no pytree rebuilding: the common, fast case.
        self.positional = in_tree == jax.tree_util.tree_structure(((0,) * self.n_in, {}))
        self._infos: dict[tuple, _OutInfo] = {}
        self._grad_checked: set[tuple] = set()
        self.save_graphs = True  # turned off if torch refuses saved-tensor hooks

    def __repr__(self) -> str:
        return self.name

    def call_tree(self, tensors: Sequence[Any]) -> Any:
        if self.positional:
            return self.fn(*tensors)
        it = iter(tensors)
        statics = iter(self.statics)
        leaves = [next(it) if m else next(statics) for m in self.mask]
        args, kwargs = jax.tree_util.tree_unflatten(self.in_tree, leaves)
        return self.fn(*args, **kwargs)

    def run(self, *tensors: torch.Tensor) -> Sequence[torch.Tensor]:
        return self.flatten_out(self.call_tree(tensors))

    @staticmethod
    def flatten_out(out: Any) -> Sequence[torch.Tensor]:
        if isinstance(out, torch.Tensor):
            return (out,)
        return [x for x in torch_pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]

    def info(self, in_avals: Sequence[core.ShapedArray]) -> _OutInfo:
        key = (dtypes.x64_enabled(), *((a.shape, a.dtype) for a in in_avals))
        info = self._infos.get(key)
        if info is None:
            info = self._infos[key] = self._infer(in_avals)
        return info

    def out_avals(self, in_avals: Sequence[core.ShapedArray]) -> tuple[core.ShapedArray, ...]:
        return self.info(in_avals).avals

    def _infer(self, in_avals: Sequence[core.ShapedArray]) -> _OutInfo:
        device = _torch_device()
        specs = [(a.shape, dtypes.to_torch_dtype(a.dtype)) for a in in_avals]
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
                out = self.call_tree([torch.empty(s, dtype=d, device=device) for s, d in specs])
        except DynamicOutputShapeException as e:
            raise CallbackError(
                f"the shape of an output of {self.name} depends on the values of its inputs "
                f"({e}: nonzero, masked indexing, unique, ...). A JAX primitive needs output "
                "shapes known from input shapes alone; pad to a fixed size (e.g. "
                "`torch.where(mask, x, 0)`) or return a mask instead."
            ) from e
        except Exception as fake_error:  # data-dependent control flow, ops without fake kernels
            try:
                with torch.no_grad():
                    out = self.call_tree([torch.zeros(s, dtype=d, device=device) for s, d in specs])
            except Exception as real_error:
                raise CallbackError(
                    f"bridge.callback could not find the output shapes of {self.name}: a "
                    f"fake-tensor run failed ({type(fake_error).__name__}: {fake_error}) and a "
                    f"run on zeros failed ({type(real_error).__name__}: {real_error})."
                ) from real_error
        leaves, spec = torch_pytree.tree_flatten(out)
        avals = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                where = f"output {i} of {self.name} (shape {tuple(leaf.shape)})"
                avals.append(core.ShapedArray(tuple(leaf.shape), _out_jax_dtype(leaf.dtype, where)))
        _register_dataclass_nodes(spec)
        return _OutInfo(
            avals=tuple(avals),
            spec=spec,
            static_leaves=tuple(None if isinstance(x, torch.Tensor) else x for x in leaves),
            is_tensor=tuple(isinstance(x, torch.Tensor) for x in leaves),
        )

    def check_differentiable(
        self, in_avals: Sequence[core.ShapedArray], diff: tuple[int, ...], out_diff: tuple[int, ...]
    ) -> None:
        """Raise `CallbackError` now (at trace time) if torch cannot take this
        gradient because an op has no autograd formula.

        Under `jax.jit` the backward runs inside XLA, where a torch error
        surfaces as an opaque `JaxRuntimeError: INTERNAL`; a forward and
        backward on fake tensors (no compute) finds the missing formula first.
        Other failures are left to the real run, which reports them.
        """
        key = (tuple((a.shape, a.dtype) for a in in_avals), diff, out_diff)
        if key in self._grad_checked:
            return
        device = _torch_device()
        specs = [(a.shape, dtypes.to_torch_dtype(a.dtype)) for a in in_avals]
        try:
            with FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad():
                xs = [torch.zeros(s, dtype=d, device=device) for s, d in specs]
                for i in diff:
                    xs[i].requires_grad_(True)
                outs = self.run(*xs)
                pairs = [(outs[j], torch.ones_like(outs[j])) for j in out_diff]
                pairs = [(o, c) for o, c in pairs if o.requires_grad]
                if pairs:
                    torch.autograd.grad(
                        [o for o, _ in pairs],
                        [xs[i] for i in diff],
                        [c for _, c in pairs],
                        allow_unused=True,
                    )
        except RuntimeError as e:
            error = _no_formula_error(self, e)
            if error is not None:
                raise error from e
        except Exception:  # noqa: BLE001 -- a fake run it cannot follow: checked at run time
            pass
        self._grad_checked.add(key)

    def save_fwd(self, diff: tuple[int, ...], out_diff: tuple[int, ...]) -> _SaveFwd:
        return self._memo(("save", diff, out_diff), lambda: _SaveFwd(self, diff, out_diff))


@dataclasses.dataclass(frozen=True)
class _OutInfo:
    avals: tuple[core.ShapedArray, ...]
    spec: Any  # torch pytree spec of fn's output
    static_leaves: tuple  # non-tensor output leaves (None where a tensor is)
    is_tensor: tuple[bool, ...]


def _register_dataclass_nodes(spec: Any) -> None:
    """Make dataclass outputs (transformers' ModelOutput) JAX pytrees too."""
    stack = [spec]
    while stack:
        s = stack.pop()
        if s.type is not None and dataclasses.is_dataclass(s.type):
            register_jax_pytree(s.type)
        stack.extend(s.children() if hasattr(s, "children") else s.children_specs)


def _splice(xs: Sequence[Any], idx: Sequence[int], values: Sequence[Any]) -> list[Any]:
    full = list(xs)
    for i, v in zip(idx, values, strict=True):
        full[i] = v
    return full


def _conj(ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    # torch's cotangents are the complex conjugates of JAX's.
    return tuple(t.conj() if t.is_complex() else t for t in ts)


class _Jvp(_Kernel):
    """(xs, tangents of xs[diff]) -> tangents of outputs[out_diff]: torch.func.jvp."""

    def __init__(self, base: _Kernel, diff: tuple[int, ...], out_diff: tuple[int, ...]):
        self.base, self.diff, self.out_diff = base, diff, out_diff
        self.n_in = base.n_in + len(diff)
        self.n_nonlinear = base.n_in

    @staticmethod
    def of(base: _Kernel, diff: tuple[int, ...], out_diff: tuple[int, ...]) -> _Jvp:
        return base._memo(("jvp", diff, out_diff), lambda: _Jvp(base, diff, out_diff))

    def __repr__(self) -> str:
        return f"jvp({self.base!r})"

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        xs, ts = args[: self.base.n_in], args[self.base.n_in :]
        return list(_torch_jvp(self.base, self.diff, self.out_diff, xs, ts))

    def out_avals(self, in_avals):
        outs = self.base.out_avals(in_avals[: self.base.n_in])
        return tuple(outs[j] for j in self.out_diff)

    def transposed(self, lin_avals, n_cts):
        return _Vjp.of(self.base, self.diff, self.out_diff), tuple(range(self.n_nonlinear))


class _Vjp(_Kernel):
    """(xs, cotangents of outputs[out_diff]) -> cotangents of xs[diff]: torch.func.vjp."""

    def __init__(self, base: _Kernel, diff: tuple[int, ...], out_diff: tuple[int, ...]):
        self.base, self.diff, self.out_diff = base, diff, out_diff
        self.n_in = base.n_in + len(out_diff)
        self.n_nonlinear = base.n_in

    @staticmethod
    def of(base: _Kernel, diff: tuple[int, ...], out_diff: tuple[int, ...]) -> _Vjp:
        return base._memo(("vjp", diff, out_diff), lambda: _Vjp(base, diff, out_diff))

    def __repr__(self) -> str:
        return f"vjp({self.base!r})"

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        xs, cts = args[: self.base.n_in], args[self.base.n_in :]
        return _converting_no_formula(
            self.base, lambda: _torch_vjp(self.base, self.diff, self.out_diff, xs, cts, False)
        )

    def out_avals(self, in_avals):
        return tuple(in_avals[i] for i in self.diff)

    def transposed(self, lin_avals, n_cts):
        return _Jvp.of(self.base, self.diff, self.out_diff), tuple(range(self.n_nonlinear))


def _restricted(base: _Kernel, diff, out_diff, xs):
    def f(*d: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = base.run(*_splice(xs, diff, d))
        return tuple(outs[j] for j in out_diff)

    return f


def _torch_jvp(base, diff, out_diff, xs, ts) -> tuple[torch.Tensor, ...]:
    f = _restricted(base, diff, out_diff, xs)
    primals, ts = tuple(xs[i] for i in diff), tuple(ts)
    try:
        return torch.func.jvp(f, primals, ts, strict=True)[1]
    except RuntimeError as e:
        if "independent of the inputs" not in str(e):
            raise
    # Some output has no tangent. torch.func.jvp would call it zero, which is
    # wrong when the output does depend on the inputs through an op with no
    # forward-mode formula (a custom op): tell those apart with reverse mode.
    outs, dependent = _reverse_tracked(f, primals)
    touts = [torch.zeros_like(o) for o in outs]
    if dependent:
        try:
            _, some = torch.func.jvp(
                lambda *p: tuple(f(*p)[j] for j in dependent), primals, ts, strict=True
            )
        except RuntimeError as e:
            if "independent of the inputs" not in str(e):
                raise
            raise CallbackError(
                f"torch has no forward-mode derivative for {base!r}: an output depends on the "
                "inputs, but torch.func.jvp gave it no tangent (an op without a forward-mode "
                "formula, such as a torch.library.custom_op with only register_autograd). "
                "jax.jvp, jax.jacfwd and jax.linearize cannot go through it; jax.grad, jax.vjp "
                "and jax.jacrev can."
            ) from e
        for j, t in zip(dependent, some, strict=True):
            touts[j] = t
    return tuple(touts)


def _tracking(f):
    """f, recording which outputs torch's reverse mode connects to the inputs."""
    tracked: list[int] = []

    def g(*p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = f(*p)
        tracked[:] = [j for j, o in enumerate(outs) if o.requires_grad]
        return outs

    return g, tracked


_NO_FORMULA = re.compile(r"backward through (\S+) but no autograd formula")


def _no_formula_error(base: Any, e: BaseException) -> CallbackError | None:
    """A clear error for torch's "no autograd formula" failure, or None for others."""
    match = _NO_FORMULA.search(str(e))
    if match is None:
        return None
    op = match.group(1)
    parts = op.split(".")
    name = f"{parts[0]}::{parts[1]}" if len(parts) >= 2 else op
    return CallbackError(
        f"cannot differentiate {base!r}: it calls the torch op {op}, which has no autograd "
        f"formula, so torch cannot give jax.grad / jax.vjp its gradient. Register one with "
        f"`torch.library.register_autograd({name!r}, backward, setup_context=...)`, or keep "
        "the gradient out of the call: `jax.lax.stop_gradient` on its inputs, or differentiate "
        "only with respect to arguments it does not depend on."
    )


def _converting_no_formula(base: Any, run: Callable[[], Any]) -> Any:
    try:
        return run()
    except RuntimeError as e:
        error = _no_formula_error(base, e)
        if error is None:
            raise
        raise error from e


def _func_refused(e: RuntimeError) -> bool:
    """torch.func refuses old-style autograd.Functions, which is how
    torch.library custom ops with `register_autograd` differentiate; plain
    autograd accepts them."""
    if isinstance(e, CallbackError):
        return isinstance(e, _TorchFuncRefused)
    return "with functorch transforms" in str(e)


class _TorchFuncRefused(CallbackError):
    """torch.func refused code inside another torch.func transform; the outer
    level may still manage with plain autograd."""


def _outside_torch_func() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is None


def _reverse_tracked(f, primals) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    """f's outputs, and which of them torch's reverse mode connects to the inputs."""
    g, tracked = _tracking(f)
    try:
        outs, _ = torch.func.vjp(g, *primals)
    except RuntimeError as e:
        if not _func_refused(e) or not _outside_torch_func():
            raise
        with torch.enable_grad():  # code torch.func cannot enter: plain autograd
            outs = tuple(o.detach() for o in g(*(p.detach().requires_grad_(True) for p in primals)))
    return outs, tracked


def _torch_vjp(base, diff, out_diff, xs, cts, batched: bool) -> list[torch.Tensor]:
    f = _restricted(base, diff, out_diff, xs)
    primals = tuple(xs[i] for i in diff)
    g, tracked = _tracking(f)
    try:
        _, vjp_fn = torch.func.vjp(g, *primals)
    except RuntimeError as e:
        if not _func_refused(e):
            raise
        return _autograd_vjp(base, g, tracked, primals, cts, batched, e)
    if len(tracked) < len(out_diff):
        _check_untracked(base, f, primals, [j for j in range(len(out_diff)) if j not in tracked])
    if batched:  # cotangents carry a leading batch axis; one forward for all of them
        grads = torch.func.vmap(lambda *c: vjp_fn(_conj(c)))(*cts)
    else:
        grads = vjp_fn(_conj(cts))
    return list(_conj(grads))


def _autograd_vjp(base, g, tracked, primals, cts, batched, func_error) -> list[torch.Tensor]:
    """The vjp with plain torch autograd, for code torch.func refuses. Works
    only outside torch.func transforms, that is for first-order reverse mode."""
    if not _outside_torch_func():  # detaching here would cut the outer transform's graph
        raise _TorchFuncRefused(
            f"torch.func cannot differentiate {base!r} ({func_error}); only first-order "
            "jax.grad / jax.vjp / jax.jacrev, which use plain torch autograd, can."
        ) from func_error
    with torch.enable_grad():
        # Inside an outer plain-autograd vjp the primals already carry its graph:
        # differentiate through them instead of cutting it.
        leaves = [p if p.requires_grad else p.detach().requires_grad_(True) for p in primals]
        outs = g(*leaves)
    cts = _conj(cts)
    grads: Sequence[torch.Tensor | None] = [None] * len(leaves)
    if tracked:
        grads = torch.autograd.grad(
            [outs[j] for j in tracked],
            leaves,
            [cts[j] for j in tracked],
            allow_unused=True,
            is_grads_batched=batched,
            # nested in another plain-autograd vjp (a second derivative): keep the graph
            create_graph=torch.is_grad_enabled(),
        )
    batch = (cts[0].shape[0],) if batched and cts else ()
    return list(_conj([_zeros_if_none(d, x, batch) for d, x in zip(grads, leaves, strict=True)]))


def _zeros_if_none(grad: torch.Tensor | None, x: torch.Tensor, batch: tuple[int, ...]):
    if grad is None:
        return torch.zeros((*batch, *x.shape), dtype=x.dtype, device=x.device)
    return grad


def _check_untracked(base, f, primals, untracked: list[int]) -> None:
    """Outputs that torch's reverse mode does not connect to the inputs get a
    zero cotangent from torch.func.vjp. That is right for a constant or a
    detached output, and wrong for one computed through code that reverse mode
    cannot see into a second time (a @once_differentiable backward, where
    torch.func silently returns zeros). Forward mode tells them apart."""
    try:
        torch.func.jvp(
            lambda *p: tuple(f(*p)[j] for j in untracked),
            primals,
            tuple(torch.ones_like(p) for p in primals),
            strict=True,
        )
    except RuntimeError as e:
        if "independent of the inputs" in str(e):
            return  # constant or detached: zero is the right answer
        raise CallbackError(
            f"torch cannot differentiate {base!r} here: its reverse mode gives an output no "
            "derivative (an op such as a @once_differentiable autograd.Function, which torch "
            f"differentiates only once), and its forward mode fails: {e}"
        ) from e
    raise CallbackError(
        f"torch cannot differentiate {base!r} here: its reverse mode gives an output no "
        "derivative although forward mode finds one (an op such as a @once_differentiable "
        "autograd.Function, which torch differentiates only once). Refusing to return zeros."
    )


class _Vmap(_Kernel):
    """torch.func.vmap of a kernel; every output is batched along axis 0."""

    def __init__(self, base: _Kernel, in_dims: tuple[int | None, ...]):
        self.base, self.in_dims = base, in_dims
        self.n_in = base.n_in
        self.n_nonlinear = base.n_nonlinear
        self._vmapped = torch.func.vmap(self._run_base, in_dims=in_dims, out_dims=0)

    @staticmethod
    def of(base: _Kernel, in_dims: tuple[int | None, ...]) -> _Vmap:
        return base._memo(("vmap", in_dims), lambda: _Vmap(base, in_dims))

    def __repr__(self) -> str:
        return f"vmap({self.base!r}, in_dims={self.in_dims})"

    def _run_base(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.base.run(*xs))

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        try:
            return list(self._vmapped(*args))
        except RuntimeError as e:
            if "vmap" not in str(e):
                raise
            raise CallbackError(
                f"torch.func.vmap could not batch {self.base!r} (jax.vmap runs the torch "
                f"function once on the whole batch through torch.func.vmap): {e}"
            ) from e

    def out_avals(self, in_avals):
        sizes = {a.shape[d] for a, d in zip(in_avals, self.in_dims, strict=True) if d is not None}
        (size,) = sizes
        inner = [
            a if d is None else core.ShapedArray(a.shape[:d] + a.shape[d + 1 :], a.dtype)
            for a, d in zip(in_avals, self.in_dims, strict=True)
        ]
        return tuple(
            core.ShapedArray((size, *a.shape), a.dtype) for a in self.base.out_avals(inner)
        )

    def transposed(self, lin_avals, n_cts):
        n = self.n_nonlinear
        nonlin_dims, lin_dims = self.in_dims[:n], self.in_dims[n:]
        inner_lin = [
            a if d is None else core.ShapedArray(a.shape[:d] + a.shape[d + 1 :], a.dtype)
            for a, d in zip(lin_avals, lin_dims, strict=True)
        ]
        inner_t, keep = self.base.transposed(inner_lin, n_cts)
        kernel = _VmapT(inner_t, tuple(nonlin_dims[i] for i in keep), lin_dims, tuple(lin_avals))
        return kernel, keep


class _VmapT(_Kernel):
    """Transpose of a vmapped linear kernel: vmap the transpose, then sum over
    the batch the cotangents of inputs that were not batched."""

    def __init__(self, inner_t: _Kernel, nonlin_dims, lin_dims, lin_avals):
        self.inner_t, self.nonlin_dims, self.lin_dims = inner_t, nonlin_dims, lin_dims
        self.lin_avals = lin_avals
        self.n_nonlinear = len(nonlin_dims)
        self.n_in = inner_t.n_in
        n_cts = inner_t.n_in - self.n_nonlinear
        self._vmap = _Vmap.of(inner_t, tuple(nonlin_dims) + (0,) * n_cts)

    def __repr__(self) -> str:
        return f"transpose({self._vmap!r})"

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        outs = self._vmap.run(*args)
        return [
            o.sum(0) if d is None else o.movedim(0, d)
            for o, d in zip(outs, self.lin_dims, strict=True)
        ]

    def out_avals(self, in_avals):
        return self.lin_avals

    def transposed(self, lin_avals, n_cts):
        return _GenericT.of(self, tuple(lin_avals), n_cts)


class _GenericT(_Kernel):
    """Transpose of any linear kernel L: the vjp of L in its linear inputs, at zero."""

    def __init__(self, lin: _Kernel, lin_avals: tuple[core.ShapedArray, ...], n_cts: int):
        self.lin, self.lin_avals = lin, lin_avals
        self.n_nonlinear = lin.n_nonlinear
        self.n_in = lin.n_nonlinear + n_cts

    @staticmethod
    def of(lin: _Kernel, lin_avals: tuple[core.ShapedArray, ...], n_cts: int) -> tuple:
        k = lin._memo(("T", lin_avals, n_cts), lambda: _GenericT(lin, lin_avals, n_cts))
        return k, tuple(range(lin.n_nonlinear))

    def __repr__(self) -> str:
        return f"transpose({self.lin!r})"

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        nonlin, cts = args[: self.n_nonlinear], args[self.n_nonlinear :]
        device = cts[0].device if cts else None
        zeros = [
            torch.zeros(a.shape, dtype=dtypes.to_torch_dtype(a.dtype), device=device)
            for a in self.lin_avals
        ]
        _, vjp_fn = torch.func.vjp(lambda *lin: tuple(self.lin.run(*nonlin, *lin)), *zeros)
        return list(_conj(vjp_fn(_conj(cts))))

    def out_avals(self, in_avals):
        return self.lin_avals

    def transposed(self, lin_avals, n_cts):
        return _GenericT.of(self, tuple(lin_avals), n_cts)


# --------------------------------------------------------------------------
# Saved autograd graphs: one torch forward for jax.grad / jax.vjp


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


class _Graph:
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
        pairs = [(o, c) for o, c in zip(self.outputs, _conj(cts), strict=True) if o is not None]
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
            _conj([_zeros_if_none(g, x, batch) for g, x in zip(grads, self.inputs, strict=True)])
        )


class _GraphTable:
    def __init__(self) -> None:
        self._graphs: collections.OrderedDict[int, _Graph] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.nbytes = 0

    def put(self, graph: _Graph) -> int:
        with self._lock:
            token = next(self._ids) % (2**31 - 1) or next(self._ids)
            self._graphs[token] = graph
            self.nbytes += graph.nbytes
            while len(self._graphs) > MAX_PENDING_GRAPHS or (
                self.nbytes > MAX_PENDING_BYTES and len(self._graphs) > 1
            ):
                self.nbytes -= self._graphs.popitem(last=False)[1].nbytes
            return token

    def take(self, token: int) -> _Graph | None:
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


_GRAPHS = _GraphTable()
_NO_GRAPH = -1
_NOT_MAPPED = getattr(batching, "not_mapped", None)


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class _SaveFwd(_Kernel):
    """xs -> (outputs, token): the forward of `base` under torch autograd, with
    its graph kept in `_GRAPHS` for `_SavedVjp`."""

    def __init__(self, base: _Call, diff: tuple[int, ...], out_diff: tuple[int, ...]):
        self.base, self.diff, self.out_diff = base, diff, out_diff
        self.n_in = base.n_in

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
        return [*outs, _token_tensor(_NO_GRAPH, xs)]

    def _run_saving(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        by_storage = {}
        for i, x in enumerate(xs):
            ptr = _storage_ptr(x)
            if ptr:
                by_storage[ptr] = i
        # A weak reference: the saved-tensor hooks live inside the autograd
        # graph, which the _Graph holds; a strong one would close a cycle through
        # C++ that Python's collector cannot see, and the graph (inputs, saved
        # activations) would never be freed.
        graph_ref: list[weakref.ref[_Graph]] = []
        activations: dict[int | None, int] = {}  # storage -> bytes, for the byte budget

        def pack(t: torch.Tensor) -> Any:
            ptr = _storage_ptr(t)
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
            outs = self.base.run(*_splice(xs, self.diff, leaves))
        saved = [outs[j] if outs[j].requires_grad else None for j in self.out_diff]
        graph = _Graph(leaves, saved)
        graph.nbytes = sum(activations.values())
        graph_ref.append(weakref.ref(graph))
        token = _GRAPHS.put(graph)
        return [*(o.detach() for o in outs), _token_tensor(token, xs)]

    def out_avals(self, in_avals):
        return (*self.base.out_avals(in_avals), core.ShapedArray((), np.dtype(np.int32)))


def _token_tensor(token: int, like: Sequence[torch.Tensor]) -> torch.Tensor:
    # torch.full, not torch.tensor: on a GPU it is a fill kernel on the current
    # (XLA's) stream rather than a synchronous host-to-device copy.
    return torch.full((), token, dtype=torch.int32, device=like[0].device if like else None)


class _SavedJvp(_Kernel):
    """(xs, token, tangents) -> output tangents. The linear half of `_SaveFwd`;
    JAX transposes it into `_SavedVjp`. Run forward, it recomputes."""

    def __init__(self, base: _Call, diff, out_diff):
        self.base, self.diff, self.out_diff = base, diff, out_diff
        self.n_in = base.n_in + 1 + len(diff)
        self.n_nonlinear = base.n_in + 1

    @staticmethod
    def of(base: _Call, diff, out_diff) -> _SavedJvp:
        return base._memo(("saved_jvp", diff, out_diff), lambda: _SavedJvp(base, diff, out_diff))

    def __repr__(self) -> str:
        return f"jvp({self.base!r})"

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        n = self.base.n_in
        return list(_torch_jvp(self.base, self.diff, self.out_diff, args[:n], args[n + 1 :]))

    def out_avals(self, in_avals):
        outs = self.base.out_avals(in_avals[: self.base.n_in])
        return tuple(outs[j] for j in self.out_diff)

    def derivable(self):
        n = self.base.n_in
        return _Jvp.of(self.base, self.diff, self.out_diff), (*range(n), *range(n + 1, self.n_in))

    def transposed(self, lin_avals, n_cts):
        return _SavedVjp.of(self.base, self.diff, self.out_diff, False), tuple(
            range(self.n_nonlinear)
        )


class _SavedVjp(_Kernel):
    """(xs, token, output cotangents) -> input cotangents, through the graph
    that `_SaveFwd` kept, or recomputed with torch.func.vjp when it is gone.
    With `batched`, the cotangents carry a leading batch axis (jacrev)."""

    def __init__(self, base: _Call, diff, out_diff, batched: bool):
        self.base, self.diff, self.out_diff, self.batched = base, diff, out_diff, batched
        self.n_in = base.n_in + 1 + len(out_diff)
        self.n_nonlinear = base.n_in + 1

    @staticmethod
    def of(base: _Call, diff, out_diff, batched: bool) -> _SavedVjp:
        return base._memo(
            ("saved_vjp", diff, out_diff, batched),
            lambda: _SavedVjp(base, diff, out_diff, batched),
        )

    def __repr__(self) -> str:
        return f"{'batched_' if self.batched else ''}vjp({self.base!r})"

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        n = self.base.n_in
        xs, token, cts = args[:n], int(args[n]), args[n + 1 :]
        graph = _GRAPHS.take(token) if token != _NO_GRAPH else None
        if graph is not None:
            return _converting_no_formula(self.base, lambda: graph.backward(xs, cts, self.batched))
        return _converting_no_formula(
            self.base,
            lambda: _torch_vjp(self.base, self.diff, self.out_diff, xs, cts, self.batched),
        )

    def out_avals(self, in_avals):
        n = self.base.n_in
        batch = (in_avals[n + 1].shape[0],) if self.batched else ()
        return tuple(
            core.ShapedArray((*batch, *in_avals[i].shape), in_avals[i].dtype) for i in self.diff
        )

    def derivable(self):
        n = self.base.n_in
        vjp = _Vjp.of(self.base, self.diff, self.out_diff)
        if self.batched:
            vjp = _Vmap.of(vjp, (None,) * n + (0,) * len(self.out_diff))
        return vjp, (*range(n), *range(n + 1, self.n_in))

    def transposed(self, lin_avals, n_cts):
        n = self.base.n_in
        jvp = _Jvp.of(self.base, self.diff, self.out_diff)
        if self.batched:
            jvp = _Vmap.of(jvp, (None,) * n + (0,) * len(self.diff))
        return jvp, tuple(range(n))


# --------------------------------------------------------------------------
# Running a kernel on tensors (shared by the eager and the jit paths)


def _expected(out_avals: Sequence[core.ShapedArray]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(a.shape), dtypes.to_torch_dtype(a.dtype)) for a in out_avals]


def _runner(
    kernel: _Kernel, expected: Sequence[tuple[tuple[int, ...], torch.dtype]]
) -> Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]:
    """`tensors -> outputs` for one kernel and signature, with the checks that
    keep JAX's promises: no writes into its buffers, the predicted shapes.

    This is the per-call hot path: plain loops, no context managers, and for
    the common case (fn(*tensors) returning one tensor) no pytree walking.
    """
    is_grad_enabled, set_grad_enabled = torch.is_grad_enabled, torch._C._set_grad_enabled
    run = kernel.run
    if isinstance(kernel, _Call) and kernel.positional and len(expected) == 1:
        fn, tensor_type = kernel.fn, torch.Tensor
        ((shape, dtype),) = expected

        def execute_one(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
            versions = [t._version for t in tensors]
            grad_was_enabled = is_grad_enabled()
            set_grad_enabled(False)
            try:
                out = fn(*tensors)
            finally:
                set_grad_enabled(grad_was_enabled)
            if [t._version for t in tensors] != versions:
                _raise_written(kernel, tensors, versions)
            if type(out) is tensor_type and out.shape == shape and out.dtype == dtype:
                return (out,)
            outs = kernel.flatten_out(out)
            check(outs)
            return outs

    def check(outs: Sequence[torch.Tensor]) -> None:
        if len(outs) != len(expected):
            raise CallbackError(
                f"{kernel!r} returned {len(outs)} tensors, but its shape inference found "
                f"{len(expected)}. The structure of the output must depend only on the input "
                "shapes, dtypes and static arguments."
            )
        for o, (shape, dtype) in zip(outs, expected, strict=True):
            if o.shape != shape or (o.dtype != dtype and not _narrows(o.dtype, dtype)):
                _raise_mismatch(kernel, outs, expected)

    def execute(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        versions = [t._version for t in tensors]
        grad_was_enabled = is_grad_enabled()
        set_grad_enabled(False)
        try:
            outs = run(*tensors)
        finally:
            set_grad_enabled(grad_was_enabled)
        if [t._version for t in tensors] != versions:
            _raise_written(kernel, tensors, versions)
        check(outs)
        return outs

    if isinstance(kernel, _Call) and kernel.positional and len(expected) == 1:
        return execute_one
    return execute


def _raise_written(kernel: _Kernel, tensors: Sequence[torch.Tensor], versions: list[int]) -> None:
    i = next(i for i, t in enumerate(tensors) if t._version != versions[i])
    raise CallbackError(
        f"{kernel!r} wrote in place into its input {i} (shape {tuple(tensors[i].shape)}), "
        "which is a JAX array's buffer; JAX arrays are immutable, and this one now holds "
        "the written values. Write into a clone (`x = x.clone()`) instead."
    )


def _raise_mismatch(kernel: _Kernel, outs: Sequence[torch.Tensor], expected) -> None:
    for i, (o, (shape, dtype)) in enumerate(zip(outs, expected, strict=True)):
        if o.shape != shape or (o.dtype != dtype and not _narrows(o.dtype, dtype)):
            raise CallbackError(
                f"{kernel!r} returned output {i} with shape {tuple(o.shape)} and dtype "
                f"{o.dtype}, but its shape inference predicted {shape} and {dtype}. Output "
                "shapes and dtypes must depend only on the input shapes, dtypes and static "
                "arguments."
            )


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    return (src, dst) in ((torch.int64, torch.int32), (torch.uint64, torch.uint32))


def _check_fits(t: torch.Tensor, dst: torch.dtype) -> None:
    bad = dlpack.values_outside(t, t.to(dst))
    if bad is not None:
        raise dlpack.X64Error(
            f"a torch output of dtype {t.dtype} holds {bad}, outside the range of {dst}, and "
            "JAX's x64 mode is off, so JAX cannot hold them. Enable 64-bit JAX with "
            "`jax.config.update('jax_enable_x64', True)`."
        )


def _write(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.dtype != dst.dtype:
        _check_fits(src, dst.dtype)
    dst.copy_(src)


# --------------------------------------------------------------------------
# The primitive

torch_call_p = core.Primitive("torch_call")
torch_call_p.multiple_results = True


def _abstract_eval(*avals: core.ShapedArray, kernel: _Kernel) -> tuple[core.ShapedArray, ...]:
    return kernel.out_avals([core.ShapedArray(a.shape, a.dtype) for a in avals])


def _impl(*args: Any, kernel: _Kernel) -> list[jax.Array]:
    """Outside jit: share the arrays with torch and torch's results with JAX."""
    arrays = [a if isinstance(a, jax.Array) else jnp.asarray(a) for a in args]
    out_avals = kernel.out_avals([_aval(a) for a in arrays])
    tensors = [dlpack.to_torch(a) for a in arrays]
    outs = _runner(kernel, _expected(out_avals))(tensors)
    in_storages = {_storage_ptr(t) for t in tensors}
    results = []
    for o, aval in zip(outs, out_avals, strict=True):
        if _storage_ptr(o) in in_storages:
            o = o.clone()  # never hand JAX a second array over an input's memory
        if o.dtype != dtypes.to_torch_dtype(aval.dtype):
            _check_fits(o, dtypes.to_torch_dtype(aval.dtype))
            o = o.to(dtypes.to_torch_dtype(aval.dtype))
        if not o.is_contiguous() and not _dlpack_imports_strides():
            o = o.contiguous()
        results.append(dlpack.to_jax(o))
    if isinstance(kernel, _SaveFwd):
        token = int(outs[-1])
        if _GRAPHS.adopt(token):  # keep the graph as long as JAX keeps the token
            weakref.finalize(results[-1], _GRAPHS.release, token)
    return results


@functools.cache
def _dlpack_imports_strides() -> bool:
    """Whether jax.dlpack.from_dlpack honours strides (jax 0.7.1 reads a
    transposed tensor as if it were contiguous, silently)."""
    t = torch.arange(6.0).reshape(2, 3).t()
    return bool(np.array_equal(np.asarray(jax.dlpack.from_dlpack(t)), t.numpy()))


def _host_callback(kernel: _Kernel, out_avals, platform: str) -> Callable[..., None]:
    """The function buffer_callback calls with XLA's own buffers."""
    expected = _expected(out_avals)
    if platform == "cpu":
        from_dlpack = torch._C._from_dlpack
        execute = _runner(kernel, expected)

        def callback(ctx: Any, outs: list[Any], *ins: Any) -> None:
            results = execute([from_dlpack(b.__dlpack__()) for b in ins])
            for b, r in zip(outs, results, strict=True):
                dst = from_dlpack(b.__dlpack__())
                if r.dtype is dst.dtype:
                    dst.copy_(r)
                else:
                    _write(dst, r)

        return callback

    execute = _runner(kernel, expected)

    def gpu_callback(ctx: Any, outs: list[Any], *ins: Any) -> None:
        # Run on XLA's stream: torch's kernels are ordered after the producers
        # of `ins` and before the consumers of `outs`; nothing synchronises.
        # The buffers are imported with that stream current, so DLPack's
        # producer and consumer streams are the same one.
        first = next(iter((*ins, *outs)), None)
        device = first.__dlpack_device__()[1] if first is not None else None
        with torch.cuda.device(device):
            stream = torch.cuda.ExternalStream(ctx.stream)
            with torch.cuda.stream(stream):
                results = execute([torch.from_dlpack(b) for b in ins])
                for b, r in zip(outs, results, strict=True):
                    _write(torch.from_dlpack(b), r)

    return gpu_callback


def _pure_host_fn(kernel: _Kernel, out_avals) -> Callable[..., list[np.ndarray]]:
    """pure_callback fallback: host arrays in, numpy arrays out (copied by JAX)."""
    expected = _expected(out_avals)
    execute = _runner(kernel, expected)

    def host(*arrays: Any) -> list[np.ndarray]:
        # Recent jax hands the callback jax.Arrays on the host, older jax numpy arrays.
        tensors = [
            dlpack.to_torch(a) if isinstance(a, jax.Array) else torch.from_numpy(np.array(a))
            for a in arrays
        ]
        results = execute(tensors)
        outs = []
        for r, (_, dtype) in zip(results, expected, strict=True):
            if r.dtype != dtype:
                _check_fits(r, dtype)
            outs.append(r.detach().to(dtype).cpu().resolve_conj().numpy())
        return outs

    return host


def _lowering(ctx: mlir.LoweringRuleContext, *args: Any, kernel: _Kernel) -> Sequence[Any]:
    platforms = ctx.module_context.platforms
    if len(platforms) != 1:
        raise NotImplementedError(
            f"bridge.callback: torch code cannot be lowered for several platforms at once "
            f"({', '.join(platforms)}); export for one platform."
        )
    platform = platforms[0]
    if platform not in _PLATFORMS:
        raise NotImplementedError(
            f"bridge.callback: {kernel!r} runs torch on the host, and JAX cannot call back into "
            f"Python from '{platform}' devices (TPU programs have no host callbacks that share "
            "device buffers). Use mode='trace' to translate the torch code to JAX, or run "
            "this part on the CPU."
        )
    out_avals = ctx.avals_out
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in out_avals]
    # XLA skips a pure custom call whose results hold no elements; such a call
    # must still run, so the check of torch's real output shapes happens.
    has_empty = any(0 in a.shape for a in out_avals)
    if _buffer_callback is not None:
        cb = _host_callback(kernel, out_avals, platform)

        def lowered(*xs: Any) -> Any:
            return _buffer_callback(cb, shapes, has_side_effect=has_empty)(*xs)

    else:
        host = _pure_host_fn(kernel, out_avals)

        def lowered(*xs: Any) -> Any:
            if has_empty:  # io_callback has an effect, so XLA cannot skip it
                from jax.experimental import io_callback

                return io_callback(host, shapes, *xs)
            return jax.pure_callback(host, shapes, *xs)

    return mlir.lower_fun(lowered, multiple_results=True)(ctx, *args)


def _zero_tangent(aval: core.ShapedArray) -> ad.Zero:
    return ad.Zero(aval.to_tangent_aval())


def _jvp_rule(primals: Sequence[Any], tangents: Sequence[Any], *, kernel: _Kernel):
    outs = torch_call_p.bind(*primals, kernel=kernel)
    out_avals = [_aval(o) for o in outs]
    if isinstance(kernel, _SaveFwd):  # the token has no tangent
        pure, keep = kernel.base, tuple(range(kernel.n_in))
    else:
        pure, keep = kernel.derivable()
    pargs = [primals[i] for i in keep]
    ptangents = [tangents[i] for i in keep]
    in_avals = [_aval(a) for a in pargs]
    diff = tuple(
        i
        for i, (a, t) in enumerate(zip(in_avals, ptangents, strict=True))
        if type(t) is not ad.Zero and _is_inexact(a.dtype)
    )
    pure_out = pure.out_avals(in_avals)
    out_diff = tuple(j for j, a in enumerate(pure_out) if _is_inexact(a.dtype))
    tangents_out = [_zero_tangent(a) for a in out_avals]
    if diff and out_diff:
        ts = [ad.instantiate_zeros(ptangents[i]) for i in diff]
        touts = torch_call_p.bind(*pargs, *ts, kernel=_Jvp.of(pure, diff, out_diff))
        for j, t in zip(out_diff, touts, strict=True):
            tangents_out[j] = t
    return outs, tangents_out


def _linearize_rule(is_vjp: bool, nonzeros: Sequence[bool], *primals: Any, kernel: _Kernel):
    """Reverse mode: run the forward once under torch autograd, keep its graph."""
    if is_vjp and isinstance(kernel, _Call):
        in_avals = [_aval(p) for p in primals]
        diff = tuple(
            i
            for i, (a, nz) in enumerate(zip(in_avals, nonzeros, strict=True))
            if nz and _is_inexact(a.dtype)
        )
        out_avals = kernel.out_avals(in_avals)
        out_diff = tuple(j for j, a in enumerate(out_avals) if _is_inexact(a.dtype))
        if diff and out_diff:
            kernel.check_differentiable(in_avals, diff, out_diff)
        if diff and out_diff and kernel.save_graphs:
            *outs, token = torch_call_p.bind(*primals, kernel=kernel.save_fwd(diff, out_diff))
            lin = _SavedJvp.of(kernel, diff, out_diff)

            def linearized(residuals: Sequence[Any], *tangents: Any) -> list[Any]:
                *xs, tok = residuals
                ts = [ad.instantiate_zeros(tangents[i]) for i in diff]
                touts = torch_call_p.bind(*xs, tok, *ts, kernel=lin)
                full = [_zero_tangent(a) for a in out_avals]
                for j, t in zip(out_diff, touts, strict=True):
                    full[j] = t
                return full

            nzs = [j in out_diff for j in range(len(out_avals))]
            return outs, nzs, [*primals, token], linearized
    if _LINEARIZE_HAS_IS_VJP:
        return ad.fallback_linearize_rule(torch_call_p, is_vjp, nonzeros, *primals, kernel=kernel)
    return ad.fallback_linearize_rule(torch_call_p, nonzeros, *primals, kernel=kernel)


def _transpose_rule(cts: Sequence[Any], *args: Any, kernel: _Kernel) -> list[Any]:
    n = kernel.n_nonlinear
    if n is None:
        raise NotImplementedError(f"bridge.callback: {kernel!r} is not linear; cannot transpose it")
    nonlin, lin = args[:n], args[n:]
    if any(ad.is_undefined_primal(x) for x in nonlin):
        raise NotImplementedError(
            f"bridge.callback: transposing {kernel!r} with respect to a non-linear input"
        )
    lin_avals = tuple(
        core.ShapedArray(x.aval.shape, x.aval.dtype) if ad.is_undefined_primal(x) else _aval(x)
        for x in lin
    )
    out_avals = kernel.out_avals([*(_aval(x) for x in nonlin), *lin_avals])
    cts = [
        jnp.zeros(a.shape, a.dtype) if type(c) is ad.Zero else c
        for c, a in zip(cts, out_avals, strict=True)
    ]
    t_kernel, keep = kernel.transposed(lin_avals, len(cts))
    res = torch_call_p.bind(*(nonlin[i] for i in keep), *cts, kernel=t_kernel)
    return [None] * n + [
        r if ad.is_undefined_primal(x) else None for r, x in zip(res, lin, strict=True)
    ]


def _batch_rule(args: Sequence[Any], dims: Sequence[Any], *, kernel: _Kernel):
    dims = tuple(None if d is _NOT_MAPPED else d for d in dims)
    if isinstance(kernel, _SaveFwd):
        # A batched forward keeps no graph (its backward recomputes per example).
        outs = torch_call_p.bind(*args, kernel=_Vmap.of(kernel.base, dims))
        token = jnp.asarray(_NO_GRAPH, dtype=jnp.int32)
        return [*outs, token], [0] * len(outs) + [_NOT_MAPPED]
    if isinstance(kernel, _SavedVjp) and not kernel.batched:
        n = kernel.base.n_in
        if all(d is None for d in dims[: n + 1]):  # only the cotangents: jacrev
            size = _axis_size(args, dims)
            cts = [
                _batch_at_front(c, d, size)
                for c, d in zip(args[n + 1 :], dims[n + 1 :], strict=True)
            ]
            batched = _SavedVjp.of(kernel.base, kernel.diff, kernel.out_diff, True)
            outs = torch_call_p.bind(*args[: n + 1], *cts, kernel=batched)
            return outs, [0] * len(outs)
    pure, keep = kernel.derivable()
    pdims = tuple(dims[i] for i in keep)
    outs = torch_call_p.bind(*(args[i] for i in keep), kernel=_Vmap.of(pure, pdims))
    return outs, [0] * len(outs)


def _axis_size(args: Sequence[Any], dims: Sequence[int | None]) -> int:
    return next(np.shape(a)[d] for a, d in zip(args, dims, strict=True) if d is not None)


def _batch_at_front(x: Any, dim: int | None, size: int) -> Any:
    if dim is None:
        return jnp.broadcast_to(x, (size, *np.shape(x)))
    return x if dim == 0 else jnp.moveaxis(x, dim, 0)


def _dce_rule(used: list[bool], eqn: core.JaxprEqn) -> tuple[list[bool], core.JaxprEqn | None]:
    if not any(used):
        return [False] * len(eqn.invars), None
    kernel = eqn.params["kernel"]
    if isinstance(kernel, _SaveFwd) and not used[-1]:
        # Nobody reads the token: run the plain forward and keep no graph.
        eqn = eqn.replace(outvars=eqn.outvars[:-1], params=dict(kernel=kernel.base))
    return [True] * len(eqn.invars), eqn


torch_call_p.def_impl(_impl)
torch_call_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(torch_call_p, _lowering)
ad.primitive_jvps[torch_call_p] = _jvp_rule
ad.primitive_transposes[torch_call_p] = _transpose_rule
# jax >= 0.8 tells a linearization whether it is for a vjp; jax 0.7 (the
# torch_xla environment) does not, and there every linearization saves a graph.
_LINEARIZE_HAS_IS_VJP = "_is_vjp" in inspect.signature(ad.fallback_linearize_rule).parameters
if _LINEARIZE_HAS_IS_VJP:
    ad.primitive_linearizations[torch_call_p] = _linearize_rule
else:
    ad.primitive_linearizations[torch_call_p] = functools.partial(_linearize_rule, True)
batching.primitive_batchers[torch_call_p] = _batch_rule
pe.dce_rules[torch_call_p] = _dce_rule


def _weak_cache_keys() -> None:
    """Let JAX's caches hold kernels weakly.

    JAX memoises abstract evaluation per primitive and parameters; a kernel
    parameter holds the user's torch function (a module, its weights), so a
    strong cache entry would keep it alive for the life of the process. JAX
    keys jaxprs weakly; kernels are keyed the same way, so an entry goes when
    its wrapped function and every jaxpr using it are gone.
    """
    from jax._src import util as jax_util

    weak_types = getattr(jax_util, "weakref_cache_key_types", None)
    if weak_types is None:  # older jax: no such cache
        return
    stack = [_Kernel]
    while stack:
        cls = stack.pop()
        weak_types.add(cls)
        stack.extend(cls.__subclasses__())


_weak_cache_keys()


# --------------------------------------------------------------------------
# The public wrapper


class _Wrapped:
    """The JAX function returned by `wrap`."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._kernels: dict[tuple, _Call] = {}
        functools.update_wrapper(self, fn, updated=())

    def __repr__(self) -> str:
        return f"bridge.callback.wrap({_fn_name(self.fn)})"

    def kernel(self, args: tuple, kwargs: dict) -> tuple[_Call, list[Any]]:
        leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
        mask, arrays, statics = [], [], []
        for leaf in leaves:
            if isinstance(leaf, (jax.Array, core.Tracer)):
                arrays.append(leaf)
                mask.append(True)
            elif isinstance(leaf, (np.ndarray, np.generic)):
                arrays.append(jnp.asarray(leaf))
                mask.append(True)
            elif isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{self!r} got a torch tensor of shape {tuple(leaf.shape)}; it takes JAX "
                    "arrays. Convert it with bridge.to_jax, or close over it in the torch function."
                )
            else:
                statics.append(leaf)
                mask.append(False)
        key = (tree, tuple(mask), tuple((type(s), s) for s in statics))
        try:
            kernel = self._kernels.get(key)
        except TypeError:
            bad = [s for s in statics if not _hashable(s)]
            raise TypeError(
                f"{self!r}: non-array arguments are static (part of the cache key) and must be "
                f"hashable; got {type(bad[0]).__name__} {bad[0]!r}. Pass it as a tuple, or "
                "close over it in the torch function."
            ) from None
        if kernel is None:
            kernel = self._kernels[key] = _Call(self.fn, tree, tuple(mask), tuple(statics))
        return kernel, arrays

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kernel, arrays = self.kernel(args, kwargs)
        info = kernel.info([_aval(a) for a in arrays])
        outs = iter(torch_call_p.bind(*arrays, kernel=kernel))
        leaves = [
            next(outs) if is_tensor else static
            for is_tensor, static in zip(info.is_tensor, info.static_leaves, strict=True)
        ]
        return torch_pytree.tree_unflatten(leaves, info.spec)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


# id(fn) -> its wrapper, for as long as the wrapper lives (it holds fn, so the
# id cannot be reused meanwhile); a bound method is keyed by its parts, since
# `module.forward` is a new object at every access.
_WRAPPED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


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
    wrapped = _WRAPPED.get(key)
    if wrapped is None:
        wrapped = _WRAPPED[key] = _Wrapped(fn)
    return wrapped
