"""Kernels: torch computations on flat lists of tensors, the parameter of `torch_call_p`.

`Call` is the user's function; every JAX transformation maps a kernel to
another kernel built with `torch.func` (`Jvp`, `Vjp`, `Vmap` and the
transposes). A kernel is hashed by identity; derived kernels are memoised on
their parent (`Kernel.memo`), so tracing the same function twice gives the
same primitive parameters and jit's caches hit. Output shapes and dtypes come
from running the function on fake tensors, cached per input signature on its
`Call` (see `Call.info`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from jax._src import core
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

from bridge import dtypes, x64
from bridge.callback.autodiff import (
    conj,
    converting_no_formula,
    no_formula_error,
    torch_jvp,
    torch_vjp,
)
from bridge.callback.errors import CallbackError
from bridge.tree import Partition, register_jax_pytree

__all__ = ["Call", "Derivative", "Jvp", "Kernel", "Vjp", "Vmap", "fn_name", "shaped_aval"]


# --------------------------------------------------------------------------
# Avals, dtypes and names


def shaped_aval(x: Any) -> core.ShapedArray:
    """The plain ShapedArray of a value or tracer (no weak type, no sharding)."""
    a = core.typeof(x)
    return core.ShapedArray(a.shape, a.dtype)


def _out_jax_dtype(t_dtype: torch.dtype, where: str) -> np.dtype:
    """The JAX dtype of a torch output, by the x64 rule of `bridge.x64` (int64 and
    uint64 are narrowed at run time, with a check of the values)."""
    return dtypes.to_jax_dtype(x64.jax_dtype(t_dtype, where))


def _torch_device() -> str:
    return "cuda" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"


def fn_name(fn: Callable[..., Any]) -> str:
    """A readable name for a torch function, for reprs and errors."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name and name.startswith("_VariableFunctionsClass."):  # torch.sin and friends
        return "torch." + fn.__name__
    return name or type(fn).__name__


# --------------------------------------------------------------------------
# Kernels


class Kernel:
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

    def derivable(self) -> tuple[Kernel, tuple[int, ...]]:
        """A kernel that torch.func can transform, and which inputs it takes.

        Kernels that use a saved autograd graph are not pure functions of
        their inputs; their derivatives use the recomputing equivalent.
        """
        return self, tuple(range(self.n_in))

    def transposed(
        self, lin_avals: Sequence[core.ShapedArray], n_cts: int
    ) -> tuple[Kernel, tuple[int, ...]]:
        """The transpose of a linear kernel and the non-linear inputs it takes."""
        raise NotImplementedError(f"bridge.callback: {self} is not linear; it cannot be transposed")

    def memo(self, key: Any, make: Callable[[], Kernel]) -> Kernel:
        try:
            derived = self._derived
        except AttributeError:
            derived = self._derived = {}
        k = derived.get(key)
        if k is None:
            k = derived[key] = make()
        return k


class Call(Kernel):
    """The user's function: rebuilds the argument pytree around the tensors."""

    def __init__(self, fn: Callable[..., Any], part: Partition):
        self.fn = fn
        self.part = part  # the call's structure and static values
        self.n_in = sum(part.mask)
        self.name = fn_name(fn)
        # fn(*tensors) needs no pytree rebuilding: the common, fast case.
        self.positional = part.treedef == jax.tree_util.tree_structure(((0,) * self.n_in, {}))
        self._infos: dict[tuple, _OutInfo] = {}
        self._grad_checked: set[tuple] = set()
        self.save_graphs = True  # turned off if torch refuses saved-tensor hooks

    def __repr__(self) -> str:
        return self.name

    def call_tree(self, tensors: Sequence[Any]) -> Any:
        if self.positional:
            return self.fn(*tensors)
        args, kwargs = self.part.fill(tensors)
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
            error = no_formula_error(self, e)
            if error is not None:
                raise error from e
        except Exception:  # noqa: BLE001 -- a fake run it cannot follow: checked at run time
            pass
        self._grad_checked.add(key)


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


