"""Neural-network ATen ops: matmul family, convolution, pooling, normalisation,
softmax, attention, losses, interpolation, distances and recurrent layers.

The high-level ops that torch.export leaves in a graph (`linear`,
`conv2d`, `layer_norm`, `scaled_dot_product_attention`, `lstm`, ...) are lowered
directly to their fused JAX/XLA forms; the core ATen ops they decompose into
(`convolution`, `native_layer_norm`, `_softmax`, ...) are lowered too, so a graph
works whichever of the two it holds. Shapes and window geometry are static, so
index tables and divisors are computed with numpy at trace time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from bridge.ops.registry import RefusedByTorchError, lowering

aten = torch.ops.aten

_NONE, _MEAN, _SUM = 0, 1, 2  # torch's Reduction enum


def _is_low_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _acc(dtype):
    """The dtype torch accumulates in: float32 for half types, else `dtype`."""
    return jnp.float32 if _is_low_float(dtype) else dtype


def _expand(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """An int-list argument broadcast to `n` spatial dims (torch accepts length 1)."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


def _reduce(loss, reduction: int):
    if reduction == _MEAN:
        return jnp.mean(loss)
    if reduction == _SUM:
        return jnp.sum(loss)
    return loss


def _empty_or(ctx, i: int, value):
    """`value` cast to output `i`, or an empty array where torch returns one (eval mode)."""
    shape, dtype = ctx.shape_of(i), ctx.dtype_of(i)
    if math.prod(shape) == 0:
        return jnp.zeros(shape, dtype)
    if jnp.size(value) != math.prod(shape):
        return jnp.broadcast_to(value, shape).astype(dtype)
    return jnp.reshape(value, shape).astype(dtype)


# --------------------------------------------------------------------------- matmul family


def _same_dtype(ctx, *operands) -> None:
    """torch's matmul kernels refuse operands of different dtypes; so does the bridge."""
    found = [np.dtype(x.dtype) for x in operands if x is not None and hasattr(x, "dtype")]
    if len(set(found)) > 1:
        raise RefusedByTorchError(
            f"{ctx.node.target} got operands of dtypes {', '.join(d.name for d in found)}; torch "
            "requires them to be the same (\"mat1 and mat2 must have the same dtype\"). Cast the "
            "input to the module's dtype (x.astype(...)), or convert the module to the input's "
            "dtype (module.to(...)) and convert it again."
        )


def _matmul(a, b, dtype):
    """`a @ b` accumulated in float32 for half types, as torch does."""
    if _is_low_float(dtype):
        return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)
    return jnp.matmul(a.astype(dtype), b.astype(dtype))


def _add_scaled(ctx, acc, product, beta, alpha):
    """beta * acc + alpha * product, ignoring `acc` (NaNs included) when beta == 0."""
    out = product if alpha == 1 else alpha * product
    if beta != 0:
        out = out + (acc if beta == 1 else beta * acc)
    return jnp.broadcast_to(out, ctx.shape).astype(ctx.dtype)


@lowering(aten.linear.default)
def linear(ctx, x, weight, bias=None):
    _same_dtype(ctx, x, weight, bias)
    y = _matmul(x, weight.T, ctx.dtype)
    return (y if bias is None else y + bias).astype(ctx.dtype)


@lowering(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mv.default)
def matmul(ctx, a, b):
    _same_dtype(ctx, a, b)
    return _matmul(a, b, ctx.dtype)


@lowering(aten.mm.dtype, aten.bmm.dtype)
def matmul_out_dtype(ctx, a, b, out_dtype):
    return jnp.matmul(a, b, preferred_element_type=ctx.dtype)


@lowering(aten.addmm.default, aten.baddbmm.default, aten.addmv.default)
def addmm(ctx, x, a, b, *, beta=1, alpha=1):
    _same_dtype(ctx, x, a, b)
    return _add_scaled(ctx, x, _matmul(a, b, ctx.dtype), beta, alpha)


@lowering(aten.addbmm.default)
def addbmm(ctx, x, a, b, *, beta=1, alpha=1):
    _same_dtype(ctx, x, a, b)
    return _add_scaled(ctx, x, jnp.sum(_matmul(a, b, ctx.dtype), axis=0), beta, alpha)


@lowering(aten.dot.default)
def dot(ctx, a, b):
    _same_dtype(ctx, a, b)
    return _matmul(a, b, ctx.dtype)


@lowering(aten.vdot.default)
def vdot(ctx, a, b):
    _same_dtype(ctx, a, b)
    return _matmul(jnp.conj(a), b, ctx.dtype)


@lowering(aten.outer.default)
def outer(ctx, a, b):
    return (a[:, None] * b[None, :]).astype(ctx.dtype)


@lowering(aten.einsum.default)
def einsum(ctx, equation, tensors, *, path=None):
    equation = equation.replace(" ", "")
    if _is_low_float(ctx.dtype):
        return jnp.einsum(equation, *tensors, preferred_element_type=jnp.float32).astype(ctx.dtype)
    return jnp.einsum(equation, *[t.astype(ctx.dtype) for t in tensors]).astype(ctx.dtype)


@lowering(aten._trilinear.default)
def trilinear(ctx, i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1):
    """sum over `sumdim` of i1 * i2 * i3, each first unsqueezed at its `expand` dims.

    (bilinear's core: x1 (B, I) at [1, 3], weight (O, I, J) at [0], x2 (B, J)
    at [1, 2], summed over [2, 3].) One einsum; a size-1 dim facing a larger
    one broadcasts, like an expanded dim.
    """
    operands = [(i1, set(expand1)), (i2, set(expand2)), (i3, set(expand3))]
    total = i1.ndim + len(expand1)
    sizes = [1] * total
    for t, expand in operands:
        kept = [d for d in range(total) if d not in expand]
        for d, n in zip(kept, t.shape, strict=True):
            sizes[d] = max(sizes[d], n)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    subscripts, arrays, present = [], [], set()
    for t, expand in operands:
        kept = [d for d in range(total) if d not in expand]
        broadcast = [k for k, d in enumerate(kept) if t.shape[k] == 1 and sizes[d] != 1]
        t = jnp.squeeze(t, axis=tuple(broadcast)) if broadcast else t
        dims = [d for k, d in enumerate(kept) if k not in broadcast]
        present.update(dims)
        subscripts.append("".join(letters[d] for d in dims))
        arrays.append(t.astype(ctx.dtype))
    out = "".join(letters[d] for d in range(total) if d not in sumdim and d in present)
    kwargs = {"preferred_element_type": jnp.float32} if _is_low_float(ctx.dtype) else {}
    y = jnp.einsum(f"{','.join(subscripts)}->{out}", *arrays, **kwargs)
    return jnp.reshape(y, ctx.shape).astype(ctx.dtype)


@lowering(aten.tensordot.default)
def tensordot(ctx, a, b, dims_a, dims_b):
    """torch contracts a size-1 dim against any size: the other side's dim is summed first."""
    _same_dtype(ctx, a, b)
    a, b = a.astype(ctx.dtype), b.astype(ctx.dtype)
    axes = ([d % a.ndim for d in dims_a], [d % b.ndim for d in dims_b])
    for da, db in zip(*axes, strict=True):
        if b.shape[db] == 1:
            a = jnp.sum(a, axis=da, keepdims=True)
        elif a.shape[da] == 1:
            b = jnp.sum(b, axis=db, keepdims=True)
    return jnp.tensordot(a, b, axes=axes)


# --------------------------------------------------------------------------- convolution


