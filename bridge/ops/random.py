"""Random ATen ops: dropout, bernoulli, rand/randn/randint/randperm, normal, ...

Every draw comes from `ctx.key()`, a key derived from the caller's `rng=` key
and the node's position in the graph, so the same key gives the same numbers
under `jit`, `vmap` and `grad`, and a different key different ones. torch's
own generator state cannot be reproduced: the numbers follow the same
distributions as torch's, not the same sequence. Ops that draw nothing for
their arguments (dropout with p == 0 or in eval mode) need no key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.families import register
from bridge.ops.registry import lowering

aten = torch.ops.aten

_SELU_ALPHA = 1.7580993408473766  # alpha * scale of SELU: alpha_dropout's saturation value


def _float_dtype(dtype):
    """A float dtype to draw in: `dtype` itself, or float32 for ints and bools."""
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _uniform(ctx, low=0.0, high=1.0):
    dtype = _float_dtype(ctx.dtype)
    return jax.random.uniform(ctx.key(), ctx.shape, dtype, minval=low, maxval=high).astype(ctx.dtype)


def _normal(ctx):
    return jax.random.normal(ctx.key(), ctx.shape, _float_dtype(ctx.dtype))


def _integers(ctx, low, high):
    draw_dtype = ctx.dtype if jnp.issubdtype(ctx.dtype, jnp.integer) else jnp.int32
    return jax.random.randint(ctx.key(), ctx.shape, low, high, draw_dtype).astype(ctx.dtype)


# --------------------------------------------------------------------------- dropout


def _keep_mask(ctx, p: float, shape):
    return jax.random.bernoulli(ctx.key(), 1.0 - p, shape)


@lowering(aten.native_dropout.default)
def native_dropout(ctx, x, p, train):
    """(x * mask / (1 - p), mask) in training; (x, all-true mask) otherwise."""
    mask_dtype = ctx.dtype_of(1)
    if train is False or p == 0:
        return x, jnp.ones(x.shape, mask_dtype)
    if p >= 1:
        return jnp.zeros_like(x), jnp.zeros(x.shape, mask_dtype)
    keep = _keep_mask(ctx, p, x.shape)
    out = jnp.where(keep, x * (1.0 / (1.0 - p)), 0).astype(ctx.dtype_of(0))
    return out, keep.astype(mask_dtype)


@lowering(aten.native_dropout_backward.default)
def native_dropout_backward(ctx, grad, mask, scale):
    return (grad * mask * scale).astype(ctx.dtype)


def _dropout(ctx, x, p, train, *, feature: bool, alpha: bool):
    """torch's _dropout_impl: plain, per-channel (feature) and alpha variants."""
    if not train or p == 0 or x.size == 0:
        return x
    if p >= 1 and not alpha:
        return jnp.zeros_like(x)
    shape = x.shape[:2] + (1,) * (x.ndim - 2) if feature else x.shape
    keep = _keep_mask(ctx, p, shape).astype(x.dtype)
    if alpha:
        a = 1.0 / ((_SELU_ALPHA**2 * p + 1) * (1 - p)) ** 0.5
        b = (keep - 1) * (_SELU_ALPHA * a) + _SELU_ALPHA * a * p
        return (x * (keep * a) + b).astype(ctx.dtype)
    return (x * (keep / (1.0 - p))).astype(ctx.dtype)


def _dropout_variant(op, *, feature: bool, alpha: bool):
    """Register `op(x, p, train)` as the `_dropout` variant it names."""

    def lower(ctx, x, p, train):
        return _dropout(ctx, x, p, train, feature=feature, alpha=alpha)

    register(op, lower)


_dropout_variant(aten.dropout.default, feature=False, alpha=False)
_dropout_variant(aten.feature_dropout.default, feature=True, alpha=False)
_dropout_variant(aten.alpha_dropout.default, feature=False, alpha=True)
_dropout_variant(aten.feature_alpha_dropout.default, feature=True, alpha=True)


# --------------------------------------------------------------------------- bernoulli


@lowering(aten.bernoulli.default)
def bernoulli(ctx, probs, *, generator=None):
    return jax.random.bernoulli(ctx.key(), probs.astype(jnp.float32), ctx.shape).astype(ctx.dtype)


@lowering(aten.bernoulli.p)
def bernoulli_p(ctx, x, p, *, generator=None):
    return jax.random.bernoulli(ctx.key(), p, ctx.shape).astype(ctx.dtype)


@lowering(aten.bernoulli.Tensor)
def bernoulli_tensor(ctx, x, p, *, generator=None):
    return jax.random.bernoulli(ctx.key(), p.astype(jnp.float32), ctx.shape).astype(ctx.dtype)


# --------------------------------------------------------------------------- factories


@lowering(aten.rand.default, aten.rand_like.default)
def rand(ctx, *args, **kwargs):
    return _uniform(ctx)


@lowering(aten.randn.default, aten.randn_like.default)
def randn(ctx, *args, **kwargs):
    return _normal(ctx).astype(ctx.dtype)


@lowering(aten.randint.default, aten.randint.low)
def randint(ctx, *args, **kwargs):
    # (high, size) or (low, high, size)
    low, high = (0, args[0]) if len(args) == 2 else args[:2]
    return _integers(ctx, low, high)


