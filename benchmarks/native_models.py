"""Hand-written JAX models: the anchors bench_torch_to_jax.py measures translations against.

A translated model is one XLA program, so the fastest it can be is the same
model written by hand in JAX. These are written the way a JAX user would
write them (Flax-style layouts, plain `jax.numpy` / `jax.lax`), and load the
weights of the transformers model they mirror, so the benchmark can check
them equal to torch before timing them.

- ResNet (transformers' `ResNetForImageClassification`, basic or bottleneck
  layers): NHWC activations, HWIO kernels, `lax.conv_general_dilated`,
  BatchNorm with batch statistics in training (running statistics returned
  as new state, torch's momentum and unbiased running variance) and running
  statistics in eval.
- GPT-2 (transformers' `GPT2LMHeadModel`): pre-norm blocks, fused QKV
  projection, causal softmax attention, tanh GELU, LM head tied to the token
  embedding.

Each `*_weights(model)` returns `(params, state)` as flat dicts of JAX arrays
(state: BatchNorm running statistics; empty for GPT-2), and each `*_apply`
is a pure function of them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# --------------------------------------------------------------------------- ResNet


def resnet_weights(model: torch.nn.Module) -> tuple[dict, dict]:
    """A transformers ResNet's weights in JAX layouts: conv kernels HWIO, the
    classifier (in, out); BatchNorm's running statistics as state."""
    params, state = {}, {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        a = _np(t)
        if name.endswith("convolution.weight"):
            a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif name == "classifier.1.weight":
            a = a.T
        target = state if name.endswith(("running_mean", "running_var")) else params
        target[name] = jnp.asarray(a)
    return params, state


def _batch_norm(x, p, s, prefix, train, new_state):
    gamma, beta = p[f"{prefix}.weight"], p[f"{prefix}.bias"]
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        n = x.size // x.shape[-1]
        rm, rv = s[f"{prefix}.running_mean"], s[f"{prefix}.running_var"]
        new_state[f"{prefix}.running_mean"] = (1 - BN_MOMENTUM) * rm + BN_MOMENTUM * lax.stop_gradient(mean)
        new_state[f"{prefix}.running_var"] = (1 - BN_MOMENTUM) * rv + BN_MOMENTUM * lax.stop_gradient(var) * n / (n - 1)
    else:
        mean, var = s[f"{prefix}.running_mean"], s[f"{prefix}.running_var"]
    return (x - mean) * lax.rsqrt(var + BN_EPS) * gamma + beta


def _conv_bn(x, p, s, prefix, stride, train, new_state, relu=True):
    w = p[f"{prefix}.convolution.weight"]
    pad = w.shape[0] // 2
    x = lax.conv_general_dilated(
        x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = _batch_norm(x, p, s, f"{prefix}.normalization", train, new_state)
    return jax.nn.relu(x) if relu else x


def resnet_apply(config, params: dict, state: dict, x: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    """Logits of an NHWC batch `x`, and the updated running statistics (train) or `state` (eval)."""
    p, s, new_state = params, state, {}
    x = _conv_bn(x, p, s, "resnet.embedder.embedder", 2, train, new_state)
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), [(0, 0), (1, 1), (1, 1), (0, 0)])
    bottleneck = config.layer_type == "bottleneck"
    in_ch = config.embedding_size
    for i, (out_ch, depth) in enumerate(zip(config.hidden_sizes, config.depths, strict=True)):
        for j in range(depth):
            stride = (2 if (i > 0 or config.downsample_in_first_stage) else 1) if j == 0 else 1
            pre = f"resnet.encoder.stages.{i}.layers.{j}"
            residual = x
            if in_ch != out_ch or stride != 1:
                residual = _conv_bn(x, p, s, f"{pre}.shortcut", stride, train, new_state, relu=False)
            if bottleneck:
                first, second = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
                h = _conv_bn(x, p, s, f"{pre}.layer.0", first, train, new_state)
                h = _conv_bn(h, p, s, f"{pre}.layer.1", second, train, new_state)
                h = _conv_bn(h, p, s, f"{pre}.layer.2", 1, train, new_state, relu=False)
            else:
                h = _conv_bn(x, p, s, f"{pre}.layer.0", stride, train, new_state)
                h = _conv_bn(h, p, s, f"{pre}.layer.1", 1, train, new_state, relu=False)
            x = jax.nn.relu(h + residual)
            in_ch = out_ch
    pooled = jnp.mean(x, axis=(1, 2))
    logits = pooled @ p["classifier.1.weight"] + p["classifier.1.bias"]
    return logits, (new_state if train else state)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the leading axes (torch's `F.cross_entropy`)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


# --------------------------------------------------------------------------- GPT-2


def gpt2_weights(model: torch.nn.Module) -> tuple[dict, dict]:
    """A transformers GPT-2 LM's parameters (named like `named_parameters()`, so the
    LM head is the tied token embedding); GPT-2 has no state."""
    return {name: jnp.asarray(_np(t)) for name, t in model.named_parameters()}, {}


def _layer_norm(x, p, prefix, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * p[f"{prefix}.weight"] + p[f"{prefix}.bias"]


def _dense(x, p, prefix):  # transformers' Conv1D: weight is (in, out)
    return x @ p[f"{prefix}.weight"] + p[f"{prefix}.bias"]


def gpt2_apply(config, params: dict, input_ids: jax.Array) -> jax.Array:
    """Next-token logits (batch, seq, vocab) of token ids (batch, seq)."""
    p, eps = params, config.layer_norm_epsilon
    batch, seq = input_ids.shape
    heads, width = config.n_head, config.n_embd
    head_dim = width // heads
    wte = p["transformer.wte.weight"]
    x = wte[input_ids] + p["transformer.wpe.weight"][:seq]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}"
        h = _layer_norm(x, p, f"{pre}.ln_1", eps)
        qkv = _dense(h, p, f"{pre}.attn.c_attn").reshape(batch, seq, 3, heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + _dense(attn.reshape(batch, seq, width), p, f"{pre}.attn.c_proj")
        h = _layer_norm(x, p, f"{pre}.ln_2", eps)
        h = jax.nn.gelu(_dense(h, p, f"{pre}.mlp.c_fc"), approximate=True)
        x = x + _dense(h, p, f"{pre}.mlp.c_proj")
    x = _layer_norm(x, p, "transformer.ln_f", eps)
    return x @ wte.T


def gpt2_loss(config, params: dict, input_ids: jax.Array) -> jax.Array:
    """The LM loss transformers computes with `labels=input_ids`: next-token cross-entropy."""
    logits = gpt2_apply(config, params, input_ids)
    return cross_entropy(logits[:, :-1], input_ids[:, 1:])
