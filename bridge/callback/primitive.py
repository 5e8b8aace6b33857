"""`torch_call_p`, the JAX primitive that runs a kernel in torch, and its rules.

Everything happens in this one primitive, whose only parameter is a *kernel*
(see `kernels.py`). Every JAX transformation maps a kernel to another kernel
built with `torch.func`, so the rules compose the way JAX's own primitives do:

    vmap                  -> torch.func.vmap(kernel)          (batched once, no loop)
    jvp                   -> torch.func.jvp(kernel)           (linear in the tangents)
    transpose of the jvp  -> torch.func.vjp(kernel)           (so grad/vjp work)
    jvp/vmap of any of these -> the same rules again       (higher order)

Reverse mode saves torch's graph instead of recomputing (see `graphs.py`).
At run time, under `jax.jit`, `jax.experimental.buffer_callback` hands torch
the very device buffers JAX holds (DLPack, no copy); outside `jit` the impl
shares memory both ways through `bridge.to_torch` / `bridge.to_jax`.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax._src import core
from jax._src.interpreters import ad, batching, mlir
from jax._src.interpreters import partial_eval as pe

from bridge import dlpack, dtypes
from bridge.callback.graphs import NO_GRAPH, PENDING, SavedJvp, SavedVjp, SaveFwd, storage_ptr
from bridge.callback.kernels import Call, Jvp, Kernel, Vmap, shaped_aval
from bridge.callback.runner import expected_outputs, output_in, runner, write_output

try:  # jax >= 0.7 on CPU and GPU
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - older jax: pure_callback fallback
    _buffer_callback = None

#: "buffer_callback" (zero-copy: torch reads and writes XLA's buffers) or
#: "pure_callback" (inputs and outputs copied through host arrays).
TRANSPORT = "buffer_callback" if _buffer_callback is not None else "pure_callback"

__all__ = ["TRANSPORT", "torch_call_p"]

# Platforms whose device buffers torch can read in place (through DLPack).
_PLATFORMS = frozenset({"cpu", "cuda", "rocm"})
_NOT_MAPPED = getattr(batching, "not_mapped", None)


def _is_inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


torch_call_p = core.Primitive("torch_call")
torch_call_p.multiple_results = True


def _abstract_eval(*avals: core.ShapedArray, kernel: Kernel) -> tuple[core.ShapedArray, ...]:
    return kernel.out_avals([core.ShapedArray(a.shape, a.dtype) for a in avals])


def _impl(*args: Any, kernel: Kernel) -> list[jax.Array]:
    """Outside jit: share the arrays with torch and torch's results with JAX."""
    arrays = [a if isinstance(a, jax.Array) else jnp.asarray(a) for a in args]
    out_avals = kernel.out_avals([shaped_aval(a) for a in arrays])
    tensors = [dlpack.to_torch(a) for a in arrays]
    outs = runner(kernel, expected_outputs(out_avals))(tensors)
    in_storages = {storage_ptr(t) for t in tensors}
    results = []
    for o, aval in zip(outs, out_avals, strict=True):
        if storage_ptr(o) in in_storages:
            o = o.clone()  # never hand JAX a second array over an input's memory
        # to_jax copies a layout this jax cannot read in place (see jax_reads_strides)
        results.append(dlpack.to_jax(output_in(o, dtypes.to_torch_dtype(aval.dtype))))
    if isinstance(kernel, SaveFwd):
        token = int(outs[-1])
        if PENDING.adopt(token):  # keep the graph as long as JAX keeps the token
            weakref.finalize(results[-1], PENDING.release, token)
    return results


def _host_callback(kernel: Kernel, out_avals, platform: str) -> Callable[..., None]:
    """The function buffer_callback calls with XLA's own buffers."""
    expected = expected_outputs(out_avals)
    if platform == "cpu":
        from_dlpack = torch._C._from_dlpack
        execute = runner(kernel, expected, fresh=True)  # from_dlpack makes new tensors

        if len(expected) == 1:  # the common case, without the loop
            ((_, dtype),) = expected

            def callback1(ctx: Any, outs: list[Any], *ins: Any) -> None:
                (r,) = execute([from_dlpack(b.__dlpack__()) for b in ins])
                dst = from_dlpack(outs[0].__dlpack__())
                if r.dtype is dtype:
                    dst.copy_(r)
                else:
                    write_output(dst, r)

            return callback1

        def callback(ctx: Any, outs: list[Any], *ins: Any) -> None:
            results = execute([from_dlpack(b.__dlpack__()) for b in ins])
            for b, r in zip(outs, results, strict=True):
                dst = from_dlpack(b.__dlpack__())
                if r.dtype is dst.dtype:
                    dst.copy_(r)
                else:
                    write_output(dst, r)

        return callback

    execute = runner(kernel, expected)

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
                    write_output(torch.from_dlpack(b), r)

    return gpu_callback


