"""Quick start: a torch model as a pure JAX function, trained with jax.grad + optax.

Run: make demo   (or .venv/bin/python examples/quickstart.py)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn

import bridge

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))

# 1. Convert: a pure function and its parameters (shared with the module, no copy).
apply, params = bridge.torch_to_jax(model)
print("params:", {k: v.shape for k, v in params.items()})
assert params["0.weight"].unsafe_buffer_pointer() == model[0].weight.data_ptr()

# 2. Same numbers as torch.
x = torch.randn(16, 8)
y = torch.randn(16, 1)
out = jax.jit(apply)(params, bridge.to_jax(x))
err = np.abs(np.asarray(out) - model(x).detach().numpy()).max()
print(f"max |jax - torch| = {err:.2e}")
assert err < 1e-5

# 3. jax.grad and optax work on the params dict as it is.
def loss_fn(p, xb, yb):
    return jnp.mean((apply(p, xb) - yb) ** 2)

opt = optax.adam(1e-2)
opt_state = opt.init(params)

@jax.jit
def step(p, s, xb, yb):
    loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
    updates, s = opt.update(grads, s)
    return optax.apply_updates(p, updates), s, loss

xj, yj = bridge.to_jax(x), bridge.to_jax(y)
losses = []
for _ in range(100):
    params, opt_state, loss = step(params, opt_state, xj, yj)
    losses.append(float(loss))
print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
assert losses[-1] < 0.5 * losses[0]

# 4. Trained weights go back into the torch module.
model.load_state_dict(bridge.to_torch(params))
final = torch.nn.functional.mse_loss(model(x), y).item()
print(f"torch loss with the trained weights: {final:.4f}")
assert abs(final - loss_fn(params, xj, yj)) < 1e-4
