"""Port a transformers model to JAX, check parity, and fine-tune it with optax.

A small random-init GPT-2 (no weights are downloaded) is translated with
bridge.torch_to_jax, compared with torch eager, then trained for a few steps
of next-token prediction under jax.jit with optax.adamw.

Run: .venv/bin/python examples/port_transformers.py [--steps N]
"""

import argparse

import jax
import numpy as np
import optax
import torch
import transformers

import bridge

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=96,
                                 bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(config).eval()
ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids)

apply, params = bridge.torch_to_jax(model)
jids, jmask = bridge.to_jax(ids), bridge.to_jax(mask)

# Parity with torch eager, cache and ModelOutput included.
out = jax.jit(apply)(params, input_ids=jids, attention_mask=jmask)
with torch.no_grad():
    ref = model(input_ids=ids, attention_mask=mask)
err = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() / np.abs(ref.logits.numpy()).max()
print(f"{type(out).__name__}: logits {out.logits.shape}, max relative error vs torch {err:.1e}")
assert err < 1e-4

# Fine-tune: next-token cross-entropy, jax.value_and_grad + optax.adamw.
def loss_fn(p):
    logits = apply(p, input_ids=jids, attention_mask=jmask).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jids[:, 1:]).mean()

opt = optax.adamw(3e-3)
state = opt.init(params)

@jax.jit
def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

losses = []
for _ in range(args.steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
print(f"fine-tuning loss: {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps")
assert losses[-1] < losses[0]

# The fine-tuned weights load back into the torch model, which agrees.
model.load_state_dict(bridge.to_torch(params), strict=False)
with torch.no_grad():
    torch_logits = model(input_ids=ids, attention_mask=mask).logits
    t_loss = torch.nn.functional.cross_entropy(torch_logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
print(f"torch loss with fine-tuned weights: {t_loss.item():.3f} (JAX: {float(loss_fn(params)):.3f})")
assert abs(t_loss.item() - float(loss_fn(params))) < 1e-3
