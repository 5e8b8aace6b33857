"""A JAX function's VJP as a `torch.autograd.Function`, keeping JAX's residuals.

    outs = jax_autograd.call(fn, diff, tensors, run, transformed=False)

runs `JaxFunction` `fn` on `tensors` so that torch autograd flows through
it: the forward runs `fn.fwd_vjp` (the jitted forward that also returns the
VJP's residuals, `jax_flat.Residuals`), and the backward applies them
(`fn.apply_vjp`) instead of recomputing the forward. The residuals stay JAX
arrays on the JAX side; only the outputs and the gradients cross. For a
scalar loss the forward returns its gradients for a cotangent of 1
(`jax_flat.Gradients`, one fused XLA program as `jax.value_and_grad`), and a
backward that gets exactly that cotangent hands them over; any other
cotangent recomputes the VJP.

- `diff[i]` marks the inputs that get gradients.
- `run(fn, tensors) -> list[Tensor]` is the caller's own way to run a
  `JaxFunction` on tensors with autograd (its dispatcher). The backward under
  `create_graph=True` (double backward, Hessians, `torch.func.grad`), the
  forward-mode rule (`jax.jvp`) and the `torch.func.vmap` rule (`jax.vmap`)
  call it with `fn`'s derived functions, so what they compute can be
  differentiated, traced or batched again.
- `transformed`: a torch.func transform or forward-mode AD is active; that
  needs the `setup_context` form of `autograd.Function`, which costs more
  per call than the classic one used otherwise.

Returns the primary outputs then the aux outputs of `fn`, as tensors;
integer and boolean outputs, and all aux outputs, carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import torch
from bridge.adapters import jax_boundary as boundary
from bridge.adapters.jax_flat import Gradients, JaxFunction, Residuals

__all__ = ["Run", "call", "differentiable_outputs"]

Run = Callable[[JaxFunction, list[torch.Tensor]], list[torch.Tensor]]


class _Saved:
    """What the backward of one forward call needs, kept on the JAX side."""

    __slots__ = ("inputs", "n_primary", "res")

    def __init__(self, res: Residuals | None, inputs: list[Any] | None, n_primary: int) -> None:
        self.res, self.inputs, self.n_primary = res, inputs, n_primary


def _example(tensors: Sequence[torch.Tensor]) -> Callable[[], list[jax.ShapeDtypeStruct]]:
    return lambda: boundary.avals(boundary.signature(tensors))


def _forward(fn: JaxFunction, diff: tuple[bool, ...], tensors: Sequence[torch.Tensor]) -> tuple:
    arrays = [boundary.jax_input(t, fn.views) for t in tensors]
    if any(diff):
        prim, aux, res = fn.fwd_vjp(diff, *arrays)
    else:
        (prim, aux), res = fn.plain(*arrays), None
        prim = jax.tree_util.tree_leaves(prim)
    outs = boundary.torch_outputs([*prim, *aux])
    return (*outs, _Saved(res, arrays, len(prim)))


def differentiable_outputs(outs: Sequence[torch.Tensor], n_primary: int) -> list[bool]:
    """Which outputs of a `JaxFunction` get gradients: differentiable primary ones."""
    return [i < n_primary and boundary.differentiable(o) for i, o in enumerate(outs)]


def _is_one(cts: Sequence[torch.Tensor]) -> bool:
    """Whether the cotangents are the single scalar 1 that `loss.backward()` sends."""
    return len(cts) == 1 and cts[0].dim() == 0 and cts[0].item() == 1.0


def _setup(
    ctx: Any, fn: JaxFunction, diff: tuple, run: Run, tensors: Sequence, output: tuple
) -> None:
    saved = output[-1]
    outs = output[:-1]
    ctx.fn, ctx.diff, ctx.run, ctx.res = fn, diff, run, saved
    ctx.out_diff = differentiable_outputs(outs, saved.n_primary)
    ctx.mark_non_differentiable(*[o for o, d in zip(outs, ctx.out_diff, strict=True) if not d])
    ctx.save_for_backward(*tensors)


def _backward(ctx: Any, grads: Sequence[torch.Tensor | None]) -> tuple:
    # Gradients of tensor outputs arrive materialised (zeros when unused); the
    # last output is the saved residuals, which get none.
    cts = [g for g, d in zip(grads[:-1], ctx.out_diff, strict=True) if d]
    saved = ctx.res
    res = saved.res
    if isinstance(res, Gradients) and not torch.is_grad_enabled() and _is_one(cts):
        ctx.saved_tensors  # noqa: B018 -- raises if an input was modified in place
        # Handed out once: torch may write into .grad, and these are its buffers.
        saved.res = None
        gin = boundary.torch_outputs(res.leaves)
    elif torch.is_grad_enabled() or not isinstance(res, Residuals):
        # create_graph (or a torch.func transform), or a cotangent the saved
        # gradients were not computed for: a backward that recomputes the forward.
        inputs = [*ctx.saved_tensors, *cts]
        gin = ctx.run(ctx.fn.recompute_vjp(ctx.diff, _example(inputs)), inputs)
    else:
        ctx.saved_tensors  # noqa: B018 -- raises if an input was modified in place
        cts = [boundary.jax_input(c) for c in cts]
        gin = boundary.torch_outputs(ctx.fn.apply_vjp(res, saved.inputs, cts))
    it = iter(gin)
    return (None, None, None, *[next(it) if d else None for d in ctx.diff])


class _Eager(torch.autograd.Function):
    """Plain eager autograd (the common case, with the least per-call work)."""

    @staticmethod
    def forward(
        ctx: Any, fn: JaxFunction, diff: tuple[bool, ...], run: Run, *tensors: torch.Tensor
    ) -> tuple:
        output = _forward(fn, diff, tensors)
        _setup(ctx, fn, diff, run, tensors, output)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        return _backward(ctx, grads)


class _Transformed(torch.autograd.Function):
    """The same under torch.func transforms and forward-mode AD."""

    @staticmethod
    def forward(fn: JaxFunction, diff: tuple[bool, ...], run: Run, *tensors: torch.Tensor) -> tuple:
        return _forward(fn, diff, tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        fn, diff, run, *tensors = inputs
        _setup(ctx, fn, diff, run, tensors, output)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        return _backward(ctx, grads)

    @staticmethod
    def jvp(ctx: Any, _fn: None, _diff: None, _run: None, *tangents: torch.Tensor | None) -> tuple:
        mask = tuple(t is not None for t in tangents)
        inputs = [*ctx.saved_tensors, *[t for t in tangents if t is not None]]
        tout = iter(ctx.run(ctx.fn.jvp(mask, _example(inputs)), inputs))
        return (*[next(tout) if d else None for d in ctx.out_diff], None)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, fn: JaxFunction, diff: tuple, run: Run, *tensors: torch.Tensor
    ) -> tuple:
        vfn = fn.vmapped(tuple(in_dims[3:]), _example(tensors))
        outs = run(vfn, list(tensors))
        return (*outs, _Saved(None, None, vfn.n_primary)), (*[0] * len(outs), None)


def call(
    fn: JaxFunction,
    diff: tuple[bool, ...],
    tensors: Sequence[torch.Tensor],
    run: Run,
    *,
    transformed: bool,
) -> list[torch.Tensor]:
    """Run `fn` on `tensors` with torch autograd through JAX's VJP (see the module doc)."""
    function = _Transformed if transformed else _Eager
    return list(function.apply(fn, diff, run, *tensors)[:-1])
