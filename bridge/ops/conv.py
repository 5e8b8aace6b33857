"""Convolution ATen ops: N-d, grouped, dilated and transposed convolutions.

The high-level ops that torch.export leaves in a graph (`conv2d`,
`conv_transpose2d`, ...) and the core `convolution` they decompose into are
all lowered to one `lax.conv_general_dilated`.
"""

from __future__ import annotations

import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.operands import expand_ints, is_low_float
from bridge.ops.registry import lowering

aten = torch.ops.aten


def convolve(
    dtype, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, channels_last=False
):
    """torch's convolution in `dtype`: N-d, grouped, dilated, transposed, batched or not.

    `padding` is a list of per-dim ints or a (low, high) pair list. With
    `channels_last`, `x` and the result hold the channels last ((N, *spatial, C),
    bridge/layout.py); the weight keeps torch's layout.
    """
    nd = weight.ndim - 2
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    stride, dilation = expand_ints(stride, nd), expand_ints(dilation, nd)
    if isinstance(padding, list) and padding and isinstance(padding[0], tuple):
        pads = padding
    else:
        pads = [(p, p) for p in expand_ints(padding, nd)]
    if channels_last and not transposed and groups == 1 and all(k == 1 for k in weight.shape[2:]) and not any(
        lo or hi for lo, hi in pads
    ):
        # A pointwise convolution of channels-last values is a matmul over the
        # channels: XLA's CPU dot reads torch's (out, in) weight as it is,
        # where its convolution would first copy the weight into its own
        # kernel layout on every call.
        x = x[(slice(None), *(slice(None, None, s) for s in stride))]
        y = lax.dot_general(
            x.astype(dtype),
            weight.reshape(weight.shape[:2]).astype(dtype),
            (((x.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32 if is_low_float(dtype) else None,
        )
        if bias is not None:
            y = y + bias
        return (y[0] if unbatched else y).astype(dtype)
    spatial = "DHW"[-nd:]
    act = "N" + spatial + "C" if channels_last else "NC" + spatial
    dn = lax.conv_dimension_numbers(x.shape, weight.shape, (act, "OI" + spatial, act))
    kernel = weight.shape[2:]
    if transposed:
        # (in, out/g, *k) -> (out, in/g, *k), spatially flipped: a transposed
        # conv is the gradient of a conv, i.e. a conv of the dilated input.
        c_in, c_out_g = weight.shape[0], weight.shape[1]
        w = weight.reshape(groups, c_in // groups, c_out_g, *kernel)
        w = jnp.swapaxes(w, 1, 2).reshape(groups * c_out_g, c_in // groups, *kernel)
        w = jnp.flip(w, axis=tuple(range(2, 2 + nd)))
        out_pad = expand_ints(output_padding, nd)
        pads = [
            (d * (k - 1) - lo, d * (k - 1) - hi + op)
            for (lo, hi), k, d, op in zip(pads, kernel, dilation, out_pad, strict=True)
        ]
        strides, lhs_dilation = (1,) * nd, stride
    else:
        w, strides, lhs_dilation = weight, stride, (1,) * nd
    y = lax.conv_general_dilated(
        x.astype(dtype),
        w.astype(dtype),
        window_strides=strides,
        padding=pads,
        lhs_dilation=lhs_dilation,
        rhs_dilation=dilation,
        dimension_numbers=dn,
        feature_group_count=groups,
        preferred_element_type=jnp.float32 if is_low_float(dtype) else None,
    )
    if bias is not None:
        y = y + (bias if channels_last else bias.reshape((-1,) + (1,) * nd))
    if unbatched:
        y = y[0]
    return y.astype(dtype)


# `channels_last=True`: `x` and the result are channels-last; only bridge/layout.py passes it.


@lowering(aten.convolution.default)
def convolution(
    ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, channels_last=False
):
    return convolve(
        ctx.dtype, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, channels_last
    )


@lowering(aten._convolution.default, aten._convolution.deprecated)
def _convolution(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *flags):
    return convolve(ctx.dtype, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


@lowering(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
def conv(ctx, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, channels_last=False):
    return convolve(ctx.dtype, x, weight, bias, stride, padding, dilation, False, 0, groups, channels_last)


@lowering(aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
def conv_padding_mode(ctx, x, weight, bias=None, stride=1, padding="valid", dilation=1, groups=1):
    nd = weight.ndim - 2
    if padding == "valid":
        pads = [(0, 0)] * nd
    elif padding == "same":
        # torch puts the odd element of the total padding on the high side.
        totals = [d * (k - 1) for d, k in zip(expand_ints(dilation, nd), weight.shape[2:], strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        raise ValueError(f"conv padding must be 'valid' or 'same', got {padding!r}")
    return convolve(ctx.dtype, x, weight, bias, stride, pads, dilation, False, 0, groups)


@lowering(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def conv_transpose(
    ctx, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, channels_last=False
):
    return convolve(ctx.dtype, x, weight, bias, stride, padding, dilation, True, output_padding, groups, channels_last)
