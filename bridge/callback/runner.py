"""Running a kernel on tensors, shared by the eager and the jit paths.

`runner(kernel, expected)` is the per-call hot path, with the checks that
keep JAX's promises: no writes into its buffers, the predicted output shapes
and dtypes. Outputs reach JAX through `output_in` / `write_output`, which
apply the x64 rule of `bridge.x64`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jax._src import core

from bridge import dtypes, x64
from bridge.callback.errors import CallbackError
from bridge.callback.kernels import Call, Kernel

__all__ = ["expected_outputs", "output_in", "runner", "write_output"]


def expected_outputs(
    out_avals: Sequence[core.ShapedArray],
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, torch dtype) that each output of a kernel must have."""
    return [(tuple(a.shape), dtypes.to_torch_dtype(a.dtype)) for a in out_avals]


def runner(
    kernel: Kernel, expected: Sequence[tuple[tuple[int, ...], torch.dtype]], *, fresh: bool = False
) -> Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]:
    """`tensors -> outputs` for one kernel and signature, with the checks that
    keep JAX's promises: no writes into its buffers, the predicted shapes.

    `fresh`: the caller made every tensor just now (`torch._C._from_dlpack`
    of XLA's buffers), so each has a version counter of its own at 0, and a
    write is any version above 0; there is nothing to read before the call.

    This is the per-call hot path: plain loops, no context managers, and for
    the common case (fn(*tensors) returning one tensor) no pytree walking.
    """
    is_grad_enabled, set_grad_enabled = torch.is_grad_enabled, torch._C._set_grad_enabled
    # fn(*tensors) returning one tensor: call fn itself, and check its one output inline.
    single = isinstance(kernel, Call) and kernel.positional and len(expected) == 1
    call = kernel.fn if single else kernel.run
    tensor_type = torch.Tensor
    ((shape, dtype),) = expected if single else ((None, None),)

    def check(outs: Sequence[torch.Tensor]) -> None:
        if len(outs) != len(expected):
            raise CallbackError(
                f"{kernel!r} returned {len(outs)} tensors, but its shape inference found "
                f"{len(expected)}. The structure of the output must depend only on the input "
                "shapes, dtypes and static arguments."
            )
        for o, (shape, dtype) in zip(outs, expected, strict=True):
            if o.shape != shape or (o.dtype != dtype and not x64.narrows(o.dtype, dtype)):
                _raise_mismatch(kernel, outs, expected)

    def execute(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        versions = None if fresh else [t._version for t in tensors]
        grad_was_enabled = is_grad_enabled()
        set_grad_enabled(False)
        try:
            out = call(*tensors)
        finally:
            set_grad_enabled(grad_was_enabled)
        if versions is None:
            for t in tensors:
                if t._version:
                    _raise_written(kernel, tensors, [0] * len(tensors))
        elif [t._version for t in tensors] != versions:
            _raise_written(kernel, tensors, versions)
        if single:
            if type(out) is tensor_type and out.shape == shape and out.dtype == dtype:
                return (out,)
            out = kernel.flatten_out(out)
        check(out)
        return out

    return execute


def _raise_written(kernel: Kernel, tensors: Sequence[torch.Tensor], versions: list[int]) -> None:
    i = next(i for i, t in enumerate(tensors) if t._version != versions[i])
    raise CallbackError(
        f"{kernel!r} wrote in place into its input {i} (shape {tuple(tensors[i].shape)}), "
        "which is a JAX array's buffer; JAX arrays are immutable, and this one now holds "
        "the written values. Write into a clone (`x = x.clone()`) instead."
    )


def _raise_mismatch(kernel: Kernel, outs: Sequence[torch.Tensor], expected) -> None:
    for i, (o, (shape, dtype)) in enumerate(zip(outs, expected, strict=True)):
        if o.shape != shape or (o.dtype != dtype and not x64.narrows(o.dtype, dtype)):
            raise CallbackError(
                f"{kernel!r} returned output {i} with shape {tuple(o.shape)} and dtype "
                f"{o.dtype}, but its shape inference predicted {shape} and {dtype}. Output "
                "shapes and dtypes must depend only on the input shapes, dtypes and static "
                "arguments."
            )


def output_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Output `t` in `dtype`, the dtype of its JAX array: `t` itself, or with x64
    off the 32-bit form of a 64-bit integer output, checked value by value."""
    if t.dtype == dtype:
        return t
    return x64.narrow(t, dtype, f"a torch output of dtype {t.dtype}")


def write_output(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy output `src` into XLA's output buffer `dst`."""
    dst.copy_(output_in(src, dst.dtype))
