"""Calling a `JaxFunction` on torch tensors: eager, torch.func, torch.compile, torch_xla.

`run(fn, tensors)` picks the way:

- torch_xla tensors: the JAX computation joins torch_xla's own graph
  (`bridge.xla.xla_call`).
- Under torch.compile / torch.export tracing: the custom op
  `bridge::jax_call(inputs, fn, diff)`, with a fake implementation from
  `jax.eval_shape` and an autograd formula; when gradients are needed the op
  also returns the residual arrays, which the compiled graph keeps for the
  backward. The op's `fn` argument is `JaxFunction.key` (see
  `jax_flat.function_for_key`), so an exported program runs in the process
  that exported it.
- Eager with no gradient needed: the jitted function, nothing else.
- Otherwise: `jax_autograd.call`, an autograd.Function that keeps JAX's
  residuals for the backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import torch
from bridge.adapters import jax_autograd
from bridge.adapters import jax_boundary as boundary
from bridge.adapters.jax_flat import JaxFunction, function_for_key
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.autograd import forward_ad

from bridge import dtypes

__all__ = ["run"]


# --------------------------------------------------------------------------
# torch.compile / torch.export: a custom op with a fake implementation


def _target(jfn: JaxFunction, diff: list[bool], example: Any) -> JaxFunction:
    return jfn.with_residuals(tuple(diff), example) if any(diff) else jfn


@torch.library.custom_op("bridge::jax_call", mutates_args=())
def _jax_call_op(inputs: list[torch.Tensor], fn: int, diff: list[bool]) -> list[torch.Tensor]:
    """Run `JaxFunction` number `fn`; with any `diff`, also return its VJP residuals."""
    jfn = function_for_key(fn)
    arrays = [boundary.jax_input(t, jfn.views) for t in inputs]
    outs = boundary.torch_outputs(
        jax.tree_util.tree_leaves(_target(jfn, diff, lambda: arrays).plain(*arrays))
    )
    # A custom op's outputs must not alias its inputs.
    ptrs = {t.data_ptr() for t in inputs if t.numel()}
    return [o.clone() if o.numel() and o.data_ptr() in ptrs else o for o in outs]


@_jax_call_op.register_fake
def _jax_call_fake(inputs: list[torch.Tensor], fn: int, diff: list[bool]) -> list[torch.Tensor]:
    jfn = function_for_key(fn)
    avals = boundary.avals(boundary.signature(inputs))
    outs = jax.tree_util.tree_leaves(_target(jfn, diff, lambda: avals).plain.eval_shape(*avals))
    device = inputs[0].device if inputs else torch.device("cpu")
    return [
        torch.empty(a.shape, dtype=dtypes.to_torch_dtype(a.dtype), device=device) for a in outs
    ]


def _op_setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    tensors, key, diff = inputs
    jfn = function_for_key(key)
    n_out = jfn.n_primary + jfn.n_aux
    ctx.key, ctx.diff, ctx.n_in = key, tuple(diff), len(tensors)
    ctx.sig = boundary.signature(tensors)
    ctx.out_diff = jax_autograd.differentiable_outputs(output, jfn.n_primary)
    ctx.out_meta = [
        (o.shape, o.dtype, o.device) for o, d in zip(output, ctx.out_diff, strict=True) if d
    ]
    ctx.mark_non_differentiable(*[o for o, d in zip(output, ctx.out_diff, strict=True) if not d])
    ctx.save_for_backward(*tensors, *output[n_out:])


def _op_backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple:
    jfn = function_for_key(ctx.key)
    saved = ctx.saved_tensors
    tensors, residuals = list(saved[: ctx.n_in]), list(saved[ctx.n_in :])
    cts = [g for g, d in zip(grads, ctx.out_diff, strict=True) if d]
    cts = [
        g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
        for g, (shape, dtype, device) in zip(cts, ctx.out_meta, strict=True)
    ]
    if torch.is_grad_enabled() or not any(ctx.diff):
        inputs = [*tensors, *cts]
        example = boundary.avals(boundary.signature(inputs))
        gin = run(jfn.recompute_vjp(ctx.diff, lambda: example), inputs)
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


def run(fn: JaxFunction, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Call `fn` on `tensors` with torch autograd; returns primary + aux outputs."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    diff = tuple(grad and t.requires_grad and boundary.differentiable(t) for t in tensors)
    if any(t.is_xla for t in tensors):
        # On torch_xla devices the JAX computation joins torch_xla's own graph.
        from bridge import xla

        return jax.tree_util.tree_leaves(xla.xla_call(fn.traced, *tensors))
    if _tracing(tensors):
        outs = torch.ops.bridge.jax_call(tensors, fn.key, list(diff))
        return list(outs[: fn.n_primary + fn.n_aux])
    transformed = torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
    if not grad and not transformed:
        arrays = [boundary.jax_input(t, fn.views) for t in tensors]
        return boundary.torch_outputs(jax.tree_util.tree_leaves(fn.plain(*arrays)))
    return jax_autograd.call(fn, diff, tensors, run, transformed=transformed)