class Derivative(Kernel):
    """A derivative of `base` with respect to its inputs `diff`, for its outputs
    `out_diff`: linear in its trailing inputs (tangents of `diff`, or
    cotangents of `out_diff`), which follow `base`'s inputs (and, for the
    saved-graph kernels, a graph token). One per base and signature: `of`."""

    kind = ""  # "jvp" or "vjp", for the repr
    tangents = True  # trailing inputs: tangents of diff (True) or cotangents of out_diff
    token = False  # a graph token follows base's inputs (see graphs.py)

    def __init__(
        self, base: Kernel, diff: tuple[int, ...], out_diff: tuple[int, ...], batched=False
    ):
        self.base, self.diff, self.out_diff = base, diff, out_diff
        self.batched = batched  # cotangents with a leading batch axis (the saved vjp, jacrev)
        self.n_nonlinear = base.n_in + self.token
        self.n_in = self.n_nonlinear + len(diff if self.tangents else out_diff)

    @classmethod
    def of(cls, base: Kernel, diff: tuple[int, ...], out_diff: tuple[int, ...], batched=False):
        key = (cls, diff, out_diff, batched)
        return base.memo(key, lambda: cls(base, diff, out_diff, batched))

    def __repr__(self) -> str:
        return f"{'batched_' if self.batched else ''}{self.kind}({self.base!r})"


class Jvp(Derivative):
    """(xs, tangents of xs[diff]) -> tangents of outputs[out_diff]: torch.func.jvp."""

    kind = "jvp"

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        xs, ts = args[: self.base.n_in], args[self.base.n_in :]
        return list(torch_jvp(self.base, self.diff, self.out_diff, xs, ts))

    def out_avals(self, in_avals):
        outs = self.base.out_avals(in_avals[: self.base.n_in])
        return tuple(outs[j] for j in self.out_diff)

    def transposed(self, lin_avals, n_cts):
        return Vjp.of(self.base, self.diff, self.out_diff), tuple(range(self.n_nonlinear))


class Vjp(Derivative):
    """(xs, cotangents of outputs[out_diff]) -> cotangents of xs[diff]: torch.func.vjp."""

    kind = "vjp"
    tangents = False

    def run(self, *args: torch.Tensor) -> list[torch.Tensor]:
        xs, cts = args[: self.base.n_in], args[self.base.n_in :]
        return converting_no_formula(
            self.base, lambda: torch_vjp(self.base, self.diff, self.out_diff, xs, cts, False)
        )

    def out_avals(self, in_avals):
        return tuple(in_avals[i] for i in self.diff)

    def transposed(self, lin_avals, n_cts):
        return Jvp.of(self.base, self.diff, self.out_diff), tuple(range(self.n_nonlinear))


class Vmap(Kernel):
    """torch.func.vmap of a kernel; every output is batched along axis 0."""

    def __init__(self, base: Kernel, in_dims: tuple[int | None, ...]):
        self.base, self.in_dims = base, in_dims
        self.n_in = base.n_in
        self.n_nonlinear = base.n_nonlinear
        self._vmapped = torch.func.vmap(self._run_base, in_dims=in_dims, out_dims=0)

    @staticmethod
    def of(base: Kernel, in_dims: tuple[int | None, ...]) -> Vmap:
        return base.memo(("vmap", in_dims), lambda: Vmap(base, in_dims))

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


class _VmapT(Kernel):
    """Transpose of a vmapped linear kernel: vmap the transpose, then sum over
    the batch the cotangents of inputs that were not batched."""

    def __init__(self, inner_t: Kernel, nonlin_dims, lin_dims, lin_avals):
        self.inner_t, self.nonlin_dims, self.lin_dims = inner_t, nonlin_dims, lin_dims
        self.lin_avals = lin_avals
        self.n_nonlinear = len(nonlin_dims)
        self.n_in = inner_t.n_in
        n_cts = inner_t.n_in - self.n_nonlinear
        self._vmap = Vmap.of(inner_t, tuple(nonlin_dims) + (0,) * n_cts)

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


class _GenericT(Kernel):
    """Transpose of any linear kernel L: the vjp of L in its linear inputs, at zero."""

    def __init__(self, lin: Kernel, lin_avals: tuple[core.ShapedArray, ...], n_cts: int):
        self.lin, self.lin_avals = lin, lin_avals
        self.n_nonlinear = lin.n_nonlinear
        self.n_in = lin.n_nonlinear + n_cts

    @staticmethod
    def of(lin: Kernel, lin_avals: tuple[core.ShapedArray, ...], n_cts: int) -> tuple:
        k = lin.memo(("T", lin_avals, n_cts), lambda: _GenericT(lin, lin_avals, n_cts))
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
        return list(conj(vjp_fn(conj(cts))))

    def out_avals(self, in_avals):
        return self.lin_avals

    def transposed(self, lin_avals, n_cts):
        return _GenericT.of(self, tuple(lin_avals), n_cts)
