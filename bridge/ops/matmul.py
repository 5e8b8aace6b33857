"""The matmul family: linear, mm/bmm/matmul, addmm, dot, einsum, tensordot, ...

Half-precision products accumulate in float32, as torch's kernels do, and
operands of different dtypes are refused, as torch refuses them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.ops.operands import is_low_float
from bridge.ops.registry import RefusedByTorchError, lowering

aten = torch.ops.aten


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


def matmul_in(a, b, dtype):
    """`a @ b` accumulated in float32 for half types, as torch does."""
    if is_low_float(dtype):
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
    y = matmul_in(x, weight.T, ctx.dtype)
    return (y if bias is None else y + bias).astype(ctx.dtype)


@lowering(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mv.default)
def matmul(ctx, a, b):
    _same_dtype(ctx, a, b)
    return matmul_in(a, b, ctx.dtype)


@lowering(aten.mm.dtype, aten.bmm.dtype)
def matmul_out_dtype(ctx, a, b, out_dtype):
    return jnp.matmul(a, b, preferred_element_type=ctx.dtype)


@lowering(aten.addmm.default, aten.baddbmm.default, aten.addmv.default)
def addmm(ctx, x, a, b, *, beta=1, alpha=1):
    _same_dtype(ctx, x, a, b)
    return _add_scaled(ctx, x, matmul_in(a, b, ctx.dtype), beta, alpha)


@lowering(aten.addbmm.default)
def addbmm(ctx, x, a, b, *, beta=1, alpha=1):
    _same_dtype(ctx, x, a, b)
    return _add_scaled(ctx, x, jnp.sum(matmul_in(a, b, ctx.dtype), axis=0), beta, alpha)


@lowering(aten.dot.default)
def dot(ctx, a, b):
    _same_dtype(ctx, a, b)
    return matmul_in(a, b, ctx.dtype)


@lowering(aten.vdot.default)
def vdot(ctx, a, b):
    _same_dtype(ctx, a, b)
    return matmul_in(jnp.conj(a), b, ctx.dtype)


@lowering(aten.outer.default)
def outer(ctx, a, b):
    return (a[:, None] * b[None, :]).astype(ctx.dtype)


@lowering(aten.einsum.default)
def einsum(ctx, equation, tensors, *, path=None):
    equation = equation.replace(" ", "")
    if is_low_float(ctx.dtype):
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
            sizes[d] = jax.core.max_dim(sizes[d], n)  # symbolic sizes too (dynamic_shapes)
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
    kwargs = {"preferred_element_type": jnp.float32} if is_low_float(ctx.dtype) else {}
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
