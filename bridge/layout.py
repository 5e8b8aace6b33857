"""The layout pass: convolutional regions of a graph run channels-last.

torch's convolution nets hold activations as (N, C, H, W). XLA's CPU
backend runs convolutions fastest on (N, H, W, C) (its Eigen and oneDNN
kernels are channels-last; on NCHW it adds a transpose around every
convolution), and normalisation and pooling reduce over contiguous channels
there too. So, on the backends listed in `CHANNELS_LAST`, the interpreter
runs a graph's convolutions, pooling, batch and group norm, and the
elementwise ops between them on channels-last values, and gives torch's
layout back (one transpose) only to the consumers that need it: any other op
(a view or flatten, a matmul, a reduction naming dimensions), a graph output,
a torch callback.

A channels-last value is a `ChannelsLast` in the interpreter's environment:
the (N, H, W, C) array, whose `shape` and `dtype` are torch's, so the
interpreter's check against torch's recorded metadata is unchanged. The
values are the same numbers in another order; only the order of
floating-point sums inside a convolution or a normalisation may differ
(float32 rounding).

Which ops run channels-last, and how their operands map, is decided here
and nowhere else; the lowerings of those ops take `channels_last=True` and do
the same math on the other axes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.ops import LOWERINGS

aten = torch.ops.aten

# Per backend: run convolutional regions channels-last? Measured on the CPU
# (docs/design.md, "The layout pass"). GPU and TPU: off, XLA's own layout
# assignment already gives their convolutions the layout their kernels want,
# and the pass has not been measured there.
CHANNELS_LAST: dict[str, bool] = {"cpu": True, "gpu": False, "cuda": False, "rocm": False, "tpu": False}

_TO_LAST = (0, 2, 3, 1)
_TO_FIRST = (0, 3, 1, 2)


def enabled() -> bool:
    """Whether the pass runs for programs traced now (by the default backend)."""
    return CHANNELS_LAST.get(jax.default_backend(), False)


class ChannelsLast:
    """A 4-D value torch holds as (N, C, H, W), held as `array` (N, H, W, C)."""

    __slots__ = ("array", "_torch_layout")

    def __init__(self, array: jax.Array) -> None:
        self.array = array
        self._torch_layout = None

    @property
    def shape(self) -> tuple[int, ...]:
        n, h, w, c = self.array.shape
        return (n, c, h, w)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def torch_layout(self) -> jax.Array:
        """The (N, C, H, W) array, transposed once however many consumers ask."""
        if self._torch_layout is None:
            self._torch_layout = jnp.transpose(self.array, _TO_FIRST)
        return self._torch_layout


def torch_layout(value: Any) -> Any:
    """`value` (an operand, or a list / tuple / dict of them) with every
    channels-last array given back in torch's layout."""
    if isinstance(value, ChannelsLast):
        return value.torch_layout()
    if isinstance(value, (list, tuple)):
        return type(value)(torch_layout(v) for v in value)
    if isinstance(value, dict):
        return {k: torch_layout(v) for k, v in value.items()}
    return value


def _last(x: Any) -> jax.Array:
    return x.array if isinstance(x, ChannelsLast) else jnp.transpose(x, _TO_LAST)


def _is_4d(x: Any) -> bool:
    return isinstance(x, ChannelsLast) or getattr(x, "ndim", None) == 4


# --------------------------------------------------------------------------- the ops

# Ops whose lowering takes `channels_last=True`: operand 0 is the activation,
# these outputs are channels-last (an int: that element of the output tuple;
# None: the single output). `starts`: the op may turn a torch-layout operand
# channels-last (a convolution is where a region begins); the others run
# channels-last only when their operand already is.
_KERNELS: dict[Any, tuple[int | None, bool]] = {
    aten.conv2d.default: (None, True),
    aten.convolution.default: (None, True),
    aten.conv_transpose2d.input: (None, True),
    aten.max_pool2d.default: (None, False),
    aten.adaptive_avg_pool2d.default: (None, False),
    aten._adaptive_avg_pool2d.default: (None, False),
    aten._native_batch_norm_legit.default: (0, False),
    aten._native_batch_norm_legit.no_stats: (0, False),
    aten._native_batch_norm_legit_no_training.default: (0, False),
    aten._native_batch_norm_legit_functional.default: (0, False),
    aten._batch_norm_with_update_functional.default: (0, False),
    aten.group_norm.default: (None, False),
    aten.native_group_norm.default: (0, False),
}

# Elementwise ops whose lowering is the same on any permutation of the axes
# (deterministic: no random draws, whose order would follow the layout).
_ELEMENTWISE = {
    aten.relu.default, aten.relu6.default, aten.leaky_relu.default, aten.hardtanh.default,
    aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.tanh.default,
    aten.hardswish.default, aten.hardsigmoid.default, aten.elu.default, aten.mish.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
    aten.clone.default, aten.neg.default, aten.abs.default,
}


def rule(op: Any, args: tuple, kwargs: dict) -> Callable | None:
    """The channels-last lowering of `op` on these operands, or None: the op
    runs as translated, on operands given back in torch's layout."""
    if op in _KERNELS:
        output, starts = _KERNELS[op]
        x = args[0] if args else None
        if isinstance(x, ChannelsLast) or (starts and _is_4d(x) and _is_4d(args[1])):
            return _kernel_rule(LOWERINGS[op], output)
        return None
    if op in _ELEMENTWISE and any(isinstance(a, ChannelsLast) for a in args):
        if all(not hasattr(a, "ndim") or a.ndim <= 4 for a in args) and not any(
            isinstance(v, (ChannelsLast, jax.Array, np.ndarray)) for v in kwargs.values()
        ):
            return _elementwise_rule(LOWERINGS[op])
    return None


def _kernel_rule(lower: Callable, output: int | None) -> Callable:
    def run(ctx: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        out = lower(ctx, _last(x), *torch_layout(args), **torch_layout(kwargs), channels_last=True)
        if output is None:
            return ChannelsLast(out)
        return (*out[:output], ChannelsLast(out[output]), *out[output + 1 :])

    return run


def _elementwise_rule(lower: Callable) -> Callable:
    def run(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        if len(ctx.shape) != 4:  # broadcast to another rank: not an elementwise op of 4-D values
            return lower(ctx, *torch_layout(args), **kwargs)
        n, c, h, w = ctx.shape
        last = copy.copy(ctx)
        last.out = torch.empty((n, h, w, c), dtype=ctx.out.dtype, device="meta")
        return ChannelsLast(lower(last, *(_broadcast_last(a) for a in args), **kwargs))

    return run


def _broadcast_last(a: Any) -> Any:
    """An operand of a 4-D elementwise op, permuted like its result (scalars as they are)."""
    if isinstance(a, ChannelsLast):
        return a.array
    if not hasattr(a, "ndim") or a.ndim == 0:
        return a
    return jnp.transpose(jnp.reshape(a, (1,) * (4 - a.ndim) + tuple(a.shape)), _TO_LAST)