def _conv(dtype, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """torch's convolution in `dtype`: N-d, grouped, dilated, transposed, batched or not.

    `padding` is a list of per-dim ints or a (low, high) pair list.
    """
    nd = weight.ndim - 2
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    stride, dilation = _expand(stride, nd), _expand(dilation, nd)
    if isinstance(padding, list) and padding and isinstance(padding[0], tuple):
        pads = padding
    else:
        pads = [(p, p) for p in _expand(padding, nd)]
    spatial = "DHW"[-nd:]
    dn = lax.conv_dimension_numbers(x.shape, weight.shape, ("NC" + spatial, "OI" + spatial, "NC" + spatial))
    kernel = weight.shape[2:]
    if transposed:
        # (in, out/g, *k) -> (out, in/g, *k), spatially flipped: a transposed
        # conv is the gradient of a conv, i.e. a conv of the dilated input.
        c_in, c_out_g = weight.shape[0], weight.shape[1]
        w = weight.reshape(groups, c_in // groups, c_out_g, *kernel)
        w = jnp.swapaxes(w, 1, 2).reshape(groups * c_out_g, c_in // groups, *kernel)
        w = jnp.flip(w, axis=tuple(range(2, 2 + nd)))
        out_pad = _expand(output_padding, nd)
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
        preferred_element_type=jnp.float32 if _is_low_float(dtype) else None,
    )
    if bias is not None:
        y = y + bias.reshape((-1,) + (1,) * nd)
    if unbatched:
        y = y[0]
    return y.astype(dtype)


@lowering(aten.convolution.default)
def convolution(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    return _conv(ctx.dtype, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


@lowering(aten._convolution.default, aten._convolution.deprecated)
def _convolution(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *flags):
    return _conv(ctx.dtype, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


@lowering(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
def conv(ctx, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(ctx.dtype, x, weight, bias, stride, padding, dilation, False, 0, groups)


@lowering(aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
def conv_padding_mode(ctx, x, weight, bias=None, stride=1, padding="valid", dilation=1, groups=1):
    nd = weight.ndim - 2
    if padding == "valid":
        pads = [(0, 0)] * nd
    elif padding == "same":
        # torch puts the odd element of the total padding on the high side.
        totals = [d * (k - 1) for d, k in zip(_expand(dilation, nd), weight.shape[2:], strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        raise ValueError(f"conv padding must be 'valid' or 'same', got {padding!r}")
    return _conv(ctx.dtype, x, weight, bias, stride, pads, dilation, False, 0, groups)


@lowering(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def conv_transpose(ctx, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return _conv(ctx.dtype, x, weight, bias, stride, padding, dilation, True, output_padding, groups)


# --------------------------------------------------------------------------- pooling


def _window_pads(in_sizes, out_sizes, kernel, stride, padding, dilation):
    """(low, high) padding per dim so that a VALID window walk yields `out_sizes`.

    The high side is extended past `padding` for ceil_mode, never shortened,
    so the output size is torch's (read from the graph), not re-derived.
    """
    pads = []
    for n, o, k, s, p, d in zip(in_sizes, out_sizes, kernel, stride, padding, dilation, strict=True):
        needed = (o - 1) * s + d * (k - 1) + 1
        pads.append((p, max(needed - n - p, 0)))
    return pads


def _pool_geometry(x, ctx_shape, kernel_size, stride, padding, dilation=1):
    nd = len(kernel_size)
    kernel = _expand(kernel_size, nd)
    stride = _expand(stride, nd) if stride else kernel
    padding, dilation = _expand(padding, nd), _expand(dilation, nd)
    out_sizes = tuple(ctx_shape[-nd:])
    pads = _window_pads(x.shape[-nd:], out_sizes, kernel, stride, padding, dilation)
    lead = x.ndim - nd
    return kernel, stride, padding, dilation, out_sizes, pads, lead


def _lowest(dtype):
    if jnp.issubdtype(dtype, jnp.floating):
        return -jnp.inf
    if dtype == jnp.bool_:
        return False
    return jnp.iinfo(dtype).min


@lowering(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
def max_pool(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    kernel, stride, _, dilation, _, pads, lead = _pool_geometry(x, ctx.shape, kernel_size, stride, padding, dilation)
    return lax.reduce_window(
        x,
        np.array(_lowest(x.dtype), x.dtype),  # a concrete identity selects reduce_window_max
        lax.max,
        (1,) * lead + kernel,
        (1,) * lead + stride,
        [(0, 0)] * lead + pads,
        window_dilation=(1,) * lead + dilation,
    )


def _argmax_pair(a, b):
    """Reducer over (value, flat index) pairs: larger value, NaN wins, ties -> lower index."""
    (av, ai), (bv, bi) = a, b
    a_nan, b_nan = av != av, bv != bv
    a_wins = (av > bv) | (a_nan & ~b_nan) | (((av == bv) | (a_nan & b_nan)) & (ai < bi))
    return jnp.where(a_wins, av, bv), jnp.where(a_wins, ai, bi)


def _gather_spatial(x, flat_index, nd):
    """x[..., spatial] at flat spatial indices shaped like the output."""
    lead = x.shape[: x.ndim - nd]
    flat = x.reshape(lead + (-1,))
    idx = flat_index.reshape(flat_index.shape[: len(lead)] + (-1,))
    return jnp.take_along_axis(flat, idx, axis=-1).reshape(flat_index.shape)


@lowering(
    aten.max_pool1d_with_indices.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
)
def max_pool_with_indices(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    kernel, stride, _, dilation, _, pads, lead = _pool_geometry(
        x, ctx.shape_of(0), kernel_size, stride, padding, dilation
    )
    nd = len(kernel)
    spatial = x.shape[lead:]
    index = jnp.broadcast_to(jnp.arange(math.prod(spatial), dtype=jnp.int32).reshape(spatial), x.shape)
    values = lax.stop_gradient(x)
    _, idx = lax.reduce_window(
        (values, index),
        (np.array(_lowest(x.dtype), x.dtype), np.array(np.iinfo(np.int32).max, np.int32)),
        _argmax_pair,
        (1,) * lead + kernel,
        (1,) * lead + stride,
        [(0, 0)] * lead + pads,
        window_dilation=(1,) * lead + dilation,
    )
    # Gathering the values at the indices routes the gradient to the element
    # torch picks (the first maximum), exactly like torch's backward.
    return _gather_spatial(x, idx, nd), idx.astype(ctx.dtype_of(1))


def _avg_divisor(in_sizes, out_sizes, kernel, stride, padding, count_include_pad):
    """Per-output-position divisor of torch's avg_pool, as a static array."""
    per_dim = []
    for n, o, k, s, p in zip(in_sizes, out_sizes, kernel, stride, padding, strict=True):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        if count_include_pad:
            per_dim.append(end - start)
        else:
            per_dim.append(np.minimum(end, n) - np.maximum(start, 0))
    divisor = np.ones((), np.float64)
    for d in per_dim:
        divisor = np.multiply.outer(divisor, d)
    return divisor


def _avg_pool(x, out_shape, dtype, kernel_size, stride, padding, count_include_pad, divisor_override):
    """torch's avg_pool of `x` to `out_shape` (torch's output shape, ceil_mode included)."""
    kernel, stride, padding, _, out_sizes, pads, lead = _pool_geometry(x, out_shape, kernel_size, stride, padding)
    acc = _acc(dtype)
    total = lax.reduce_window(
        x.astype(acc),
        np.array(0, acc),
        lax.add,
        (1,) * lead + kernel,
        (1,) * lead + stride,
        [(0, 0)] * lead + pads,
    )
    if divisor_override:
        divisor = divisor_override
    else:
        divisor = _avg_divisor(x.shape[lead:], out_sizes, kernel, stride, padding, count_include_pad)
        divisor = jnp.asarray(divisor, acc)
    if jnp.issubdtype(dtype, jnp.integer):
        return (total // divisor).astype(dtype)
    return (total / divisor).astype(dtype)


@lowering(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
def avg_pool(
    ctx, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    return _avg_pool(x, ctx.shape, ctx.dtype, kernel_size, stride, padding, count_include_pad, divisor_override)


def _adaptive_windows(n: int, o: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's adaptive pooling windows: [floor(i*n/o), ceil((i+1)*n/o))."""
    i = np.arange(o)
    return (i * n) // o, -((-(i + 1) * n) // o)


@lowering(
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
)
def adaptive_avg_pool(ctx, x, output_size):
    return _adaptive_avg_pool(x, ctx.shape, ctx.dtype, len(output_size))


def _adaptive_avg_pool(x, out_shape, dtype, nd):
    """torch's adaptive_avg_pool of the last `nd` dims of `x` to `out_shape`."""
    acc = _acc(dtype)
    y = x.astype(acc)
    for axis in range(x.ndim - nd, x.ndim):
        n, o = y.shape[axis], out_shape[axis]
        if n % o == 0:  # equal windows: a reshape and a mean
            y = jnp.mean(y.reshape(y.shape[:axis] + (o, n // o) + y.shape[axis + 1 :]), axis=axis + 1)
            continue
        start, end = _adaptive_windows(n, o)
        cols = np.arange(n)
        matrix = ((cols >= start[:, None]) & (cols < end[:, None])) / (end - start)[:, None]
        y = jnp.moveaxis(jnp.tensordot(y, jnp.asarray(matrix.T, acc), axes=([axis], [0])), -1, axis)
    return y.astype(dtype)


@lowering(aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def adaptive_max_pool(ctx, x, output_size):
    nd = len(output_size)
    lead = x.ndim - nd
    in_sizes, out_sizes = x.shape[lead:], ctx.shape_of(0)[lead:]
    # Flat input indices of every window, padded to the largest window with -1.
    flat = np.zeros((1, 1), np.int64)
    valid = np.ones((1, 1), bool)
    for n, o in zip(in_sizes, out_sizes, strict=True):
        start, end = _adaptive_windows(n, o)
        width = int((end - start).max())
        pos = start[:, None] + np.arange(width)
        ok = pos < end[:, None]
        pos = np.where(ok, pos, 0)
        flat = (flat[:, None, :, None] * n + pos[None, :, None, :]).reshape(flat.shape[0] * o, -1)
        valid = (valid[:, None, :, None] & ok[None, :, None, :]).reshape(flat.shape)
    xs = x.reshape(x.shape[:lead] + (-1,))
    windows = jnp.take(lax.stop_gradient(xs), jnp.asarray(flat), axis=-1)
    windows = jnp.where(jnp.asarray(valid), windows, _lowest(x.dtype))
    # argmax with NaN winning and ties resolved to the first (lowest) index.
    is_nan = windows != windows
    best = jnp.where(jnp.any(is_nan, axis=-1), jnp.argmax(is_nan, axis=-1), jnp.argmax(windows, axis=-1))
    idx = jnp.take_along_axis(jnp.broadcast_to(jnp.asarray(flat), windows.shape), best[..., None], axis=-1)[..., 0]
    idx = idx.reshape(x.shape[:lead] + tuple(out_sizes)).astype(jnp.int32)
    return _gather_spatial(x, idx, nd), idx.astype(ctx.dtype_of(1))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _unpool_scatter(values, index, size: int):
    """values (P, K) written at flat positions index (P, K) of P planes of `size` elements."""
    rows = jnp.arange(values.shape[0])[:, None]
    out = jnp.zeros((values.shape[0], size), values.dtype)
    return out.at[rows, index].set(values, mode="drop")


@_unpool_scatter.defjvp
def _unpool_scatter_jvp(size, primals, tangents):
    # torch's max_unpool backward gathers the gradient at the indices, so an
    # input whose index another input shares still gets the gradient there
    # (the forward keeps one of them). A scatter-add tangent transposes to
    # exactly that gather.
    values, index = primals
    rows = jnp.arange(values.shape[0])[:, None]
    tangent = jnp.zeros((values.shape[0], size), values.dtype)
    tangent = tangent.at[rows, index].add(tangents[0], mode="drop")
    return _unpool_scatter(values, index, size), tangent


def _max_unpool(ctx, x, indices, nd):
    """Each value of x written at its flat spatial index of the output planes."""
    out_shape = ctx.shape
    planes = math.prod(out_shape[:-nd])
    size = math.prod(out_shape[-nd:])
    values = x.reshape(planes, -1)
    index = indices.reshape(planes, -1).astype(jnp.int32)
    if values.size == 0 or size == 0:
        return jnp.zeros(out_shape, ctx.dtype)
    out = _unpool_scatter(values, index, size)
    return out.reshape(out_shape).astype(ctx.dtype)


@lowering(aten.max_unpool2d.default)
def max_unpool2d(ctx, x, indices, output_size):
    return _max_unpool(ctx, x, indices, 2)


@lowering(aten.max_unpool3d.default)
def max_unpool3d(ctx, x, indices, output_size, stride, padding):
    return _max_unpool(ctx, x, indices, 3)


def _fractional_starts(sample, n: int, o: int, k: int):
    """torch's pseudo-random window starts along one dim, per plane: (..., o) int32.

    start_i = int((i + u) * alpha) - int(u * alpha), alpha = (n - k) / (o - 1),
    and the last window ends at the input's end; computed in the samples'
    dtype as torch does, so the truncations agree.
    """
    dt = sample.dtype
    last = jnp.full(sample.shape + (1,), n - k, jnp.int32)
    if o == 1:
        return last
    alpha = jnp.asarray(n - k, dt) / jnp.asarray(o - 1, dt)
    u = sample[..., None]
    i = jnp.arange(o - 1, dtype=dt)
    starts = ((i + u) * alpha).astype(jnp.int32) - (u * alpha).astype(jnp.int32)
    return jnp.concatenate([starts, last], axis=-1)


def _fractional_max_pool(ctx, x, kernel_size, output_size, samples, nd):
    """fractional_max_pool{2,3}d: max over windows placed by `samples` (N, C, nd).

    torch reads the samples as (W, H) in 2-D and (T, H, W) in 3-D. Ties go to
    the first position in the window, and a NaN wins (the last NaN).
    """
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[None]
    kernel, out_sizes = _expand(kernel_size, nd), _expand(output_size, nd)
    in_sizes = x.shape[2:]
    lead = x.shape[:2]
    samples = jnp.reshape(samples, lead + (nd,))
    sample_axis = (1, 0) if nd == 2 else (0, 1, 2)
    strides = [math.prod(in_sizes[k + 1 :]) for k in range(nd)]
    # Flat input index of every (output position, window offset), shaped
    # (N, C, *out_sizes, *kernel), built one dim at a time.
    flat = jnp.zeros(lead + (1,) * (2 * nd), jnp.int32)
    for k in range(nd):
        starts = _fractional_starts(samples[..., sample_axis[k]], in_sizes[k], out_sizes[k], kernel[k])
        term = (starts[..., :, None] + jnp.arange(kernel[k], dtype=jnp.int32)) * strides[k]
        shape = [1] * (2 * nd)
        shape[k], shape[nd + k] = out_sizes[k], kernel[k]
        flat = flat + term.reshape(lead + tuple(shape))
    flat = flat.reshape(lead + tuple(out_sizes) + (-1,))
    windows = _gather_spatial(lax.stop_gradient(x), flat, nd)
    is_nan = windows != windows
    width = windows.shape[-1]
    last_nan = width - 1 - jnp.argmax(jnp.flip(is_nan, axis=-1), axis=-1)
    best = jnp.where(jnp.any(is_nan, axis=-1), last_nan, jnp.argmax(windows, axis=-1))
    idx = jnp.take_along_axis(flat, best[..., None], axis=-1)[..., 0]
    out = _gather_spatial(x, idx, nd)  # gathering routes the gradient to the chosen element
    if unbatched:
        out, idx = out[0], idx[0]
    return out.astype(ctx.dtype_of(0)), idx.astype(ctx.dtype_of(1))


@lowering(aten.fractional_max_pool2d.default)
def fractional_max_pool2d(ctx, x, kernel_size, output_size, random_samples):
    return _fractional_max_pool(ctx, x, kernel_size, output_size, random_samples, 2)


@lowering(aten.fractional_max_pool3d.default)
def fractional_max_pool3d(ctx, x, kernel_size, output_size, random_samples):
    return _fractional_max_pool(ctx, x, kernel_size, output_size, random_samples, 3)


# --------------------------------------------------------------------------- normalisation


def _normalize(x, axes, eps, acc):
    """(x - mean) * rstd over `axes`, with mean and rstd kept (biased variance)."""
    xf = x.astype(acc)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    rstd = lax.rsqrt(var + eps)
    return (xf - mean) * rstd, mean, rstd


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


@lowering(aten.native_layer_norm.default)
def native_layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    y, mean, rstd = _normalize(x, axes, eps, _acc(x.dtype))
    y = _affine(y, weight, bias, tuple(normalized_shape))
    # torch's mean and rstd outputs are not differentiable (no gradient flows back through them).
    mean, rstd = lax.stop_gradient(mean), lax.stop_gradient(rstd)
    return y.astype(ctx.dtype_of(0)), _empty_or(ctx, 1, mean), _empty_or(ctx, 2, rstd)


@lowering(aten.layer_norm.default)
def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    y, _, _ = _normalize(x, axes, eps, _acc(x.dtype))
    return _affine(y, weight, bias, tuple(normalized_shape)).astype(ctx.dtype)


def _group_norm(x, groups, weight, bias, eps):
    n, c = x.shape[0], x.shape[1]
    grouped = x.reshape(n, groups, (c // groups) * math.prod(x.shape[2:]))
    y, mean, rstd = _normalize(grouped, (2,), eps, _acc(x.dtype))
    y = _affine(y.reshape(x.shape), weight, bias, (c,) + (1,) * (x.ndim - 2))
    return y, mean.reshape(n, groups), rstd.reshape(n, groups)


@lowering(aten.group_norm.default)
def group_norm(ctx, x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return _group_norm(x, num_groups, weight, bias, eps)[0].astype(ctx.dtype)


@lowering(aten.native_group_norm.default)
def native_group_norm(ctx, x, weight, bias, n, c, hxw, group, eps):
    y, mean, rstd = _group_norm(x.reshape(n, c, hxw), group, weight, bias, eps)
    return y.reshape(x.shape).astype(ctx.dtype_of(0)), _empty_or(ctx, 1, mean), _empty_or(ctx, 2, rstd)


@lowering(aten.rms_norm.default)
def rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    return _rms_norm(x, normalized_shape, weight, eps)[0].astype(ctx.dtype)


@lowering(aten._fused_rms_norm.default)
def fused_rms_norm(ctx, x, normalized_shape, weight, eps):
    y, rstd = _rms_norm(x, normalized_shape, weight, eps)
    return y.astype(ctx.dtype_of(0)), _empty_or(ctx, 1, rstd)


def _rms_norm(x, normalized_shape, weight, eps):
    acc = _acc(x.dtype)
    eps = float(jnp.finfo(x.dtype).eps) if eps is None else eps
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = x.astype(acc)
    rstd = lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight
    return y, rstd


def _channel_shape(x):
    return (1, -1) + (1,) * (x.ndim - 2)


def _batch_stats(x):
    axes = (0,) + tuple(range(2, x.ndim))
    acc = _acc(x.dtype)
    xf = x.astype(acc)
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean.reshape(_channel_shape(x))), axis=axes)
    return mean, var, math.prod(x.shape) // x.shape[1]


def _batch_norm_apply(x, weight, bias, mean, var, eps, dtype):
    shape = _channel_shape(x)
    acc = _acc(x.dtype)
    rstd = lax.rsqrt(var.astype(acc) + eps)
    y = (x.astype(acc) - mean.astype(acc).reshape(shape)) * rstd.reshape(shape)
    return _affine(y, weight, bias, shape).astype(dtype), rstd


@lowering(aten._native_batch_norm_legit.default)
def native_batch_norm_legit(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    if training:
        mean, var, _ = _batch_stats(x)
    else:
        mean, var = running_mean, running_var
    y, rstd = _batch_norm_apply(x, weight, bias, mean, var, eps, ctx.dtype_of(0))
    # As in torch, the saved mean and rstd outputs carry no gradient.
    return y, _empty_or(ctx, 1, lax.stop_gradient(mean)), _empty_or(ctx, 2, lax.stop_gradient(rstd))


@lowering(aten._native_batch_norm_legit.no_stats)
def native_batch_norm_legit_no_stats(ctx, x, weight, bias, training, momentum, eps):
    mean, var, _ = _batch_stats(x)
    y, rstd = _batch_norm_apply(x, weight, bias, mean, var, eps, ctx.dtype_of(0))
    # As in torch, the saved mean and rstd outputs carry no gradient.
    return y, _empty_or(ctx, 1, lax.stop_gradient(mean)), _empty_or(ctx, 2, lax.stop_gradient(rstd))


@lowering(aten._native_batch_norm_legit_no_training.default)
def native_batch_norm_legit_no_training(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
    y, _ = _batch_norm_apply(x, weight, bias, running_mean, running_var, eps, ctx.dtype_of(0))
    return y, _empty_or(ctx, 1, jnp.zeros(())), _empty_or(ctx, 2, jnp.zeros(()))


@lowering(aten._native_batch_norm_legit_functional.default)
def native_batch_norm_legit_functional(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Batch norm that returns the new running statistics instead of mutating them.

    running = (1 - momentum) * running + momentum * batch, with the batch
    variance unbiased (n / (n - 1)) for running_var, as torch updates it.
    """
    if not training:
        y, _ = _batch_norm_apply(x, weight, bias, running_mean, running_var, eps, ctx.dtype_of(0))
        return y, _empty_or(ctx, 1, jnp.zeros(())), _empty_or(ctx, 2, jnp.zeros(())), running_mean, running_var
    y, mean, rstd, new_mean, new_var = _batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps,
                                                         ctx.dtype_of(0))
    return (
        y,
        _empty_or(ctx, 1, mean),
        _empty_or(ctx, 2, rstd),
        new_mean.astype(ctx.dtype_of(3)),
        new_var.astype(ctx.dtype_of(4)),
    )


def _batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps, dtype):
    """Training-mode batch norm: output, saved mean and rstd, new running stats.

    torch updates the running statistics inside the kernel, outside
    autograd: the update carries no gradient to the input, and the running
    tensor's own gradient passes through unchanged. The same here, so
    gradients match torch.autograd on the exported (functional) graph.
    """
    mean, var, n = _batch_stats(x)
    y, rstd = _batch_norm_apply(x, weight, bias, mean, var, eps, dtype)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * (n / max(n - 1, 1))
    new_mean = running_mean + lax.stop_gradient(new_mean - running_mean)
    new_var = running_var + lax.stop_gradient(new_var - running_var)
    return y, lax.stop_gradient(mean), lax.stop_gradient(rstd), new_mean, new_var


@lowering(aten._batch_norm_with_update_functional.default)
def batch_norm_with_update_functional(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
    y, mean, rstd, new_mean, new_var = _batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps,
                                                         ctx.dtype_of(0))
    reserve = jnp.zeros(ctx.shape_of(3), ctx.dtype_of(3))  # cuDNN's workspace; empty on the CPU
    return (y, mean.astype(ctx.dtype_of(1)), rstd.astype(ctx.dtype_of(2)), reserve,
            new_mean.astype(ctx.dtype_of(4)), new_var.astype(ctx.dtype_of(5)))


@lowering(aten.instance_norm.default)
def instance_norm(ctx, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
    if not use_input_stats:
        y, _ = _batch_norm_apply(x, weight, bias, running_mean, running_var, eps, ctx.dtype)
        return y
    if running_mean is not None:
        raise NotImplementedError(
            "instance_norm with track_running_stats=True in training mode updates its running "
            "statistics in place, which torch.export does not record, so bridge would drop "
            "the update. Put the InstanceNorm module in eval() mode, or construct it with "
            "track_running_stats=False."
        )
    y, _, _ = _normalize(x, tuple(range(2, x.ndim)), eps, _acc(x.dtype))
    return _affine(y, weight, bias, _channel_shape(x)).astype(ctx.dtype)


# --------------------------------------------------------------------------- softmax


def _softmax_input(x, dim, dtype):
    x = x.astype(_acc(dtype))
    if x.ndim == 0:
        return x.reshape(1), 0
    return x, dim % x.ndim


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax_of(x, axis):
    """jax.nn.softmax with torch's derivative, taken from the output: y * (dx - sum(y * dx)).

    JAX differentiates exp(x - max) / sum through the division; compiled
    under jit, that leaves a small nonzero gradient on a saturated row (y is
    1 and 0s, where torch's formula gives exactly 0), which the layers after
    it amplify (multi-head attention: 2e-3 where torch, float64 and a central
    difference give 0; without jit the same expression gives 0).
    """
    return jax.nn.softmax(x, axis=axis)


@_softmax_of.defjvp
def _softmax_of_jvp(axis, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _softmax_of(x, axis)
    return y, y * (dx - jnp.sum(y * dx, axis=axis, keepdims=True))


@lowering(aten._softmax.default)
def _softmax(ctx, x, dim, half_to_float):
    x, dim = _softmax_input(x, dim, x.dtype)
    return _softmax_of(x, dim).reshape(ctx.shape).astype(ctx.dtype)


@lowering(aten._log_softmax.default)
def _log_softmax(ctx, x, dim, half_to_float):
    x, dim = _softmax_input(x, dim, x.dtype)
    return jax.nn.log_softmax(x, axis=dim).reshape(ctx.shape).astype(ctx.dtype)


@lowering(aten.softmax.int)
def softmax(ctx, x, dim, dtype=None):
    x, dim = _softmax_input(x.astype(ctx.dtype), dim, ctx.dtype)
    return _softmax_of(x, dim).reshape(ctx.shape).astype(ctx.dtype)


@lowering(aten.log_softmax.int)
def log_softmax(ctx, x, dim, dtype=None):
    x, dim = _softmax_input(x.astype(ctx.dtype), dim, ctx.dtype)
    return jax.nn.log_softmax(x, axis=dim).reshape(ctx.shape).astype(ctx.dtype)


def _safe_softmax_impl(x, dim):
    """Softmax whose fully masked (all -inf) rows are 0 instead of NaN.

    The masked rows go through the softmax as zeros, so that their gradient
    is 0 like torch's, not the NaN that a softmax of -inf rows back-propagates.
    """
    masked_rows = jnp.all(x == -jnp.inf, axis=dim, keepdims=True)
    out = _softmax_of(jnp.where(masked_rows, 0.0, x), dim)
    return jnp.where(masked_rows, 0.0, out)


@lowering(aten._safe_softmax.default)
def safe_softmax(ctx, x, dim, dtype=None):
    x, dim = _softmax_input(x.astype(ctx.dtype), dim, ctx.dtype)
    return _safe_softmax_impl(x, dim).reshape(ctx.shape).astype(ctx.dtype)


# --------------------------------------------------------------------------- attention


def _attention(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa=False):
    """torch's math SDPA; returns (output, logsumexp of the scaled scores)."""
    dtype = q.dtype
    acc = _acc(dtype)
    length, source, depth = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(depth) if scale is None else scale
    if enable_gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        k = jnp.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
        v = jnp.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)
    scores = jnp.matmul(
        q.astype(acc) * scale, jnp.swapaxes(k.astype(acc), -1, -2), preferred_element_type=acc
    )
    if is_causal:
        causal = jnp.tril(jnp.ones((length, source), jnp.bool_))
        scores = jnp.where(causal, scores, -jnp.inf)
    if mask is not None:
        if mask.dtype == jnp.bool_:
            scores = jnp.where(mask, scores, -jnp.inf)
        else:
            scores = scores + mask.astype(acc)
    lse = jax.nn.logsumexp(scores, axis=-1)
    weights = _safe_softmax_impl(scores, -1)
    if dropout_p > 0:
        keep = jax.random.bernoulli(ctx.key(), 1.0 - dropout_p, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_p), 0.0)
    out = jnp.matmul(weights, v.astype(acc), preferred_element_type=acc)
    return out.astype(dtype), lse


@lowering(aten.scaled_dot_product_attention.default)
def scaled_dot_product_attention(
    ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
):
    return _attention(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0].astype(ctx.dtype)


@lowering(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_flash_cpu(ctx, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    out, lse = _attention(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale)
    return out.astype(ctx.dtype_of(0)), _empty_or(ctx, 1, lse)


@lowering(aten._scaled_dot_product_efficient_attention.default)
def sdpa_efficient(ctx, q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    out, lse = _attention(ctx, q, k, v, attn_bias, dropout_p, is_causal, scale)
    # torch pads the logsumexp's query axis to a multiple of 32; positions past
    # the real queries hold no values anyone reads.
    lse_shape = ctx.shape_of(1)
    if math.prod(lse_shape):
        pad = lse_shape[-1] - lse.shape[-1]
        lse = jnp.pad(lse, [(0, 0)] * (lse.ndim - 1) + [(0, pad)], constant_values=jnp.inf)
    seed = jnp.zeros(ctx.shape_of(2), ctx.dtype_of(2))
    offset = jnp.zeros(ctx.shape_of(3), ctx.dtype_of(3))
    return out.astype(ctx.dtype_of(0)), _empty_or(ctx, 1, lse), seed, offset


# --------------------------------------------------------------------------- losses


def _nll(logp, target, weight, reduction, ignore_index):
    """nll_loss over class dim 1 (0 for unbatched input); returns (loss, total_weight)."""
    class_dim = 0 if logp.ndim == 1 else 1
    valid = target != ignore_index
    safe = jnp.where(valid, target, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(logp, jnp.expand_dims(safe, class_dim), axis=class_dim)
    picked = jnp.squeeze(picked, class_dim)
    w = jnp.ones((), logp.dtype) if weight is None else jnp.take(weight, safe).astype(logp.dtype)
    w = jnp.where(valid, w, 0)
    loss = -picked * w
    total = jnp.sum(jnp.broadcast_to(w, loss.shape))
    if reduction == _MEAN:
        return jnp.sum(loss) / total, total
    if reduction == _SUM:
        return jnp.sum(loss), total
    return loss, total


@lowering(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def nll_loss_forward(ctx, x, target, weight, reduction, ignore_index):
    loss, total = _nll(x, target, weight, reduction, ignore_index)
    return loss.astype(ctx.dtype_of(0)), _empty_or(ctx, 1, total)


@lowering(aten.nll_loss.default, aten.nll_loss_nd.default)
def nll_loss(ctx, x, target, weight=None, reduction=_MEAN, ignore_index=-100):
    return _nll(x, target, weight, reduction, ignore_index)[0].astype(ctx.dtype)


@lowering(aten.cross_entropy_loss.default)
def cross_entropy_loss(ctx, x, target, weight=None, reduction=_MEAN, ignore_index=-100, label_smoothing=0.0):
    class_dim = 0 if x.ndim == 1 else 1
    n_classes = x.shape[class_dim]
    acc = _acc(x.dtype)
    logp = jax.nn.log_softmax(x.astype(acc), axis=class_dim)
    w_shape = [1] * x.ndim
    w_shape[class_dim] = n_classes
    w = None if weight is None else weight.astype(acc).reshape(w_shape)
    if jnp.issubdtype(target.dtype, jnp.floating):  # class probabilities
        if label_smoothing > 0:
            target = target * (1 - label_smoothing) + label_smoothing / n_classes
        terms = logp * target if w is None else logp * target * w
        loss = -jnp.sum(terms, axis=class_dim)
        if reduction == _MEAN:
            return (jnp.sum(loss) / (x.size // n_classes if x.size else 1)).astype(ctx.dtype)
        return _reduce(loss, reduction).astype(ctx.dtype)
    nll, total = _nll(logp, target, weight, reduction, ignore_index)
    if label_smoothing <= 0:
        return nll.astype(ctx.dtype)
    smooth = -jnp.sum(logp if w is None else logp * w, axis=class_dim)
    smooth = jnp.where(target == ignore_index, 0.0, smooth)
    if reduction == _MEAN:
        smooth = jnp.sum(smooth) / total
    else:
        smooth = _reduce(smooth, reduction)
    return ((1 - label_smoothing) * nll + smooth * (label_smoothing / n_classes)).astype(ctx.dtype)


@lowering(aten.mse_loss.default)
def mse_loss(ctx, x, target, reduction=_MEAN):
    return _reduce(jnp.square(x - target), reduction).astype(ctx.dtype)


@lowering(aten.l1_loss.default)
def l1_loss(ctx, x, target, reduction=_MEAN):
    return _reduce(jnp.abs(x - target), reduction).astype(ctx.dtype)


@lowering(aten.smooth_l1_loss.default)
def smooth_l1_loss(ctx, x, target, reduction=_MEAN, beta=1.0):
    z = jnp.abs(x - target)
    if beta == 0:
        return _reduce(z, reduction).astype(ctx.dtype)
    loss = jnp.where(z < beta, 0.5 * jnp.square(z) / beta, z - 0.5 * beta)
    return _reduce(loss, reduction).astype(ctx.dtype)


@lowering(aten.huber_loss.default)
def huber_loss(ctx, x, target, reduction=_MEAN, delta=1.0):
    z = jnp.abs(x - target)
    loss = jnp.where(z < delta, 0.5 * jnp.square(z), delta * (z - 0.5 * delta))
    return _reduce(loss, reduction).astype(ctx.dtype)


@lowering(aten.binary_cross_entropy.default)
def binary_cross_entropy(ctx, x, target, weight=None, reduction=_MEAN):
    # torch clamps the logs at -100 so that x in {0, 1} gives a finite loss.
    log_x = jnp.maximum(jnp.log(x), -100.0)
    log_1mx = jnp.maximum(jnp.log1p(-x), -100.0)
    loss = -(target * log_x + (1 - target) * log_1mx)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction).astype(ctx.dtype)


@lowering(aten.binary_cross_entropy_with_logits.default)
def binary_cross_entropy_with_logits(ctx, x, target, weight=None, pos_weight=None, reduction=_MEAN):
    log_weight = 1.0 if pos_weight is None else 1 + (pos_weight - 1) * target
    loss = (1 - target) * x - log_weight * jax.nn.log_sigmoid(x)
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction).astype(ctx.dtype)


@lowering(aten.kl_div.default)
def kl_div(ctx, x, target, reduction=_MEAN, *, log_target=False):
    if log_target:
        loss = jnp.exp(target) * (target - x)
    else:
        loss = jax.scipy.special.xlogy(target, target) - target * x
    return _reduce(loss, reduction).astype(ctx.dtype)


def _chunked_lce_rows(x, linear_weight, target, linear_bias, weight, ignore_index):
    """Per-row weighted cross entropy of logits x @ W.T (+ b): (loss_n, weight_n).

    weight_n is the class weight of the row's target (1 without weights), 0
    for ignored rows; loss_n = weight_n * (logsumexp(logits_n) - logits_n[t_n]).
    """
    acc = _acc(x.dtype)
    logits = _matmul(x, linear_weight.T, acc)
    if linear_bias is not None:
        logits = logits + linear_bias.astype(acc)
    ignored = target == ignore_index
    if weight is not None:
        weight = lax.stop_gradient(weight)  # the class weights get no gradient in torch's custom ops
    safe = jnp.where(ignored, 0, target).astype(jnp.int32)
    picked = jnp.take_along_axis(logits, safe[:, None], axis=1)[:, 0]
    row_weight = jnp.ones(target.shape, acc) if weight is None else jnp.take(weight, safe).astype(acc)
    row_weight = jnp.where(ignored, 0, row_weight)
    return row_weight * (jax.nn.logsumexp(logits, axis=1) - picked), row_weight


def _register_torch_nn_ops():
    """torch.nn's chunked linear_cross_entropy custom ops exist once their module is imported."""
    try:
        import torch.nn.modules.linear_cross_entropy  # noqa: F401
    except ImportError:  # a torch without linear_cross_entropy
        return
    ops = torch.ops.torch_nn

    @lowering(ops._linear_cross_entropy_batch_chunked.default)
    def linear_cross_entropy_chunked(
        ctx, x, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
        batch_chunk_size, acc_policy, acc_dtype, allow_retain_graph, compute_input_grad,
        compute_linear_weight_grad, compute_linear_bias_grad,
    ):
        """(loss, grad_input, grad_linear_weight, grad_linear_bias) with reduction 'mean' or 'sum'.

        torch computes the gradients in the forward (batch-chunked, to save
        memory) and its backward scales them; here the loss is differentiable
        as is and the precomputed gradients, when the graph asks for them, are
        its VJP at 1 (carrying no gradient themselves, as in torch).
        """
        if label_smoothing > 0:
            raise NotImplementedError("linear_cross_entropy does not support label smoothing")

        def loss_of(inp, lw, lb):
            rows, row_weight = _chunked_lce_rows(inp, lw, target, lb, weight, ignore_index)
            if reduction == "mean":
                # An all-ignored (or empty) batch gives NaN, like torch.
                total = jnp.sum(row_weight)
                return jnp.sum(rows) / jnp.where(total == 0, jnp.nan, total)
            return jnp.sum(rows)

        loss = loss_of(x, linear_weight, linear_bias)
        grads = [jnp.zeros(ctx.shape_of(i), ctx.dtype_of(i)) for i in (1, 2, 3)]
        wanted = [compute_input_grad, compute_linear_weight_grad, compute_linear_bias_grad and linear_bias is not None]
        if any(wanted):
            args = (x, linear_weight, linear_bias)
            _, vjp = jax.vjp(loss_of, *[lax.stop_gradient(a) if a is not None else None for a in args])
            computed = vjp(jnp.ones((), loss.dtype))
            grads = [
                jnp.reshape(g, ctx.shape_of(i + 1)).astype(ctx.dtype_of(i + 1)) if w else grads[i]
                for i, (g, w) in enumerate(zip(computed, wanted, strict=True))
            ]
        return (loss.astype(ctx.dtype_of(0)), *grads)

    @lowering(ops._linear_cross_entropy_batch_chunked_no_reduction.default)
    def linear_cross_entropy_chunked_none(
        ctx, x, linear_weight, target, linear_bias, weight, ignore_index, batch_chunk_size, acc_policy, acc_dtype
    ):
        """Per-row loss (N,) of linear_cross_entropy with reduction='none'."""
        rows, _ = _chunked_lce_rows(x, linear_weight, target, linear_bias, weight, ignore_index)
        return rows.astype(ctx.dtype)


_register_torch_nn_ops()


# --------------------------------------------------------------------------- interpolation


def _scale_value(scale, n: int, o: int, dtype=np.float32):
    """torch's compute_scales_value, in `dtype` (torch's opmath) as torch computes it."""
    if scale is not None and scale > 0:
        return dtype(1.0 / scale)
    return dtype(n) / dtype(o)


def _nearest_index(n: int, o: int, scale, exact: bool) -> np.ndarray:
    dst = np.arange(o, dtype=np.float32)
    if not exact and o == n:
        return np.arange(o)
    if not exact and o == 2 * n:
        return np.arange(o) >> 1
    s = _scale_value(scale, n, o)
    src = np.floor((dst + np.float32(0.5)) * s) if exact else np.floor(dst * s)
    return np.minimum(src.astype(np.int64), n - 1)


def _source_coords(n: int, o: int, scale, align_corners: bool, dtype=np.float32) -> np.ndarray:
    """The input coordinate of each output position, in `dtype` as torch computes it
    (area_pixel_compute_source_index in opmath: double for float64 images, else
    float; before the linear modes clamp it at 0)."""
    if align_corners:
        ratio = dtype(n - 1) / dtype(o - 1) if o > 1 else dtype(0)
        return ratio * np.arange(o, dtype=dtype)
    ratio = _scale_value(scale, n, o, dtype)
    return ratio * (np.arange(o, dtype=dtype) + dtype(0.5)) - dtype(0.5)


def _linear_taps(n: int, o: int, scale, align_corners: bool, dtype=np.float32):
    """(indices, weights) of the two taps per output position (torch's upsample_linear)."""
    if o == n:
        return [np.arange(o)], [np.ones(o, dtype)]
    src = _source_coords(n, o, scale, align_corners, dtype)
    if not align_corners:
        src = np.maximum(src, dtype(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    lam = np.clip(src - i0.astype(dtype), 0, 1).astype(dtype)
    i1 = i0 + (i0 < n - 1)
    return [i0, i1], [dtype(1) - lam, lam]


def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2 (torch's A = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _cubic_taps(n: int, o: int, scale, align_corners: bool, dtype=np.float32):
    """(indices, weights) of the four taps per output position."""
    src = _source_coords(n, o, scale, align_corners, dtype)
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(dtype))
    base = base.astype(np.int64)
    indices = [np.clip(base + k, 0, n - 1) for k in (-1, 0, 1, 2)]
    return indices, weights


def _resample(x, out_spatial, taps_for_dim):
    """Separable resampling: per spatial dim, a weighted sum of gathered taps."""
    nd = len(out_spatial)
    acc = _acc(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    y = x.astype(acc)
    for k in range(nd):
        axis = x.ndim - nd + k
        indices, weights = taps_for_dim(k, y.shape[axis], out_spatial[k])
        if weights is None:
            y = jnp.take(y, jnp.asarray(indices), axis=axis)
            continue
        if not jnp.issubdtype(y.dtype, jnp.inexact):
            y, acc = y.astype(jnp.float32), jnp.float32  # integer images are resampled in float32
        shape = [1] * y.ndim
        shape[axis] = out_spatial[k]
        total = None
        for idx, w in zip(indices, weights, strict=True):
            term = jnp.take(y, jnp.asarray(idx), axis=axis) * jnp.asarray(w, acc).reshape(shape)
            total = term if total is None else total + term
        y = total
    return y


def _resampled(y, dtype):
    """A resampled image in torch's output dtype: integer images are rounded and clamped."""
    if jnp.issubdtype(dtype, jnp.integer) and jnp.issubdtype(y.dtype, jnp.inexact):
        info = jnp.iinfo(dtype)
        y = jnp.clip(jnp.round(y), info.min, info.max)
    return y.astype(dtype)


def _scales(nd, scales):
    scales = list(scales) if scales else []
    return scales + [None] * (nd - len(scales))


def _upsample_nearest(ctx, x, nd, scales, exact):
    scales = _scales(nd, scales)
    out = ctx.shape[-nd:]
    return _resample(x, out, lambda k, n, o: (_nearest_index(n, o, scales[k], exact), None)).astype(ctx.dtype)


def _upsample_linear(ctx, x, nd, align_corners, scales, cubic=False):
    scales = _scales(nd, scales)
    taps = _cubic_taps if cubic else _linear_taps
    out = ctx.shape[-nd:]
    # torch computes coordinates and weights in opmath: double for float64 images
    coord = np.float64 if x.dtype == jnp.float64 else np.float32
    return _resampled(
        _resample(x, out, lambda k, n, o: taps(n, o, scales[k], align_corners, coord)), ctx.dtype
    )


def _antialias_taps(n: int, o: int, scale, align_corners: bool):
    """(indices, weights) of torch's antialiased (PIL-style) bilinear resampling.

    Output i averages the inputs within `support` of its centre
    scale * (i + 0.5), weighted by a triangle filter stretched by the scale
    when downsampling, and normalised to sum to 1. Slots past a window's
    width get weight 0.
    """
    if align_corners:
        ratio = (n - 1) / (o - 1) if o > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale is not None and scale > 0 else n / o
    ratio = float(np.float32(ratio))
    support = ratio if ratio >= 1.0 else 1.0  # interp_size / 2 = 1, stretched by the scale
    invscale = 1.0 / ratio if ratio >= 1.0 else 1.0
    width = int(math.ceil(support)) * 2 + 1
    center = ratio * (np.arange(o) + 0.5)
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    size = np.clip(np.minimum(np.trunc(center + support + 0.5), n).astype(np.int64) - start, 0, width)
    j = np.arange(width)
    weights = np.maximum(0.0, 1.0 - np.abs((j[None, :] + start[:, None] - center[:, None] + 0.5) * invscale))
    weights = np.where(j[None, :] < size[:, None], weights, 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0, weights / np.where(total != 0, total, 1), weights)
    indices = np.minimum(start[:, None] + j[None, :], n - 1)
    return [indices[:, k] for k in range(width)], [weights[:, k].astype(np.float32) for k in range(width)]


def _upsample_antialias(ctx, x, align_corners, scales):
    scales = _scales(2, scales)
    out = ctx.shape[-2:]
    taps = lambda k, n, o: _antialias_taps(n, o, scales[k], align_corners)  # noqa: E731
    return _resampled(_resample(x, out, taps), ctx.dtype)


@lowering(aten._upsample_bilinear2d_aa.default)
def upsample_bilinear2d_aa(ctx, x, output_size, align_corners, scales_h=None, scales_w=None):
    return _upsample_antialias(ctx, x, align_corners, (scales_h, scales_w))


@lowering(aten._upsample_bilinear2d_aa.vec)
def upsample_bilinear2d_aa_vec(ctx, x, output_size, align_corners, scale_factors):
    return _upsample_antialias(ctx, x, align_corners, scale_factors)


@lowering(aten.upsample_nearest1d.default, aten.upsample_nearest2d.default, aten.upsample_nearest3d.default)
def upsample_nearest(ctx, x, output_size, *scales):
    return _upsample_nearest(ctx, x, len(output_size), scales, exact=False)


@lowering(aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec)
def upsample_nearest_vec(ctx, x, output_size, scale_factors):
    return _upsample_nearest(ctx, x, x.ndim - 2, scale_factors, exact=False)


@lowering(
    aten._upsample_nearest_exact1d.default,
    aten._upsample_nearest_exact2d.default,
    aten._upsample_nearest_exact3d.default,
)
def upsample_nearest_exact(ctx, x, output_size, *scales):
    return _upsample_nearest(ctx, x, len(output_size), scales, exact=True)


@lowering(
    aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec
)
def upsample_nearest_exact_vec(ctx, x, output_size, scale_factors):
    return _upsample_nearest(ctx, x, x.ndim - 2, scale_factors, exact=True)


@lowering(aten.upsample_linear1d.default, aten.upsample_bilinear2d.default, aten.upsample_trilinear3d.default)
def upsample_linear(ctx, x, output_size, align_corners, *scales):
    return _upsample_linear(ctx, x, len(output_size), align_corners, scales)


@lowering(aten.upsample_linear1d.vec, aten.upsample_bilinear2d.vec, aten.upsample_trilinear3d.vec)
def upsample_linear_vec(ctx, x, output_size, align_corners, scale_factors):
    return _upsample_linear(ctx, x, x.ndim - 2, align_corners, scale_factors)


@lowering(aten.upsample_bicubic2d.default)
def upsample_bicubic(ctx, x, output_size, align_corners, *scales):
    return _upsample_linear(ctx, x, 2, align_corners, scales, cubic=True)


@lowering(aten.upsample_bicubic2d.vec)
def upsample_bicubic_vec(ctx, x, output_size, align_corners, scale_factors):
    return _upsample_linear(ctx, x, 2, align_corners, scale_factors, cubic=True)


def _grid_unnormalize(coord, size, align_corners):
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _grid_reflect(coord, twice_low, twice_high):
    if twice_low == twice_high:
        return jnp.zeros_like(coord)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    coord = jnp.abs(coord - low)
    extra = jnp.fmod(coord, span)
    flips = jnp.floor(coord / span)
    return jnp.where(jnp.fmod(flips, 2) == 0, extra + low, span - extra + low)


def _grid_pad(coord, size, padding_mode, align_corners):
    """grid_sample's padding: 0 zeros (left as is), 1 border, 2 reflection."""
    if padding_mode == 1:
        return jnp.clip(coord, 0, size - 1)
    if padding_mode == 2:
        if align_corners:
            coord = _grid_reflect(coord, 0, 2 * (size - 1))
        else:
            coord = _grid_reflect(coord, -1, 2 * size - 1)
        return jnp.clip(coord, 0, size - 1)
    return coord


def _grid_gather(x, iy, ix):
    """x[n, :, iy, ix] for integer maps (N, Ho, Wo); 0 where out of bounds."""
    h, w = x.shape[2], x.shape[3]
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iy = jnp.clip(iy, 0, h - 1).astype(jnp.int32)
    ix = jnp.clip(ix, 0, w - 1).astype(jnp.int32)
    values = jax.vmap(lambda img, yy, xx: img[:, yy, xx])(x, iy, ix)
    return jnp.where(inside[:, None], values, 0)


@lowering(aten.grid_sampler_2d.default, aten.grid_sampler.default)
def grid_sampler_2d(ctx, x, grid, interpolation_mode, padding_mode, align_corners):
    """grid_sample on (N, C, H, W): modes 0 bilinear, 1 nearest, 2 bicubic."""
    h, w = x.shape[2], x.shape[3]
    gx, gy = grid[..., 0], grid[..., 1]
    if interpolation_mode == 2:
        ix = _grid_unnormalize(gx, w, align_corners)
        iy = _grid_unnormalize(gy, h, align_corners)
        x0, y0 = jnp.floor(ix), jnp.floor(iy)
        wx, wy = _cubic_weights(ix - x0), _cubic_weights(iy - y0)
        out = 0
        for i in range(4):
            for j in range(4):
                yy = _grid_pad(y0 - 1 + i, h, padding_mode, align_corners)
                xx = _grid_pad(x0 - 1 + j, w, padding_mode, align_corners)
                # torch truncates the padded coordinate to an int.
                value = _grid_gather(x, jnp.trunc(yy), jnp.trunc(xx))
                out = out + value * (wy[i] * wx[j])[:, None]
        return out.astype(ctx.dtype)
    ix = _grid_pad(_grid_unnormalize(gx, w, align_corners), w, padding_mode, align_corners)
    iy = _grid_pad(_grid_unnormalize(gy, h, align_corners), h, padding_mode, align_corners)
    if interpolation_mode == 1:
        return _grid_gather(x, jnp.round(iy), jnp.round(ix)).astype(ctx.dtype)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    out = (
        _grid_gather(x, y0, x0) * ((x1 - ix) * (y1 - iy))[:, None]
        + _grid_gather(x, y0, x1) * ((ix - x0) * (y1 - iy))[:, None]
        + _grid_gather(x, y1, x0) * ((x1 - ix) * (iy - y0))[:, None]
        + _grid_gather(x, y1, x1) * ((ix - x0) * (iy - y0))[:, None]
    )
    return out.astype(ctx.dtype)


def _grid_gather_3d(x, iz, iy, ix):
    """x[n, :, iz, iy, ix] for integer maps (N, Do, Ho, Wo); 0 where out of bounds."""
    d, h, w = x.shape[2], x.shape[3], x.shape[4]
    inside = (iz >= 0) & (iz < d) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iz = jnp.clip(iz, 0, d - 1).astype(jnp.int32)
    iy = jnp.clip(iy, 0, h - 1).astype(jnp.int32)
    ix = jnp.clip(ix, 0, w - 1).astype(jnp.int32)
    values = jax.vmap(lambda vol, zz, yy, xx: vol[:, zz, yy, xx])(x, iz, iy, ix)
    return jnp.where(inside[:, None], values, 0)


@lowering(aten.grid_sampler_3d.default)
def grid_sampler_3d(ctx, x, grid, interpolation_mode, padding_mode, align_corners):
    """grid_sample on (N, C, D, H, W): modes 0 (tri)linear, 1 nearest (torch has no 3-D bicubic)."""
    if interpolation_mode not in (0, 1):
        raise NotImplementedError("grid_sampler_3d supports bilinear (0) and nearest (1) interpolation only")
    d, h, w = x.shape[2], x.shape[3], x.shape[4]
    ix = _grid_pad(_grid_unnormalize(grid[..., 0], w, align_corners), w, padding_mode, align_corners)
    iy = _grid_pad(_grid_unnormalize(grid[..., 1], h, align_corners), h, padding_mode, align_corners)
    iz = _grid_pad(_grid_unnormalize(grid[..., 2], d, align_corners), d, padding_mode, align_corners)
    if interpolation_mode == 1:
        return _grid_gather_3d(x, jnp.round(iz), jnp.round(iy), jnp.round(ix)).astype(ctx.dtype)
    x0, y0, z0 = jnp.floor(ix), jnp.floor(iy), jnp.floor(iz)
    x1, y1, z1 = x0 + 1, y0 + 1, z0 + 1
    wx = ((x0, x1 - ix), (x1, ix - x0))
    wy = ((y0, y1 - iy), (y1, iy - y0))
    wz = ((z0, z1 - iz), (z1, iz - z0))
    out = 0
    for zc, zw in wz:
        for yc, yw in wy:
            for xc, xw in wx:
                out = out + _grid_gather_3d(x, zc, yc, xc) * (xw * yw * zw)[:, None]
    return out.astype(ctx.dtype)


# --------------------------------------------------------------------------- distances


def _safe_norm(diff, p):
    """p-norm over the last axis with torch's zero gradient where the norm is 0."""
    a = jnp.abs(diff)
    if p == 0:
        return jnp.sum((a != 0).astype(diff.dtype), axis=-1)
    if p == 1:
        return jnp.sum(a, axis=-1)
    if p == math.inf:
        return jnp.max(a, axis=-1)
    powered = jnp.sum(jnp.where(a > 0, a, 1) ** p * (a > 0), axis=-1)
    positive = powered > 0
    return jnp.where(positive, jnp.where(positive, powered, 1) ** (1.0 / p), 0)


def _cdist(x1, x2, p, compute_mode):
    p1, p2 = x1.shape[-2], x2.shape[-2]
    mode = 0 if compute_mode is None else compute_mode
    if p == 2 and (mode == 1 or (mode == 0 and (p1 > 25 or p2 > 25))):
        # torch's matmul form (_euclidean_dist): one product of augmented rows
        # [-2a, |a|^2, 1] . [b, 1, |b|^2], so the cancellation happens inside
        # the same sum as torch's; clamped at 0.
        n1 = jnp.sum(jnp.square(x1), -1, keepdims=True)
        n2 = jnp.sum(jnp.square(x2), -1, keepdims=True)
        a = jnp.concatenate([-2 * x1, n1, jnp.ones_like(n1)], axis=-1)
        b = jnp.concatenate([x2, jnp.ones_like(n2), n2], axis=-1)
        sq = jnp.maximum(jnp.matmul(a, jnp.swapaxes(b, -1, -2)), 0)
        positive = sq > 0
        return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)
    return _safe_norm(x1[..., :, None, :] - x2[..., None, :, :], p)


@lowering(aten._cdist_forward.default)
def cdist_forward(ctx, x1, x2, p, compute_mode):
    return jnp.broadcast_to(_cdist(x1, x2, p, compute_mode), ctx.shape).astype(ctx.dtype)


@lowering(aten.cdist.default)
def cdist(ctx, x1, x2, p=2.0, compute_mode=None):
    return jnp.broadcast_to(_cdist(x1, x2, p, compute_mode), ctx.shape).astype(ctx.dtype)


@lowering(aten._pdist_forward.default)
def pdist_forward(ctx, x, p=2.0):
    i, j = np.triu_indices(x.shape[0], k=1)
    return _safe_norm(x[i] - x[j], p).astype(ctx.dtype)


@lowering(aten.cosine_similarity.default)
def cosine_similarity(ctx, x1, x2, dim=1, eps=1e-8):
    x1, x2 = jnp.broadcast_arrays(x1.astype(ctx.dtype), x2.astype(ctx.dtype))
    dim = dim % x1.ndim if x1.ndim else 0
    if x1.ndim == 0:
        x1, x2 = x1.reshape(1), x2.reshape(1)
    n1 = jnp.maximum(jnp.linalg.norm(x1, axis=dim, keepdims=True), eps)
    n2 = jnp.maximum(jnp.linalg.norm(x2, axis=dim, keepdims=True), eps)
    return jnp.sum((x1 / n1) * (x2 / n2), axis=dim).reshape(ctx.shape).astype(ctx.dtype)


def _embedding_bag(ctx, weight, indices, offsets, mode, per_sample_weights, include_last_offset, padding_idx):
    """Bags of embedding rows reduced by sum (mode 0), mean (1) or max (2).

    Returns torch's four outputs: the bags, each index's bag, each bag's size
    and, for max, the index of the row that gave each maximum.
    """
    num_bags = ctx.shape_of(0)[0]
    n = indices.shape[0]
    bag = jnp.searchsorted(offsets, jnp.arange(n), side="right") - 1
    bag = jnp.clip(bag, 0, max(num_bags - 1, 0)).astype(jnp.int32)
    keep = jnp.ones((n,), jnp.bool_)
    if padding_idx is not None and padding_idx >= 0:
        keep = indices != padding_idx
    if include_last_offset:
        keep = keep & (jnp.arange(n) < offsets[-1])
    rows = jnp.take(weight, indices, axis=0)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None]
    count = jax.ops.segment_sum(keep.astype(jnp.int32), bag, num_segments=num_bags)
    max_indices = jnp.zeros(ctx.shape_of(3), ctx.dtype_of(3))
    if mode == 2:
        rows = jnp.where(keep[:, None], rows, -jnp.inf)
        out = jax.ops.segment_max(rows, bag, num_segments=num_bags)
        out = jnp.where(count[:, None] > 0, out, 0)
        hit = (rows == out[bag]) & keep[:, None]
        first = jax.ops.segment_min(
            jnp.where(hit, jnp.arange(n)[:, None], n), bag, num_segments=num_bags
        )
        chosen = jnp.take(indices, jnp.clip(first, 0, max(n - 1, 0)))
        max_indices = jnp.where(count[:, None] > 0, chosen, -1).reshape(ctx.shape_of(3)).astype(ctx.dtype_of(3))
    else:
        out = jax.ops.segment_sum(jnp.where(keep[:, None], rows, 0), bag, num_segments=num_bags)
        if mode == 1:
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
    offset2bag = jnp.zeros(ctx.shape_of(1), ctx.dtype_of(1))
    if ctx.shape_of(1) == (n,):
        offset2bag = bag.astype(ctx.dtype_of(1))
    bag_size = jnp.reshape(count, ctx.shape_of(2)) if ctx.shape_of(2) == (num_bags,) else jnp.zeros(ctx.shape_of(2))
    return out.astype(ctx.dtype_of(0)), offset2bag, bag_size.astype(ctx.dtype_of(2)), max_indices


@lowering(aten.embedding_bag.default)
def embedding_bag(
    ctx, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
    per_sample_weights=None, include_last_offset=False,
):
    return _embedding_bag(ctx, weight, indices, offsets, mode, per_sample_weights, include_last_offset, None)


@lowering(aten.embedding_bag.padding_idx, aten._embedding_bag.default)
def embedding_bag_padding_idx(
    ctx, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
    per_sample_weights=None, include_last_offset=False, padding_idx=-1,
):
    return _embedding_bag(ctx, weight, indices, offsets, mode, per_sample_weights, include_last_offset, padding_idx)


def _take_segments(values, segment, num):
    """values[segment] along axis 0, 0 where segment is out of range."""
    valid = segment < num
    picked = jnp.take(values, jnp.where(valid, segment, 0), axis=0)
    return jnp.where(valid.reshape(valid.shape + (1,) * (values.ndim - 1)), picked, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _segment_extreme(x, segment, num, is_max, initial):
    """Per-segment max (min) of the rows of x; NaN propagates; empty -> initial or -inf (inf)."""
    reduce = jax.ops.segment_max if is_max else jax.ops.segment_min
    out = reduce(x, segment, num_segments=num)
    has_nan = jax.ops.segment_max((x != x).astype(jnp.int32), segment, num_segments=num) > 0
    out = jnp.where(has_nan, jnp.nan, out)
    if initial is not None:
        out = jnp.maximum(out, initial) if is_max else jnp.minimum(out, initial)
    return out


def _segment_extreme_fwd(x, segment, num, is_max, initial):
    out = _segment_extreme(x, segment, num, is_max, initial)
    return out, (x, segment, out)


def _segment_extreme_bwd(num, is_max, initial, res, g):
    # torch's rule: the gradient goes to every element equal to its segment's
    # result (or NaN); with several such elements, the positive gradients are
    # split evenly among them (torch leaves negative ones whole).
    x, segment, out = res
    hit = ((x == _take_segments(out, segment, num)) | (x != x)) & (segment < num)[:, None]
    count = jax.ops.segment_sum(hit.astype(x.dtype), segment, num_segments=num)
    grad = jnp.where(hit, _take_segments(g, segment, num), 0)
    ties = _take_segments(count, segment, num)
    grad = jnp.where((ties >= 2) & (grad > 0), grad / jnp.where(ties >= 2, ties, 1), grad)
    return grad, None


_segment_extreme.defvjp(_segment_extreme_fwd, _segment_extreme_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _segment_prod(x, segment, num, initial):
    out = jax.ops.segment_prod(x, segment, num_segments=num)
    return out if initial is None else out * initial


def _segment_prod_fwd(x, segment, num, initial):
    out = _segment_prod(x, segment, num, initial)
    return out, (x, segment, out)


def _segment_prod_bwd(num, initial, res, g):
    # torch's rule: grad * out / x, except at zeros and NaNs, where the
    # product of the other elements (and `initial`) is formed explicitly.
    x, segment, out = res
    inside = (segment < num)[:, None]
    is_zero, is_nan = x == 0, x != x
    special = is_zero | is_nan
    others = jax.ops.segment_prod(jnp.where(special, 1, x), segment, num_segments=num)
    if initial is not None:
        others = others * initial
    zeros = jax.ops.segment_sum(is_zero.astype(jnp.int32), segment, num_segments=num)
    nans = jax.ops.segment_sum(is_nan.astype(jnp.int32), segment, num_segments=num)
    other_zeros = _take_segments(zeros, segment, num) - is_zero
    other_nans = _take_segments(nans, segment, num) - is_nan
    exclusive = jnp.where(
        other_nans > 0, jnp.nan, jnp.where(other_zeros > 0, 0, _take_segments(others, segment, num))
    )
    g_rows = _take_segments(g, segment, num)
    plain = g_rows * _take_segments(out, segment, num) / jnp.where(special, 1, x)
    grad = jnp.where(special, g_rows * exclusive, plain)
    return jnp.where(inside, grad, 0), None


_segment_prod.defvjp(_segment_prod_fwd, _segment_prod_bwd)


@lowering(aten.segment_reduce.default)
def segment_reduce(
    ctx, data, reduce, *, lengths=None, indices=None, offsets=None, axis=0, unsafe=False, initial=None
):
    """Reduce consecutive segments along `axis` ('sum', 'mean', 'max', 'min', 'prod').

    `lengths` (..., S) or `offsets` (..., S + 1) give the segments, batched
    over the dims before `axis`. Elements past the last segment are ignored;
    an empty segment gives `initial`, or 0 / NaN / -inf / inf / 1.
    """
    axis = axis % data.ndim
    out_shape = ctx.shape
    num = out_shape[axis]
    batch = math.prod(data.shape[:axis])
    length = data.shape[axis]
    x = data.reshape(batch * length, -1)
    if offsets is None:
        lens = jnp.reshape(lengths, (batch, num)).astype(jnp.int32)
        offs = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(lens, axis=1)], axis=1)
    else:
        offs = jnp.reshape(offsets, (batch, num + 1)).astype(jnp.int32)
    pos = jnp.arange(length, dtype=jnp.int32)
    seg = jax.vmap(lambda o: jnp.searchsorted(o[1:], pos, side="right"))(offs).astype(jnp.int32)
    inside = (pos[None, :] >= offs[:, :1]) & (seg < num)
    total = batch * num
    segment = jnp.where(inside, seg + (jnp.arange(batch, dtype=jnp.int32) * num)[:, None], total).reshape(-1)
    if reduce in ("sum", "mean"):
        out = jax.ops.segment_sum(x, segment, num_segments=total)
        if initial is not None:
            out = out + initial
        if reduce == "mean":
            count = jax.ops.segment_sum(inside.reshape(-1).astype(jnp.int32), segment, num_segments=total)
            empty = (count == 0)[:, None]
            mean = out / jnp.where(empty, 1, count[:, None]).astype(out.dtype)
            out = jnp.where(empty, jnp.nan if initial is None else initial, mean)
    elif reduce in ("max", "min"):
        out = _segment_extreme(x, segment, total, reduce == "max", initial)
    elif reduce == "prod":
        out = _segment_prod(x, segment, total, initial)
    else:
        raise ValueError(f"segment_reduce: unknown reduction {reduce!r}")
    return out.reshape(out_shape).astype(ctx.dtype)


# --------------------------------------------------------------------------- activations


@lowering(aten.glu.default)
def glu(ctx, x, dim=-1):
    a, b = jnp.split(x, 2, axis=dim)
    return (a * jax.nn.sigmoid(b)).astype(ctx.dtype)


@lowering(aten.prelu.default)
def prelu(ctx, x, weight):
    if weight.size > 1 and x.ndim >= 2:
        weight = weight.reshape((-1,) + (1,) * (x.ndim - 2))
    elif weight.size == 1:
        weight = weight.reshape(())
    return jnp.where(x > 0, x, weight * x).astype(ctx.dtype)


@lowering(aten._prelu_kernel.default)
def prelu_kernel(ctx, x, weight):
    return jnp.where(x > 0, x, weight * x).astype(ctx.dtype)


@lowering(aten.hardshrink.default)
def hardshrink(ctx, x, lambd=0.5):
    return jnp.where(jnp.abs(x) > lambd, x, 0).astype(ctx.dtype)


@lowering(aten.softshrink.default)
def softshrink(ctx, x, lambd=0.5):
    return jnp.where(x > lambd, x - lambd, jnp.where(x < -lambd, x + lambd, 0)).astype(ctx.dtype)


# --------------------------------------------------------------------------- recurrent layers


def _lstm_cell(weights, has_biases):
    w_ih, w_hh, b_ih, b_hh, w_hr = _unpack_cell(weights, has_biases, projected=len(weights) in (3, 5))

    def project(x):
        return _linear_nobias(x, w_ih, b_ih)

    def step(carry, gates_x):
        h, c = carry
        gates = gates_x + _linear_nobias(h, w_hh, b_hh)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.T
        return (h, c), h

    return project, step


def _gru_cell(weights, has_biases):
    w_ih, w_hh, b_ih, b_hh, _ = _unpack_cell(weights, has_biases, projected=False)

    def project(x):
        return _linear_nobias(x, w_ih, b_ih)

    def step(h, gates_x):
        gates_h = _linear_nobias(h, w_hh, b_hh)
        xr, xz, xn = jnp.split(gates_x, 3, axis=-1)
        hr, hz, hn = jnp.split(gates_h, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        return h, h

    return project, step


def _rnn_cell(nonlinearity):
    def cell(weights, has_biases):
        w_ih, w_hh, b_ih, b_hh, _ = _unpack_cell(weights, has_biases, projected=False)

        def project(x):
            return _linear_nobias(x, w_ih, b_ih)

        def step(h, gates_x):
            h = nonlinearity(gates_x + _linear_nobias(h, w_hh, b_hh))
            return h, h

        return project, step

    return cell


def _unpack_cell(weights, has_biases, projected):
    weights = list(weights)
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_biases else (None, None)
    w_hr = weights[-1] if projected else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def _linear_nobias(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _run_rnn(ctx, make_cell, x, hidden, params, has_biases, num_layers, dropout_p, train, bidirectional, batch_first):
    """A stacked (bi)directional RNN as torch runs it, one lax.scan per layer and direction.

    `hidden` is a list of initial states, each shaped (layers * directions, batch, size).
    Returns the output sequence and the final states, stacked like `hidden`.
    """
    directions = 2 if bidirectional else 1
    per_cell = len(params) // (num_layers * directions)
    if batch_first:
        x = jnp.swapaxes(x, 0, 1)
    finals = [[] for _ in hidden]
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            cell = layer * directions + direction
            weights = params[cell * per_cell : (cell + 1) * per_cell]
            project, step = make_cell(weights, has_biases)
            init = tuple(h[cell] for h in hidden)
            carry, ys = lax.scan(step, init if len(init) > 1 else init[0], project(x), reverse=direction == 1)
            for k, c in enumerate(carry if len(init) > 1 else (carry,)):
                finals[k].append(c)
            outputs.append(ys)
        x = outputs[0] if directions == 1 else jnp.concatenate(outputs, axis=-1)
        if train and dropout_p > 0 and layer < num_layers - 1:
            keep = jax.random.bernoulli(jax.random.fold_in(ctx.key(), layer), 1.0 - dropout_p, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout_p), 0)
    if batch_first:
        x = jnp.swapaxes(x, 0, 1)
    return (x.astype(ctx.dtype_of(0)),) + tuple(
        jnp.stack(f).astype(ctx.dtype_of(k + 1)) for k, f in enumerate(finals)
    )


@lowering(aten.lstm.input)
def lstm(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _run_rnn(ctx, _lstm_cell, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


@lowering(aten.gru.input)
def gru(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _run_rnn(ctx, _gru_cell, x, [hx], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


@lowering(aten.rnn_tanh.input)
def rnn_tanh(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    cell = _rnn_cell(jnp.tanh)
    return _run_rnn(ctx, cell, x, [hx], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)


@lowering(aten.rnn_relu.input)
def rnn_relu(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    cell = _rnn_cell(jax.nn.relu)
    return _run_rnn(ctx, cell, x, [hx], params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