@lowering(aten.randint_like.default, aten.randint_like.Tensor, aten.randint_like.low_dtype)
def randint_like(ctx, x, *args, **kwargs):
    # (high) or (low, high); high may be a tensor (the .Tensor overload)
    low, high = (0, args[0]) if len(args) == 1 else args[:2]
    return _integers(ctx, low, high)


@lowering(aten.randperm.default)
def randperm(ctx, n, **kwargs):
    return jax.random.permutation(ctx.key(), n).astype(ctx.dtype)


# --------------------------------------------------------------------------- distributions


@lowering(aten.normal.Tensor_float, aten.normal.float_Tensor, aten.normal.Tensor_Tensor)
def normal(ctx, mean, std=1.0, *, generator=None):
    # torch defines normal's derivatives as zero (it is not reparameterised):
    # torch.normal(m, s).sum().backward() leaves m.grad and s.grad at 0.
    return lax.stop_gradient((mean + std * _normal(ctx)).astype(ctx.dtype))


@lowering(aten.normal.float_float)
def normal_float_float(ctx, mean, std, size, **kwargs):
    return (mean + std * _normal(ctx)).astype(ctx.dtype)


@lowering(aten.normal_functional.default)
def normal_functional(ctx, x, mean=0.0, std=1.0, *, generator=None):
    return (mean + std * _normal(ctx)).astype(ctx.dtype)


@lowering(aten.uniform.default)
def uniform(ctx, x, low=0.0, high=1.0, *, generator=None):
    return _uniform(ctx, low, high)


@lowering(aten.exponential.default)
def exponential(ctx, x, lambd=1.0, *, generator=None):
    draw = jax.random.exponential(ctx.key(), ctx.shape, _float_dtype(ctx.dtype))
    return (draw / lambd).astype(ctx.dtype)


@lowering(aten.geometric.default)
def geometric(ctx, x, p, *, generator=None):
    """Trials up to and including the first success: values 1, 2, ..."""
    u = jax.random.uniform(ctx.key(), ctx.shape, jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
    return (jnp.floor(jnp.log(u) / jnp.log1p(-p)) + 1).astype(ctx.dtype)


@lowering(aten.cauchy.default)
def cauchy(ctx, x, median=0.0, sigma=1.0, *, generator=None):
    draw = jax.random.cauchy(ctx.key(), ctx.shape, _float_dtype(ctx.dtype))
    return (median + sigma * draw).astype(ctx.dtype)


@lowering(aten.log_normal.default)
def log_normal(ctx, x, mean=1.0, std=2.0, *, generator=None):
    return jnp.exp(mean + std * _normal(ctx)).astype(ctx.dtype)


@lowering(aten.poisson.default)
def poisson(ctx, rate, generator=None):
    return jax.random.poisson(ctx.key(), rate, ctx.shape).astype(ctx.dtype)


@lowering(aten._standard_gamma.default)
def standard_gamma(ctx, alpha, generator=None):
    return jax.random.gamma(ctx.key(), alpha, ctx.shape, _float_dtype(ctx.dtype)).astype(ctx.dtype)


@lowering(aten.binomial.default)
def binomial(ctx, count, prob, generator=None):
    draw = jax.random.binomial(ctx.key(), count.astype(jnp.float32), prob.astype(jnp.float32), ctx.shape)
    return draw.astype(ctx.dtype)


@lowering(aten.multinomial.default)
def multinomial(ctx, probs, num_samples, replacement=False, *, generator=None):
    """Category indices drawn from the rows of `probs` (weights, not normalised).

    With replacement: independent categorical draws. Without: the Gumbel
    top-k trick, which samples without replacement exactly.
    """
    logits = jnp.log(probs.astype(jnp.float32))
    if replacement:
        shape = (num_samples,) + probs.shape[:-1]
        draws = jax.random.categorical(ctx.key(), logits, axis=-1, shape=shape)
        return jnp.moveaxis(draws, 0, -1).astype(ctx.dtype)
    perturbed = logits + jax.random.gumbel(ctx.key(), logits.shape, jnp.float32)
    return jax.lax.top_k(perturbed, num_samples)[1].astype(ctx.dtype)


# --------------------------------------------------------------------------- rrelu


@lowering(aten.rrelu_with_noise_functional.default)
def rrelu_with_noise_functional(ctx, x, noise, lower=0.125, upper=1.0 / 3.0, training=False, generator=None):
    """(output, new noise) of randomized leaky ReLU.

    Training: each x <= 0 is scaled by a slope drawn from U(lower, upper),
    which the noise output records (1 where x > 0). Otherwise a leaky ReLU
    with slope (lower + upper) / 2, noise passed through, and no key needed.
    """
    if not training:
        slope = (lower + upper) / 2
        return jnp.where(x > 0, x, x * slope).astype(ctx.dtype_of(0)), noise.astype(ctx.dtype_of(1))
    dtype = _float_dtype(x.dtype)
    slopes = jax.random.uniform(ctx.key(), x.shape, dtype, minval=lower, maxval=upper)
    slopes = jnp.where(x > 0, jnp.ones((), dtype), slopes).astype(x.dtype)
    return (x * slopes).astype(ctx.dtype_of(0)), jnp.broadcast_to(slopes, ctx.shape_of(1)).astype(ctx.dtype_of(1))
