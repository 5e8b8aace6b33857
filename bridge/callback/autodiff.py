"""Derivatives of a kernel through torch: torch.func.jvp / vjp, with the checks
that turn torch's silent zeros and cryptic refusals into clear errors.

A kernel here is anything with `run(*tensors)` and a readable `repr` (see
`kernels.py`). Cotangents are conjugated at the boundary: torch's are the
complex conjugates of JAX's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bridge.callback.errors import CallbackError

__all__ = [
    "conj",
    "converting_no_formula",
    "no_formula_error",
    "splice",
    "torch_jvp",
    "torch_vjp",
    "zeros_if_none",
]


def splice(xs: Sequence[Any], idx: Sequence[int], values: Sequence[Any]) -> list[Any]:
    full = list(xs)
    for i, v in zip(idx, values, strict=True):
        full[i] = v
    return full


def conj(ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    # torch's cotangents are the complex conjugates of JAX's.
    return tuple(t.conj() if t.is_complex() else t for t in ts)


def _restricted(base: Any, diff, out_diff, xs):
    def f(*d: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = base.run(*splice(xs, diff, d))
        return tuple(outs[j] for j in out_diff)

    return f


def torch_jvp(base, diff, out_diff, xs, ts) -> tuple[torch.Tensor, ...]:
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


def no_formula_error(base: Any, e: BaseException) -> CallbackError | None:
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


def converting_no_formula(base: Any, run: Callable[[], Any]) -> Any:
    try:
        return run()
    except RuntimeError as e:
        error = no_formula_error(base, e)
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


def torch_vjp(base, diff, out_diff, xs, cts, batched: bool) -> list[torch.Tensor]:
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
        grads = torch.func.vmap(lambda *c: vjp_fn(conj(c)))(*cts)
    else:
        grads = vjp_fn(conj(cts))
    return list(conj(grads))


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
    cts = conj(cts)
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
    return list(conj([zeros_if_none(d, x, batch) for d, x in zip(grads, leaves, strict=True)]))


def zeros_if_none(grad: torch.Tensor | None, x: torch.Tensor, batch: tuple[int, ...]):
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
