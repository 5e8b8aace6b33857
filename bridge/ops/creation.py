"""Creation ATen ops: full/zeros/ones/empty (and *_like, new_*), arange, linspace, eye, ...

Sizes, fill values and dtypes are static in an exported graph, so these ops
build their result from torch's recorded output shape and dtype (`ctx`).
`empty*` has no defined contents in torch; bridge fills it with zeros.
"""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from bridge.ops.elementwise import true_divide
from bridge.ops.registry import lowering

aten = torch.ops.aten


def _full(ctx, value):
    return jnp.full(ctx.shape, value, ctx.dtype)


@lowering(aten.full.default)
def full(ctx, size, fill_value, **options):
    return _full(ctx, fill_value)


@lowering(aten.full_like.default)
def full_like(ctx, x, fill_value, **options):
    return _full(ctx, fill_value)


@lowering(aten.new_full.default)
def new_full(ctx, x, size, fill_value, **options):
    return _full(ctx, fill_value)


@lowering(aten.scalar_tensor.default)
def scalar_tensor(ctx, s, **options):
    return _full(ctx, s)


@lowering(
    aten.zeros.default,
    aten.empty.memory_format,
    aten.empty_permuted.default,
    aten.empty_strided.default,
)
def zeros(ctx, size, *layout, **options):
    return _full(ctx, 0)


@lowering(aten.zeros_like.default, aten.empty_like.default, aten.zero.default)
def zeros_like(ctx, x, **options):
    return _full(ctx, 0)


@lowering(aten.new_zeros.default, aten.new_empty.default, aten.new_empty_strided.default)
def new_zeros(ctx, x, size, *stride, **options):
    return _full(ctx, 0)


@lowering(aten.ones.default)
def ones(ctx, size, **options):
    return _full(ctx, 1)


@lowering(aten.ones_like.default)
def ones_like(ctx, x, **options):
    return _full(ctx, 1)


@lowering(aten.new_ones.default)
def new_ones(ctx, x, size, **options):
    return _full(ctx, 1)


@lowering(aten.fill.Scalar, aten.fill.Tensor)
def fill(ctx, x, value):
    return jnp.broadcast_to(jnp.asarray(value).astype(ctx.dtype), ctx.shape)


@lowering(aten.copy.default)
def copy(ctx, x, src, non_blocking=False):
    return jnp.broadcast_to(src.astype(ctx.dtype), ctx.shape)


