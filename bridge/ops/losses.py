"""Loss ATen ops: nll, cross entropy, mse, l1, smooth l1, huber, binary cross
entropy, kl_div, and torch.nn's chunked linear_cross_entropy.

`reduction` is torch's Reduction enum (0 none, 1 mean, 2 sum). Cross
entropy takes its log-softmax in float32 for half types, as torch does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax

from bridge.ops.matmul import matmul_in
from bridge.ops.operands import accumulation_dtype, empty_or
from bridge.ops.registry import lowering

aten = torch.ops.aten


_NONE, _MEAN, _SUM = 0, 1, 2  # torch's Reduction enum


def _reduce(loss, reduction: int):
    if reduction == _MEAN:
        return jnp.mean(loss)
    if reduction == _SUM:
        return jnp.sum(loss)
    return loss


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
    return loss.astype(ctx.dtype_of(0)), empty_or(ctx, 1, total)


@lowering(aten.nll_loss.default, aten.nll_loss_nd.default)
def nll_loss(ctx, x, target, weight=None, reduction=_MEAN, ignore_index=-100):
    return _nll(x, target, weight, reduction, ignore_index)[0].astype(ctx.dtype)


@lowering(aten.cross_entropy_loss.default)
def cross_entropy_loss(ctx, x, target, weight=None, reduction=_MEAN, ignore_index=-100, label_smoothing=0.0):
    class_dim = 0 if x.ndim == 1 else 1
    n_classes = x.shape[class_dim]
    acc = accumulation_dtype(x.dtype)
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
    acc = accumulation_dtype(x.dtype)
    logits = matmul_in(x, linear_weight.T, acc)
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


def linear_cross_entropy_chunked_none(
    ctx, x, linear_weight, target, linear_bias, weight, ignore_index, batch_chunk_size, acc_policy, acc_dtype
):
    """Per-row loss (N,) of linear_cross_entropy with reduction='none'."""
    rows, _ = _chunked_lce_rows(x, linear_weight, target, linear_bias, weight, ignore_index)
    return rows.astype(ctx.dtype)


def _torch_nn_ops():
    """torch.nn's chunked linear_cross_entropy custom ops: they exist once their module is imported."""
    try:
        import torch.nn.modules.linear_cross_entropy  # noqa: F401
    except ImportError:  # a torch without linear_cross_entropy
        return None
    return torch.ops.torch_nn


_TORCH_NN = _torch_nn_ops()
if _TORCH_NN is not None:
    lowering(_TORCH_NN._linear_cross_entropy_batch_chunked.default)(linear_cross_entropy_chunked)
    lowering(_TORCH_NN._linear_cross_entropy_batch_chunked_no_reduction.default)(
        linear_cross_entropy_chunked_none
    )