def _pure_host_fn(kernel: Kernel, out_avals) -> Callable[..., list[np.ndarray]]:
    """pure_callback fallback: host arrays in, numpy arrays out (copied by JAX)."""
    expected = expected_outputs(out_avals)
    execute = runner(kernel, expected)

    def host(*arrays: Any) -> list[np.ndarray]:
        # Recent jax hands the callback jax.Arrays on the host, older jax numpy arrays.
        tensors = [
            dlpack.to_torch(a) if isinstance(a, jax.Array) else torch.from_numpy(np.array(a))
            for a in arrays
        ]
        results = execute(tensors)
        outs = []
        for r, (_, dtype) in zip(results, expected, strict=True):
            outs.append(output_in(r, dtype).detach().cpu().resolve_conj().numpy())
        return outs

    return host


def _lowering(ctx: mlir.LoweringRuleContext, *args: Any, kernel: Kernel) -> Sequence[Any]:
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


def _jvp_rule(primals: Sequence[Any], tangents: Sequence[Any], *, kernel: Kernel):
    outs = torch_call_p.bind(*primals, kernel=kernel)
    out_avals = [shaped_aval(o) for o in outs]
    if isinstance(kernel, SaveFwd):  # the token has no tangent
        pure, keep = kernel.base, tuple(range(kernel.n_in))
    else:
        pure, keep = kernel.derivable()
    pargs = [primals[i] for i in keep]
    ptangents = [tangents[i] for i in keep]
    in_avals = [shaped_aval(a) for a in pargs]
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
        touts = torch_call_p.bind(*pargs, *ts, kernel=Jvp.of(pure, diff, out_diff))
        for j, t in zip(out_diff, touts, strict=True):
            tangents_out[j] = t
    return outs, tangents_out


def _linearize_rule(is_vjp: bool, nonzeros: Sequence[bool], *primals: Any, kernel: Kernel):
    """Reverse mode: run the forward once under torch autograd, keep its graph."""
    if is_vjp and isinstance(kernel, Call):
        in_avals = [shaped_aval(p) for p in primals]
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
            *outs, token = torch_call_p.bind(*primals, kernel=SaveFwd.of(kernel, diff, out_diff))
            lin = SavedJvp.of(kernel, diff, out_diff)

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


def _transpose_rule(cts: Sequence[Any], *args: Any, kernel: Kernel) -> list[Any]:
    n = kernel.n_nonlinear
    if n is None:
        raise NotImplementedError(f"bridge.callback: {kernel!r} is not linear; cannot transpose it")
    nonlin, lin = args[:n], args[n:]
    if any(ad.is_undefined_primal(x) for x in nonlin):
        raise NotImplementedError(
            f"bridge.callback: transposing {kernel!r} with respect to a non-linear input"
        )
    lin_avals = tuple(
        core.ShapedArray(x.aval.shape, x.aval.dtype)
        if ad.is_undefined_primal(x)
        else shaped_aval(x)
        for x in lin
    )
    out_avals = kernel.out_avals([*(shaped_aval(x) for x in nonlin), *lin_avals])
    cts = [
        jnp.zeros(a.shape, a.dtype) if type(c) is ad.Zero else c
        for c, a in zip(cts, out_avals, strict=True)
    ]
    t_kernel, keep = kernel.transposed(lin_avals, len(cts))
    res = torch_call_p.bind(*(nonlin[i] for i in keep), *cts, kernel=t_kernel)
    return [None] * n + [
        r if ad.is_undefined_primal(x) else None for r, x in zip(res, lin, strict=True)
    ]


def _batch_rule(args: Sequence[Any], dims: Sequence[Any], *, kernel: Kernel):
    dims = tuple(None if d is _NOT_MAPPED else d for d in dims)
    if isinstance(kernel, SaveFwd):
        # A batched forward keeps no graph (its backward recomputes per example).
        outs = torch_call_p.bind(*args, kernel=Vmap.of(kernel.base, dims))
        token = jnp.asarray(NO_GRAPH, dtype=jnp.int32)
        return [*outs, token], [0] * len(outs) + [_NOT_MAPPED]
    if isinstance(kernel, SavedVjp) and not kernel.batched:
        n = kernel.base.n_in
        if all(d is None for d in dims[: n + 1]):  # only the cotangents: jacrev
            size = _axis_size(args, dims)
            cts = [
                _batch_at_front(c, d, size)
                for c, d in zip(args[n + 1 :], dims[n + 1 :], strict=True)
            ]
            batched = SavedVjp.of(kernel.base, kernel.diff, kernel.out_diff, True)
            outs = torch_call_p.bind(*args[: n + 1], *cts, kernel=batched)
            return outs, [0] * len(outs)
    pure, keep = kernel.derivable()
    pdims = tuple(dims[i] for i in keep)
    outs = torch_call_p.bind(*(args[i] for i in keep), kernel=Vmap.of(pure, pdims))
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
    if isinstance(kernel, SaveFwd) and not used[-1]:
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
    stack = [Kernel]
    while stack:
        cls = stack.pop()
        weak_types.add(cls)
        stack.extend(cls.__subclasses__())


_weak_cache_keys()
