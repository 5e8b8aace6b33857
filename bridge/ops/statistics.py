"""cov and corrcoef, whole.

torch.export keeps `aten.cov` and `aten.corrcoef` as single nodes only when
capture takes their shapes from torch (their C++ decompositions test values:
the weights' signs and the degrees of freedom; see `fallback.eager_shapes`).
These lowerings follow ATen's Correlation.cpp step by step, with torch's value
checks as run-time checks (`ctx.require`) and its "degrees of freedom <= 0"
case (a warning, then division by zero) computed, not warned about.
"""

from __future__ import annotations

import jax.numpy as jnp
import torch

from bridge.ops.registry import lowering

aten = torch.ops.aten


def _cov(ctx, x, correction, fweights, aweights, dtype):
    x = jnp.asarray(x).astype(dtype)
    x = x.reshape(1, -1) if x.ndim < 2 else x
    n = x.shape[1]
    w = None
    if fweights is not None:
        if n:
            ctx.require(jnp.min(fweights) >= 0, RuntimeError, "cov(): fweights cannot be negative")
        w = fweights
    if aweights is not None:
        if n:
            ctx.require(jnp.min(aweights) >= 0, RuntimeError, "cov(): aweights cannot be negative")
        w = aweights if w is None else w * aweights
    if w is None:
        w_sum = jnp.asarray(n, dtype)
        avg = jnp.sum(x, axis=1) / w_sum
        norm = w_sum - correction
    else:
        w_sum = jnp.sum(w)
        ctx.require(w_sum != 0, RuntimeError, "cov(): weights sum to zero, can't be normalized")
        w_sum = w_sum.astype(dtype)
        avg = jnp.sum(x * w, axis=1) / w_sum
        if correction == 0:
            norm = w_sum
        elif aweights is None:
            norm = w_sum - correction
        else:
            norm = w_sum - correction * jnp.sum(w * aweights).astype(dtype) / w_sum
    # torch warns "degrees of freedom is <= 0" and divides by zero.
    norm = jnp.where(jnp.real(norm) <= 0, jnp.zeros_like(norm), norm)
    centred = x - avg[:, None]
    weighted = centred if w is None else centred * w
    c = jnp.matmul(centred, jnp.conj(weighted.T), precision="highest")
    return jnp.squeeze(c / norm)


@lowering(aten.cov.default)
def cov(ctx, x, *, correction=1, fweights=None, aweights=None):
    return _cov(ctx, x, correction, fweights, aweights, ctx.dtype)


def _clip_unit(c):
    """Clip to [-1, 1] with torch's clamp gradient (which passes at the bounds)."""
    return jnp.where((c >= -1) & (c <= 1), c, jnp.clip(c, -1, 1))


@lowering(aten.corrcoef.default)
def corrcoef(ctx, x):
    c = _cov(ctx, x, 1, None, None, ctx.dtype)
    if c.ndim == 0:  # nan for a covariance of nan, inf or 0, else 1
        return c / c
    d = jnp.diagonal(c)
    stddev = jnp.sqrt(jnp.real(d) if jnp.iscomplexobj(d) else d)
    c = c / stddev[:, None]
    c = c / stddev[None, :]
    if jnp.iscomplexobj(c):
        return _complex(_clip_unit(jnp.real(c)), _clip_unit(jnp.imag(c)))
    return _clip_unit(c)


def _complex(re, im):
    return re + 1j * im.astype(re.dtype)
