"""Indexing ATen ops: advanced indexing, gather/scatter, index_*, masked_*, embedding.

Ops whose output shape depends on values (boolean-mask indexing, nonzero)
cannot be expressed with JAX's static shapes; they raise a clear error.
Scatters build one index array per dimension of the index tensor and use
JAX's `.at[]` updates, whose gradients JAX already defines.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from bridge.ops.operands import index_along, wrap_dim
from bridge.ops.registry import DataDependentShapeError, lowering

aten = torch.ops.aten


def _data_dependent(ctx, what: str) -> DataDependentShapeError:
    return DataDependentShapeError(
        f"{ctx.node.target}: {what} has an output shape that depends on tensor values, which "
        "JAX's static shapes cannot express. Use a fixed-size form (torch.where, masked_fill, "
        "multiplying by the mask) or run the module with mode='callback'."
    )


def _in_range(ctx, index, size: int, what: str, negative: bool) -> None:
    """torch raises on an index outside [0, size) (or [-size, size) where it wraps negatives).

    JAX would clamp a gather and drop a scatter update instead; `ctx.require`
    turns that into an IndexError (bridge/checks.py).
    """
    if index is None or jnp.size(index) == 0:
        return
    lo = -size if negative else 0
    ctx.require(
        (index >= lo) & (index < size), IndexError,
        f"index out of range: {what} takes indices in [{lo}, {size})",
    )


def _is_bool(index) -> bool:
    return index is not None and index.dtype in (jnp.bool_, jnp.uint8)


def _advanced_index(ctx, indices, shape=None) -> tuple:
    """aten's `Tensor?[] indices` (None meaning ':') as a JAX index tuple.

    With `shape` (the indexed tensor's), each index is checked to lie in
    [-size, size) of its dimension, as torch checks it.
    """
    if any(_is_bool(i) for i in indices):
        raise _data_dependent(ctx, "indexing with a boolean mask")
    if shape is not None:
        for d, i in enumerate(indices):
            if i is not None:
                _in_range(ctx, i, shape[d], f"dimension {d} of size {shape[d]}", negative=True)
    return tuple(slice(None) if i is None else i for i in indices)


@lowering(aten.index.Tensor, aten.index.Tensor_hacked_twin)
def index(ctx, x, indices):
    return x[_advanced_index(ctx, indices, x.shape)]


@lowering(aten._unsafe_index.Tensor)
def unsafe_index(ctx, x, indices):
    # "unsafe": torch's decompositions emit it with indices they computed in range.
    return x[_advanced_index(ctx, indices)]


def _mask_put(ctx, x, indices, values, accumulate):
    """`x[..., mask, ...] = values` for one boolean mask, with static shapes.

    The k-th True position of the mask takes row k of `values` (broadcast as
    numpy does), which is what torch computes whenever its shapes check out.
    """
    lead = next(p for p, i in enumerate(indices) if i is not None)
    mask = indices[lead].astype(bool)
    rest = x.shape[lead + mask.ndim :]
    rows_shape = (*x.shape[:lead], -1, *rest)
    values = jnp.reshape(values, (1,) * max(len(rows_shape) - values.ndim, 0) + values.shape)
    count = values.shape[lead]
    values = jnp.broadcast_to(values, (*x.shape[:lead], count, *rest)).astype(x.dtype)
    if count == 0 or mask.size == 0:
        return x
    row = jnp.clip(jnp.cumsum(jnp.ravel(mask).astype(jnp.int32)) - 1, 0, count - 1)
    taken = jnp.reshape(jnp.take(values, row, axis=lead), x.shape)
    mask = jnp.reshape(mask, (1,) * lead + mask.shape + (1,) * len(rest))
    return jnp.where(mask, x + taken if accumulate else taken, x)


_UNSAFE_INDEX_PUT = (aten._unsafe_index_put.default, aten._unsafe_index_put.hacked_twin)


@lowering(
    aten.index_put.default,
    aten.index_put.hacked_twin,
    aten._unsafe_index_put.default,
    aten._unsafe_index_put.hacked_twin,
    aten._index_put_impl.default,
)
def index_put(ctx, x, indices, values, accumulate=False, unsafe=False):
    if any(_is_bool(i) for i in indices):
        if sum(i is not None for i in indices) == 1:
            return _mask_put(ctx, x, indices, values, accumulate)
        raise _data_dependent(ctx, "index_put with a boolean mask")
    checked = not unsafe and ctx.node.target not in _UNSAFE_INDEX_PUT
    where = x.at[_advanced_index(ctx, indices, x.shape if checked else None)]
    values = values.astype(x.dtype)
    return where.add(values) if accumulate else where.set(values)


@lowering(aten._unsafe_masked_index.default)
def unsafe_masked_index(ctx, x, mask, indices, fill):
    return jnp.where(mask, x[_advanced_index(ctx, indices)], jnp.asarray(fill, x.dtype))


@lowering(aten._unsafe_masked_index_put_accumulate.default)
def unsafe_masked_index_put_accumulate(ctx, x, mask, indices, values):
    values = jnp.where(mask, values.astype(x.dtype), jnp.zeros((), x.dtype))
    return x.at[_advanced_index(ctx, indices)].add(values, mode="drop")


@lowering(aten.index_select.default)
def index_select(ctx, x, dim, index):
    size = x.shape[wrap_dim(dim, x.ndim)] if x.ndim else 1
    _in_range(ctx, index, size, f"dimension {dim} of size {size}", negative=False)
    if x.ndim == 0:
        return jnp.reshape(jnp.take(jnp.reshape(x, (1,)), jnp.ravel(index), axis=0), ctx.shape)
    return jnp.take(x, jnp.ravel(index), axis=wrap_dim(dim, x.ndim))


@lowering(aten.gather.default)
def gather(ctx, x, dim, index, *, sparse_grad=False):
    size = x.shape[wrap_dim(dim, x.ndim)] if x.ndim else 1
    _in_range(ctx, index, size, f"dimension {dim} of size {size}", negative=False)
    if x.ndim == 0:
        return jnp.reshape(jnp.take(jnp.reshape(x, (1,)), jnp.ravel(index)), ctx.shape)
    dim = wrap_dim(dim, x.ndim)
    if index.size == 0:
        return jnp.zeros(ctx.shape, ctx.dtype)
    # index may be smaller than x outside `dim`; x is read only where index reaches.
    x = x[tuple(slice(None) if d == dim else slice(0, n) for d, n in enumerate(index.shape))]
    return jnp.take_along_axis(x, index, axis=dim)


def _scatter_positions(index, dim: int) -> tuple:
    """Per-dimension positions for `out[..., index[i, j, k], ...] (op)= src[i, j, k]`."""
    return tuple(
        index if d == dim else lax.broadcasted_iota(jnp.int32, index.shape, d)
        for d in range(index.ndim)
    )


def _fit(src, shape):
    """`src` cut down to `shape` (scatter reads only the part of src that index covers)."""
    return src[tuple(slice(0, n) for n in shape)]


_IDENTITY = {"sum": 0, "prod": 1, "mean": 0, "amax": -np.inf, "amin": np.inf}


def _identity(reduce: str, dtype) -> jax.Array:
    value = _IDENTITY[reduce]
    if jnp.issubdtype(dtype, jnp.integer) and not np.isfinite(value):
        info = jnp.iinfo(dtype)
        value = info.min if value < 0 else info.max
    elif dtype == jnp.bool_:
        value = reduce == "amin" or reduce == "prod"
    return jnp.asarray(value, dtype)


def _scatter_reduce(x, positions, src, reduce: str, include_self: bool):
    """torch's scatter_reduce semantics on precomputed `positions`."""
    src = src.astype(x.dtype)
    base = x if include_self else x.at[positions].set(_identity(reduce, x.dtype))
    where = base.at[positions]
    if reduce in ("sum", "mean"):
        total = where.add(src)
        if reduce == "sum":
            return total
        counts = jnp.zeros(x.shape, jnp.int32).at[positions].add(1) + int(include_self)
        safe = jnp.maximum(counts, 1).astype(x.dtype)
        mean = total // safe if jnp.issubdtype(x.dtype, jnp.integer) else total / safe
        return jnp.where(counts > 0, mean, x)
    if reduce == "prod":
        return _scatter_prod(base, src, positions)
    if reduce == "amax":
        return where.max(src)
    if reduce == "amin":
        return where.min(src)
    raise NotImplementedError(f"scatter_reduce: unknown reduction {reduce!r}")


@jax.custom_jvp
def _scatter_prod(x, src, positions):
    """`x.at[positions].multiply(src)`, differentiable with repeated positions.

    JAX differentiates scatter-multiply only for unique indices; the rule
    below is torch's: each factor's derivative is the product of the others
    in its group, computed without dividing by zero.
    """
    return x.at[positions].multiply(src)


@_scatter_prod.defjvp
def _scatter_prod_jvp(primals, tangents):
    x, src, positions = primals
    dx, dsrc, _ = tangents
    out = _scatter_prod(x, src, positions)
    one = jnp.ones((), x.dtype)
    # d out / d x: the product of the group's src values.
    d_x = jnp.ones_like(x).at[positions].multiply(src)
    # d out / d src[i]: out / src[i], or, for the only zero of its group, the
    # product of the group with that zero left out.
    src_zero = src == 0
    zeros_in_group = jnp.zeros(x.shape, jnp.int32).at[positions].add(src_zero.astype(jnp.int32))
    single_zero = src_zero & (zeros_in_group[positions] == 1)
    without_zero = x.at[positions].multiply(jnp.where(single_zero, one, src))
    d_src = jnp.where(
        single_zero, without_zero[positions], out[positions] / jnp.where(src_zero, one, src)
    )
    tangent = d_x * dx + jnp.zeros_like(x).at[positions].add(d_src * dsrc)
    return out, tangent


_SCATTER_REDUCE = {"add": "sum", "multiply": "prod"}


def _as_1d(a):
    return jnp.reshape(a, (1,)) if a.ndim == 0 else a


def _promote_0d(fn):
    """Run a scatter on 0-d operands as on 1-element vectors, as torch allows."""

    def lowered(ctx, x, dim, index, src, *args, **kwargs):
        size = x.shape[wrap_dim(dim, x.ndim)] if x.ndim else 1
        _in_range(ctx, index, size, f"dimension {dim} of size {size}", negative=False)
        if x.ndim:
            return fn(ctx, x, wrap_dim(dim, x.ndim), index, src, *args, **kwargs)
        src = _as_1d(src) if isinstance(src, jax.Array) else src
        return jnp.reshape(fn(ctx, _as_1d(x), 0, _as_1d(index), src, *args, **kwargs), ctx.shape)

    lowered.__name__ = lowered.__qualname__ = fn.__name__
    return lowered


def _source(src, shape, dtype):
    """A scatter source: a tensor cut to `shape`, or a scalar broadcast to it."""
    if isinstance(src, jax.Array):
        return _fit(src, shape)
    return jnp.full(shape, src, dtype)


@lowering(aten.scatter.src, aten.scatter.value)
@_promote_0d
def scatter(ctx, x, dim, index, src):
    if index.size == 0:
        return x
    return x.at[_scatter_positions(index, dim)].set(
        _source(src, index.shape, x.dtype).astype(x.dtype)
    )


@lowering(aten.scatter.reduce, aten.scatter.value_reduce)
@_promote_0d
def scatter_with_reduce(ctx, x, dim, index, src, *, reduce):
    if index.size == 0:
        return x
    src = _source(src, index.shape, x.dtype)
    return _scatter_reduce(x, _scatter_positions(index, dim), src, _SCATTER_REDUCE[reduce], True)


@lowering(aten.scatter_add.default)
@_promote_0d
def scatter_add(ctx, x, dim, index, src):
    if index.size == 0:
        return x
    return x.at[_scatter_positions(index, dim)].add(_fit(src, index.shape).astype(x.dtype))


@lowering(aten.scatter_reduce.two)
@_promote_0d
def scatter_reduce(ctx, x, dim, index, src, reduce, *, include_self=True):
    if index.size == 0:
        return x
    return _scatter_reduce(
        x, _scatter_positions(index, dim), _fit(src, index.shape), reduce, include_self
    )


def _index_positions(x, dim: int, index, source_shape) -> tuple:
    """Positions for `out.select(dim, index[i]) (op)= source.select(dim, i)`."""
    index = jnp.ravel(index)
    shape = [1] * len(source_shape)
    shape[dim] = index.shape[0]
    return tuple(
        jnp.broadcast_to(jnp.reshape(index, shape), source_shape)
        if d == dim
        else lax.broadcasted_iota(jnp.int32, source_shape, d)
        for d in range(len(source_shape))
    )


def _index_op(fn=None, *, negative: bool = False):
    """Run an index_* op on 0-d operands as on 1-element vectors, as torch allows.

    The index is checked against the size of `dim` as torch checks it (index_fill
    also takes negative indices).
    """
    if fn is None:
        return functools.partial(_index_op, negative=negative)

    def lowered(ctx, x, dim, index, *args, **kwargs):
        size = x.shape[wrap_dim(dim, x.ndim)] if x.ndim else 1
        _in_range(ctx, index, size, f"dimension {dim} of size {size}", negative=negative)
        if x.ndim:
            return fn(ctx, x, wrap_dim(dim, x.ndim), jnp.ravel(index), *args, **kwargs)
        y = fn(ctx, jnp.reshape(x, (1,)), 0, jnp.reshape(index, (-1,)), *args, **kwargs)
        return jnp.reshape(y, ctx.shape)

    lowered.__name__ = lowered.__qualname__ = fn.__name__
    return lowered


def _as_source(source, x, index):
    source = jnp.reshape(source, (index.shape[0],)) if x.ndim == 1 and source.ndim == 0 else source
    return source.astype(x.dtype)


@lowering(aten.index_add.default)
@_index_op
def index_add(ctx, x, dim, index, source, *, alpha=1):
    source = _as_source(source, x, index)
    return x.at[index_along(dim, index)].add(source if alpha == 1 else source * alpha)


@lowering(aten.index_copy.default)
@_index_op
def index_copy(ctx, x, dim, index, source):
    return x.at[index_along(dim, index)].set(_as_source(source, x, index))


@lowering(aten.index_fill.int_Scalar, aten.index_fill.int_Tensor)
@_index_op(negative=True)
def index_fill(ctx, x, dim, index, value):
    return x.at[index_along(dim, index)].set(jnp.asarray(value).astype(x.dtype))


@lowering(aten.index_reduce.default)
@_index_op
def index_reduce(ctx, x, dim, index, source, reduce, *, include_self=True):
    source = _as_source(source, x, index)
    positions = _index_positions(x, dim, index, source.shape)
    return _scatter_reduce(x, positions, source, reduce, include_self)


@lowering(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(ctx, x, mask, value):
    value = jnp.asarray(value).astype(ctx.dtype)
    return jnp.broadcast_to(jnp.where(mask, value, x.astype(ctx.dtype)), ctx.shape)


@lowering(aten.masked_scatter.default)
def masked_scatter(ctx, x, mask, source):
    mask = jnp.broadcast_to(mask, ctx.shape)
    flat_mask = jnp.ravel(mask)
    if flat_mask.size == 0 or source.size == 0:
        return jnp.broadcast_to(x, ctx.shape)
    # The k-th True position of the mask takes the k-th element of source.
    position = jnp.clip(jnp.cumsum(flat_mask.astype(jnp.int32)) - 1, 0, source.size - 1)
    taken = jnp.reshape(jnp.ravel(source)[position], ctx.shape).astype(ctx.dtype)
    return jnp.where(mask, taken, jnp.broadcast_to(x, ctx.shape))


@lowering(aten.take.default)
def take(ctx, x, index):
    _in_range(ctx, index, x.size, f"a tensor of {x.size} elements", negative=True)
    return jnp.ravel(x)[index]


@lowering(aten.put.default)
def put(ctx, x, index, source, accumulate=False):
    """`x.flatten()[index] = source` (or `+=`), indices into the flattened tensor."""
    flat = jnp.ravel(x)
    index = jnp.ravel(index)
    _in_range(ctx, index, flat.size, f"a tensor of {flat.size} elements", negative=True)
    index = jnp.where(index < 0, index + flat.size, index)
    source = jnp.ravel(source).astype(x.dtype)
    flat = flat.at[index].add(source) if accumulate else flat.at[index].set(source)
    return jnp.reshape(flat, x.shape)


@lowering(aten.take_along_dim.default)
def take_along_dim(ctx, x, indices, dim=None):
    if dim is None:
        return jnp.take_along_axis(jnp.ravel(x), jnp.ravel(indices), axis=0)
    dim = wrap_dim(dim, x.ndim)  # torch requires x.ndim == indices.ndim
    # Broadcast every dim but `dim`, where each side keeps its own size.
    shape = list(
        np.broadcast_shapes(*(a.shape[:dim] + (1,) + a.shape[dim + 1 :] for a in (x, indices)))
    )
    x = jnp.broadcast_to(x, shape[:dim] + [x.shape[dim]] + shape[dim + 1 :])
    indices = jnp.broadcast_to(indices, shape[:dim] + [indices.shape[dim]] + shape[dim + 1 :])
    return jnp.take_along_axis(x, indices, axis=dim)


@lowering(aten.embedding.default)
def embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    _in_range(ctx, indices, weight.shape[0], f"an embedding of {weight.shape[0]} rows", negative=False)
    out = jnp.take(weight, indices, axis=0)
    if scale_grad_by_freq:
        counts = jnp.zeros(weight.shape[0], weight.dtype).at[indices].add(1)
        scale = counts[indices][..., None]
        # Same value, gradient divided by how often each row was looked up.
        out = lax.stop_gradient(out) + (out - lax.stop_gradient(out)) / scale
    if padding_idx >= 0:
        # The padding row receives no gradient.
        out = jnp.where((indices == padding_idx)[..., None], lax.stop_gradient(out), out)
    return out


@lowering(aten.embedding_dense_backward.default)
def embedding_dense_backward(
    ctx, grad_output, indices, num_weights, padding_idx, scale_grad_by_freq
):
    indices = jnp.ravel(indices)
    grad = jnp.reshape(grad_output, (indices.shape[0], -1))
    if scale_grad_by_freq:
        counts = jnp.zeros(num_weights, grad.dtype).at[indices].add(1)
        grad = grad / counts[indices][:, None]
    if padding_idx >= 0:
        grad = jnp.where((indices == padding_idx)[:, None], 0, grad)
    return jnp.zeros(ctx.shape, ctx.dtype).at[indices].add(grad.astype(ctx.dtype))


@lowering(aten.nonzero.default)
def nonzero(ctx, x):
    raise _data_dependent(ctx, "nonzero")


@lowering(aten.nonzero_static.default)
def nonzero_static(ctx, x, *, size, fill_value=-1):
    if x.size == 0 or x.ndim == 0:
        return jnp.full(ctx.shape, fill_value, ctx.dtype)
    found = jnp.nonzero(x, size=size, fill_value=fill_value)
    return jnp.stack(found, axis=1).astype(ctx.dtype)


@lowering(aten.masked_select.default)
def masked_select(ctx, x, mask):
    raise _data_dependent(ctx, "masked_select")


def _searchsorted(ctx, sorted_sequence, values, side: str, sorter):
    if sorter is not None:
        sorted_sequence = jnp.take_along_axis(sorted_sequence, sorter, axis=-1)
    if sorted_sequence.size == 0 or values.size == 0:
        return jnp.zeros(ctx.shape, ctx.dtype)
    if sorted_sequence.ndim <= 1:
        out = jnp.searchsorted(sorted_sequence, values, side=side)
    else:
        lead = sorted_sequence.shape[:-1]
        rows = jnp.reshape(sorted_sequence, (-1, sorted_sequence.shape[-1]))
        vals = jnp.reshape(values, (rows.shape[0], -1))
        out = jax.vmap(lambda r, v: jnp.searchsorted(r, v, side=side))(rows, vals)
        out = jnp.reshape(out, (*lead, values.shape[-1]))
    return jnp.reshape(out, ctx.shape).astype(ctx.dtype)


@lowering(aten.searchsorted.Tensor, aten.searchsorted.Scalar)
def searchsorted(
    ctx, sorted_sequence, values, *, out_int32=False, right=False, side=None, sorter=None
):
    side = side or ("right" if right else "left")
    return _searchsorted(
        ctx, sorted_sequence, jnp.asarray(values, sorted_sequence.dtype), side, sorter
    )


@lowering(aten.bucketize.Tensor, aten.bucketize.Scalar)
def bucketize(ctx, x, boundaries, *, out_int32=False, right=False):
    return _searchsorted(ctx, boundaries, jnp.asarray(x), "right" if right else "left", None)
