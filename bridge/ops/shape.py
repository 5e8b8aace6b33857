"""Shape and view ATen ops: view, reshape, permute, transpose, expand, cat, ...

JAX arrays have no strides, so every view op is a copy-free reshape, slice or
transpose in XLA's eyes; the `*_copy` variants lower to the same functions.
`as_strided` and friends reconstruct the input's storage order from the
strides torch recorded for the input node.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax
from jax.export import is_symbolic_dim

from bridge.ops.operands import index_along, wrap_dim
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _slice_bounds(n: int, start: int | None, end: int | None, step: int) -> tuple[int, int, int]:
    """torch's clamped slice bounds (step > 0) as (start, end, step) within 0..n.

    `n` may be a symbolic dimension (an export with dynamic shapes): the clamps are then
    dimension expressions (`jax.core.min_dim`), and an `end` of torch's "to the end"
    (INT64_MAX) is `n` itself.
    """
    start = 0 if start is None else start
    end = n if end is None or (isinstance(end, int) and end >= _TO_THE_END) else end
    lo, hi = (jax.core.min_dim, jax.core.max_dim) if is_symbolic_dim(n) else (min, max)
    start = lo(hi(start + n if start < 0 else start, 0), n)
    end = lo(hi(end + n if end < 0 else end, start), n)
    return start, end, step


_TO_THE_END = 2**62  # torch writes x[a:] as slice(x, dim, a, INT64_MAX)


@lowering(
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.view_copy.default,
    aten._reshape_copy.default,
)
def view(ctx, x, size):
    return jnp.reshape(x, ctx.shape)


@lowering(
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze_copy.default,
    aten.squeeze_copy.dim,
    aten.squeeze_copy.dims,
    aten.unsqueeze.default,
    aten.unsqueeze_copy.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
)
def reshape_to_output(ctx, x, *dims):
    """Ops that only add or drop size-1 dims, or merge/split adjacent dims."""
    return jnp.reshape(x, ctx.shape)


@lowering(aten.view.dtype, aten.view_copy.dtype)
def view_dtype(ctx, x, dtype):
    src, dst = np.dtype(x.dtype), np.dtype(ctx.dtype)
    if src.itemsize == dst.itemsize:
        return lax.bitcast_convert_type(x, dst)
    if src.itemsize > dst.itemsize:
        y = lax.bitcast_convert_type(x, dst)  # adds a trailing dim
        return jnp.reshape(y, ctx.shape)
    ratio = dst.itemsize // src.itemsize
    y = jnp.reshape(x, (*x.shape[:-1], x.shape[-1] // ratio, ratio))
    return lax.bitcast_convert_type(y, dst)


@lowering(aten.t.default, aten.t_copy.default)
def t(ctx, x):
    return jnp.transpose(x) if x.ndim == 2 else x


@lowering(aten.permute.default, aten.permute_copy.default)
def permute(ctx, x, dims):
    return jnp.transpose(x, [d % x.ndim for d in dims]) if x.ndim else x


@lowering(aten.transpose.int, aten.transpose_copy.int, aten.swapaxes.default)
def transpose(ctx, x, dim0, dim1):
    if x.ndim == 0:
        return x
    return jnp.swapaxes(x, wrap_dim(dim0, x.ndim), wrap_dim(dim1, x.ndim))


@lowering(aten.movedim.int, aten.movedim.intlist)
def movedim(ctx, x, source, destination):
    if x.ndim == 0:
        return x
    return jnp.moveaxis(x, source, destination)


@lowering(aten.expand.default, aten.expand_copy.default)
def expand(ctx, x, size, *, implicit=False):
    return jnp.broadcast_to(x, ctx.shape)


@lowering(aten.cat.default)
def cat(ctx, tensors, dim=0):
    # torch skips legacy empty 1-D tensors of any dtype when concatenating.
    kept = [x for x in tensors if not (x.ndim == 1 and x.shape[0] == 0)]
    if not kept:
        return jnp.zeros(ctx.shape, ctx.dtype)
    return jnp.concatenate([x.astype(ctx.dtype) for x in kept], axis=wrap_dim(dim, kept[0].ndim))


@lowering(aten.stack.default)
def stack(ctx, tensors, dim=0):
    return jnp.stack([x.astype(ctx.dtype) for x in tensors], axis=wrap_dim(dim, tensors[0].ndim + 1))


def _split_by_output(ctx, x, dim):
    """Split `x` along `dim` into the pieces torch recorded for this node."""
    dim = wrap_dim(dim, x.ndim)
    pieces, start = [], 0
    for out in ctx.out:
        size = int(out.shape[dim])
        pieces.append(lax.slice_in_dim(x, start, start + size, axis=dim))
        start += size
    return pieces


@lowering(
    aten.split.Tensor,
    aten.split.sizes,
    aten.split_with_sizes.default,
    aten.split_copy.Tensor,
    aten.split_with_sizes_copy.default,
    aten.unsafe_split.Tensor,
    aten.unsafe_split_with_sizes.default,
)
def split(ctx, x, split_size, dim=0):
    return _split_by_output(ctx, x, dim)


@lowering(aten.chunk.default)
def chunk(ctx, x, chunks, dim=0):
    return _split_by_output(ctx, x, dim)


@lowering(aten.unbind.int, aten.unbind_copy.int)
def unbind(ctx, x, dim=0):
    dim = wrap_dim(dim, x.ndim)
    return [lax.index_in_dim(x, i, axis=dim, keepdims=False) for i in range(x.shape[dim])]


@lowering(aten.slice.Tensor, aten.slice_copy.Tensor)
def slice_(ctx, x, dim=0, start=None, end=None, step=1):
    dim = wrap_dim(dim, x.ndim)
    start, end, step = _slice_bounds(x.shape[dim], start, end, step)
    return lax.slice_in_dim(x, start, end, step, axis=dim)


@lowering(aten.select.int, aten.select_copy.int)
def select(ctx, x, dim, index):
    dim = wrap_dim(dim, x.ndim)
    return lax.index_in_dim(x, index % x.shape[dim], axis=dim, keepdims=False)


@lowering(aten.narrow.default, aten.narrow_copy.default)
def narrow(ctx, x, dim, start, length):
    dim = wrap_dim(dim, x.ndim)
    start = start + x.shape[dim] if start < 0 else start
    return lax.slice_in_dim(x, start, start + length, axis=dim)


@lowering(aten.narrow.Tensor)
def narrow_tensor(ctx, x, dim, start, length):
    dim = wrap_dim(dim, x.ndim)
    start = jnp.reshape(start, ()).astype(jnp.int32)
    start = jnp.where(start < 0, start + x.shape[dim], start)
    return lax.dynamic_slice_in_dim(x, start, length, axis=dim)


@lowering(aten.flip.default)
def flip(ctx, x, dims):
    if x.ndim == 0 or not dims:
        return x
    return jnp.flip(x, [wrap_dim(d, x.ndim) for d in dims])


@lowering(aten.roll.default)
def roll(ctx, x, shifts, dims=()):
    if x.ndim == 0:
        return x
    if not dims:
        return jnp.reshape(jnp.roll(jnp.ravel(x), shifts[0]), x.shape)
    return jnp.roll(x, tuple(shifts), tuple(wrap_dim(d, x.ndim) for d in dims))


@lowering(aten.repeat.default)
def repeat(ctx, x, repeats):
    return jnp.reshape(jnp.tile(x, tuple(repeats)), ctx.shape)


@lowering(aten.tile.default)
def tile(ctx, x, dims):
    return jnp.reshape(jnp.tile(x, tuple(dims)), ctx.shape)


@lowering(aten.repeat_interleave.self_int)
def repeat_interleave_int(ctx, x, repeats, dim=None, *, output_size=None):
    if dim is None:
        return jnp.repeat(jnp.ravel(x), repeats)
    return jnp.repeat(x, repeats, axis=wrap_dim(dim, x.ndim)).reshape(ctx.shape)


@lowering(aten.repeat_interleave.self_Tensor)
def repeat_interleave_tensor(ctx, x, repeats, dim=None, *, output_size=None):
    if dim is None:
        x, dim = jnp.ravel(x), 0
    dim = wrap_dim(dim, x.ndim)
    repeats = jnp.ravel(repeats)
    if repeats.shape[0] == 1:
        repeats = jnp.broadcast_to(repeats, (x.shape[dim],))
    y = jnp.repeat(x, repeats, axis=dim, total_repeat_length=ctx.shape[dim] if ctx.shape else 1)
    return jnp.reshape(y, ctx.shape)


@lowering(aten.repeat_interleave.Tensor)
def repeat_interleave_counts(ctx, repeats, *, output_size=None):
    index = jnp.arange(repeats.shape[0], dtype=ctx.dtype)
    return jnp.repeat(index, repeats, total_repeat_length=ctx.shape[0])


def _pad_config(x, pad):
    """torch's flat pad list (last dim first, (low, high) pairs) as per-dim pairs."""
    pairs = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        pairs[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return pairs


@lowering(aten.constant_pad_nd.default)
def constant_pad_nd(ctx, x, pad, value=0):
    config = [(lo, hi, 0) for lo, hi in _pad_config(x, pad)]
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _pad_mode(x, pad, mode):
    """Reflect/edge/wrap padding; negative amounts crop, as in torch."""
    pairs = _pad_config(x, pad)
    for d, (lo, hi) in enumerate(pairs):
        if mode == "edge" and x.shape[d] + min(lo, 0) + min(hi, 0) <= 0 < x.shape[d] + lo + hi:
            # Cropping empties the axis, yet the output has elements: each one
            # repeats the nearest input edge, as torch's clamped index does.
            index = np.clip(np.arange(x.shape[d] + lo + hi) - lo, 0, x.shape[d] - 1)
            x = jnp.take(x, index, axis=d)
            pairs[d] = (0, 0)
    crop = tuple(slice(max(-lo, 0), x.shape[d] - max(-hi, 0)) for d, (lo, hi) in enumerate(pairs))
    x = x[crop]
    return jnp.pad(x, [(max(lo, 0), max(hi, 0)) for lo, hi in pairs], mode=mode)


@lowering(
    aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default
)
def reflection_pad(ctx, x, padding):
    return _pad_mode(x, padding, "reflect")


@lowering(
    aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default
)
def replication_pad(ctx, x, padding):
    return _pad_mode(x, padding, "edge")


@lowering(aten._pad_circular.default)
def pad_circular(ctx, x, pad):
    return _pad_mode(x, pad, "wrap")


@lowering(aten.pad.default)
def pad(ctx, x, pad, mode="constant", value=None):
    if mode == "constant":
        return constant_pad_nd(ctx, x, pad, 0 if value is None else value)
    modes = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    if mode not in modes:
        raise NotImplementedError(f"aten.pad: unknown padding mode {mode!r}")
    return _pad_mode(x, pad, modes[mode])


@lowering(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal(ctx, x, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(x, offset, wrap_dim(dim1, x.ndim), wrap_dim(dim2, x.ndim))


@lowering(aten.diag.default)
def diag(ctx, x, diagonal=0):
    return jnp.diag(x, diagonal)


def _diagonal_positions(n_rows: int, n_cols: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(min(n_rows + min(offset, 0), n_cols - max(offset, 0)), 0)
    rows = np.arange(length) + max(-offset, 0)
    return rows, rows + offset


@lowering(aten.diag_embed.default)
def diag_embed(ctx, x, offset=0, dim1=-2, dim2=-1):
    ndim = len(ctx.shape)
    dim1, dim2 = wrap_dim(dim1, ndim), wrap_dim(dim2, ndim)
    n = ctx.shape[dim1]
    rows, cols = _diagonal_positions(n, n, offset)
    out = jnp.zeros((*x.shape[:-1], n, n), ctx.dtype).at[..., rows, cols].set(x)
    return jnp.moveaxis(out, (-2, -1), (dim1, dim2))


@lowering(aten.diagonal_scatter.default)
def diagonal_scatter(ctx, x, src, offset=0, dim1=0, dim2=1):
    dim1, dim2 = wrap_dim(dim1, x.ndim), wrap_dim(dim2, x.ndim)
    moved = jnp.moveaxis(x, (dim1, dim2), (-2, -1))
    rows, cols = _diagonal_positions(moved.shape[-2], moved.shape[-1], offset)
    moved = moved.at[..., rows, cols].set(src.astype(x.dtype))
    return jnp.moveaxis(moved, (-2, -1), (dim1, dim2))


@lowering(aten.tril.default)
def tril(ctx, x, diagonal=0):
    return jnp.tril(x, diagonal)


@lowering(aten.triu.default)
def triu(ctx, x, diagonal=0):
    return jnp.triu(x, diagonal)


@lowering(
    aten.clone.default,
    aten.alias.default,
    aten.alias_copy.default,
    aten.lift_fresh.default,
    aten.lift_fresh_copy.default,
    aten.contiguous.default,
)
def clone(ctx, x, **memory_format):
    return x


@lowering(aten.detach.default, aten.detach_copy.default)
def detach(ctx, x):
    return lax.stop_gradient(x)


def _storage(ctx, x):
    """`x` laid out as torch stores it: (flat storage from its offset, offset, strides)."""
    meta = ctx.node.args[0].meta["val"]
    strides, offset = tuple(meta.stride()), int(meta.storage_offset())
    order = sorted(range(x.ndim), key=lambda d: -strides[d])
    expected = 1
    for d in reversed(order):
        if x.shape[d] != 1 and strides[d] != expected:
            raise NotImplementedError(
                f"{ctx.node.target}: the input has strides {strides} for shape {tuple(x.shape)}, "
                "which do not describe a dense block of memory; bridge cannot rebuild its storage. "
                "Call .contiguous() on it first."
            )
        expected *= x.shape[d]
    return jnp.ravel(jnp.transpose(x, order)), offset


def _strided_positions(size, stride, offset: int) -> np.ndarray:
    positions = np.full(tuple(size), offset, dtype=np.int64)
    for d, (n, s) in enumerate(zip(size, stride, strict=True)):
        shape = [1] * len(size)
        shape[d] = n
        positions = positions + (np.arange(n) * s).reshape(shape)
    return positions


def _checked_positions(ctx, flat, base: int, size, stride, storage_offset) -> np.ndarray:
    offset = base if storage_offset is None else storage_offset
    positions = _strided_positions(size, stride, offset) - base
    if positions.size and (positions.min() < 0 or positions.max() >= flat.shape[0]):
        raise NotImplementedError(
            f"{ctx.node.target}: the strided view reaches memory outside its input tensor, "
            "which bridge cannot see. Apply it to the base tensor instead."
        )
    return positions


@lowering(aten.as_strided.default, aten.as_strided_copy.default)
def as_strided(ctx, x, size, stride, storage_offset=None):
    flat, base = _storage(ctx, x)
    positions = _checked_positions(ctx, flat, base, size, stride, storage_offset)
    return flat[positions.astype(np.int32)] if positions.size else jnp.zeros(ctx.shape, x.dtype)


@lowering(aten.as_strided_scatter.default)
def as_strided_scatter(ctx, x, src, size, stride, storage_offset=None):
    flat, base = _storage(ctx, x)
    positions = _checked_positions(ctx, flat, base, size, stride, storage_offset)
    flat = flat.at[positions.astype(np.int32)].set(src.astype(x.dtype))
    meta = ctx.node.args[0].meta["val"]
    order = sorted(range(x.ndim), key=lambda d: -meta.stride()[d])
    stored = jnp.reshape(flat, [x.shape[d] for d in order])
    return jnp.transpose(stored, np.argsort(order))


@lowering(aten.unfold.default, aten.unfold_copy.default)
def unfold(ctx, x, dimension, size, step):
    if x.ndim == 0:
        return jnp.reshape(x, ctx.shape)
    dim = wrap_dim(dimension, x.ndim)
    count = (x.shape[dim] - size) // step + 1
    index = np.arange(count)[:, None] * step + np.arange(size)[None, :]
    windows = jnp.take(x, index, axis=dim)
    return jnp.moveaxis(windows, dim + 1, -1)


@lowering(aten.pixel_shuffle.default)
def pixel_shuffle(ctx, x, upscale_factor):
    r = upscale_factor
    *batch, c, h, w = x.shape
    y = jnp.reshape(x, (*batch, c // (r * r), r, r, h, w))
    n = len(batch)
    y = jnp.transpose(y, (*range(n), n, n + 3, n + 1, n + 4, n + 2))
    return jnp.reshape(y, ctx.shape)


@lowering(aten.pixel_unshuffle.default)
def pixel_unshuffle(ctx, x, downscale_factor):
    r = downscale_factor
    *batch, c, h, w = x.shape
    y = jnp.reshape(x, (*batch, c, h // r, r, w // r, r))
    n = len(batch)
    y = jnp.transpose(y, (*range(n), n, n + 2, n + 4, n + 1, n + 3))
    return jnp.reshape(y, ctx.shape)


def _patch_grid(spatial, kernel_size, dilation, padding, stride):
    """Output positions per spatial dim of a sliding window (im2col's L = prod)."""
    return [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, d, p, s in zip(spatial, kernel_size, dilation, padding, stride, strict=True)
    ]


@lowering(aten.im2col.default)
def im2col(ctx, x, kernel_size, dilation, padding, stride):
    batched = x.ndim == 4
    x = x if batched else x[None]
    n, c = x.shape[:2]
    oh, ow = _patch_grid(x.shape[2:], kernel_size, dilation, padding, stride)
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, stride
    xp = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    patches = [
        lax.slice(
            xp,
            (0, 0, i * dh, j * dw),
            (n, c, i * dh + sh * (oh - 1) + 1, j * dw + sw * (ow - 1) + 1),
            (1, 1, sh, sw),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    cols = jnp.reshape(jnp.stack(patches, axis=2), (n, c * kh * kw, oh * ow))
    return cols if batched else cols[0]


@lowering(aten.col2im.default)
def col2im(ctx, x, output_size, kernel_size, dilation, padding, stride):
    batched = x.ndim == 3
    x = x if batched else x[None]
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel_size, dilation, padding, stride
    n = x.shape[0]
    c = x.shape[1] // (kh * kw)
    oh, ow = _patch_grid(output_size, kernel_size, dilation, padding, stride)
    cols = jnp.reshape(x, (n, c, kh, kw, oh, ow))
    height, width = output_size[0] + 2 * ph, output_size[1] + 2 * pw
    out = jnp.zeros((n, c, height, width), ctx.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
            cols_ = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
            out = out.at[:, :, rows, cols_].add(cols[:, :, i, j])
    out = out[:, :, ph : ph + output_size[0], pw : pw + output_size[1]]
    return out if batched else out[0]


@lowering(aten.select_scatter.default)
def select_scatter(ctx, x, src, dim, index):
    dim = wrap_dim(dim, x.ndim)
    return x.at[index_along(dim, index % x.shape[dim])].set(src.astype(x.dtype))


@lowering(aten.slice_scatter.default)
def slice_scatter(ctx, x, src, dim=0, start=None, end=None, step=1):
    dim = wrap_dim(dim, x.ndim)
    start, end, step = _slice_bounds(x.shape[dim], start, end, step)
    if math.prod(src.shape) == 0:
        return x
    return x.at[index_along(dim, slice(start, end, step))].set(src.astype(x.dtype))