@lowering(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(ctx, *bounds, **options):
    start, step = (0, 1) if len(bounds) == 1 else (bounds[0], bounds[2] if len(bounds) > 2 else 1)
    (n,) = ctx.shape
    if jnp.issubdtype(ctx.dtype, jnp.integer):
        # torch truncates start and step to integers first.
        return int(start) + lax.iota(ctx.dtype, n) * int(step)
    # torch computes start + i * step in double precision, then rounds.
    return jnp.asarray(start + np.arange(n, dtype=np.float64) * step, ctx.dtype)


def _linear_steps(ctx, start, end, steps: int):
    """torch's linspace values: from the start for the first half, from the end after."""
    if steps == 1:
        return jnp.reshape(jnp.asarray(start, jnp.float32), (1,))
    start = jnp.asarray(start, jnp.float32)
    end = jnp.asarray(end, jnp.float32)
    step = (end - start) / (steps - 1)
    i = lax.iota(jnp.float32, steps)
    return jnp.where(i < steps // 2, start + step * i, end - step * (steps - 1 - i))


# torch's CPU linspace kernel is compiled once per instruction set; where that
# set has fused multiply-add (AVX2, AVX-512, every ARM64 CPU), the compiler
# contracts `start + step * i` into one, which rounds once instead of twice.
_TORCH_LINSPACE_FMA = not (
    platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX")
)


def _two_sum(a, b):
    """s = fl(a + b) and the exact error e with a + b = s + e (Knuth)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _split_bits(xp, a, low_bits: int):
    """a = hi + lo exactly, `hi` being `a` with its lowest `low_bits` fraction bits cleared."""
    utype = np.dtype(f"uint{a.dtype.itemsize * 8}")
    mask = np.asarray(~np.asarray((1 << low_bits) - 1, utype), utype)
    if xp is np:
        hi = (a.view(utype) & mask).view(a.dtype)
    else:
        hi = lax.bitcast_convert_type(lax.bitcast_convert_type(a, utype) & mask, a.dtype)
    return hi, a - hi


def _fused_mul_add(xp, a, i, c):
    """a * i + c rounded once (a fused multiply-add), for integers 0 <= i < 2**24.

    XLA has no FMA operation, so the product is split into exactly computable
    parts (Dekker) and the sum rounded with its error terms (Knuth's two-sum);
    where the rounded sum sits exactly halfway between two floats, the last
    error term decides the side. Contraction by a compiler keeps every step
    exact; constant folding does not, so constant operands go through NumPy.
    """
    dtype = a.dtype
    a_hi, a_lo = _split_bits(xp, a, (int(np.finfo(dtype).nmant) + 2) // 2)
    i_hi, i_lo = (i & ~0xFFF).astype(dtype), (i & 0xFFF).astype(dtype)
    product = a * i.astype(dtype)
    error = (((a_hi * i_hi - product) + a_hi * i_lo) + a_lo * i_hi) + a_lo * i_lo
    s, e1 = _two_sum(c, product)
    t, e2 = _two_sum(e1, error)
    r, e3 = _two_sum(s, t)
    toward = xp.nextafter(r, xp.where(e3 > 0, np.inf, -np.inf).astype(dtype))
    halfway = (e3 != 0) & (2 * e3 == toward - r)
    past = (e2 != 0) & ((e2 > 0) == (e3 > 0))
    return xp.where(halfway & past, toward, r)


def linspace_values(start, end, steps: int, dtype):
    """torch's CPU `linspace(start, end, steps)` in a float32/float64 `dtype`, bit for bit.

    The kernel computes `start + step * i` for the first half and
    `end - step * (steps - 1 - i)` for the rest, in `dtype`.
    """
    dtype = np.dtype(dtype)
    traced = any(isinstance(v, jax.core.Tracer) for v in (start, end))
    xp = jnp if traced else np
    with np.errstate(all="ignore"):
        start, end = xp.asarray(start).astype(dtype), xp.asarray(end).astype(dtype)
        if steps == 1:
            return jnp.reshape(start, (1,))
        divisor = np.asarray(steps - 1, dtype)
        step = (end - start) / divisor if xp is np else true_divide(end - start, divisor)
        i = xp.arange(steps, dtype=np.int32)
        back = steps - 1 - i
        if _TORCH_LINSPACE_FMA and steps <= 1 << 24:
            front_values = _fused_mul_add(xp, step, i, start)
            back_values = _fused_mul_add(xp, -step, back, end)
        else:
            front_values, back_values = start + step * i.astype(dtype), end - step * back.astype(dtype)
        return jnp.asarray(xp.where(i < steps // 2, front_values, back_values))


@lowering(
    aten.linspace.default,
    aten.linspace.Tensor_Tensor,
    aten.linspace.Tensor_Scalar,
    aten.linspace.Scalar_Tensor,
)
def linspace(ctx, start, end, steps, **options):
    if steps == 0:
        return _full(ctx, 0)
    if ctx.dtype in (np.dtype(np.float32), np.dtype(np.float64)):
        return linspace_values(start, end, steps, ctx.dtype)
    values = _linear_steps(ctx, start, end, steps)
    if jnp.issubdtype(ctx.dtype, jnp.integer):
        values = jnp.trunc(values)
    return values.astype(ctx.dtype)


@lowering(
    aten.logspace.default,
    aten.logspace.Tensor_Tensor,
    aten.logspace.Tensor_Scalar,
    aten.logspace.Scalar_Tensor,
)
def logspace(ctx, start, end, steps, base=10.0, **options):
    if steps == 0:
        return _full(ctx, 0)
    values = jnp.power(jnp.float32(base), _linear_steps(ctx, start, end, steps))
    if jnp.issubdtype(ctx.dtype, jnp.integer):
        values = jnp.trunc(values)
    return values.astype(ctx.dtype)


@lowering(aten.eye.default, aten.eye.m)
def eye(ctx, n, m=None, **options):
    return jnp.eye(*ctx.shape, dtype=ctx.dtype)


@lowering(aten.tril_indices.default)
def tril_indices(ctx, row, col, offset=0, **options):
    return jnp.asarray(np.stack(np.tril_indices(row, offset, col)).reshape(ctx.shape), ctx.dtype)


@lowering(aten.triu_indices.default)
def triu_indices(ctx, row, col, offset=0, **options):
    return jnp.asarray(np.stack(np.triu_indices(row, offset, col)).reshape(ctx.shape), ctx.dtype)
