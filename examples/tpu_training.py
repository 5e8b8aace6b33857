"""Mixed torch/JAX training on TPU, or on the CPU backends that share its code.

Two styles (docs/tpu.md says when to use which):

  jax        JAX drives. A torch MLP is translated with `bridge.torch_to_jax`,
             its parameters are sharded FSDP-style over every device with
             `bridge.adapters.sharding.shard_params`, and optax trains it under
             `jax.jit`; XLA partitions the step to follow the data.
  torch_xla  torch_xla drives. A torch model on the XLA device calls a JAX
             block through `bridge.xla.xla_call`, which runs it inside the
             torch_xla graph (forward and backward), and torch.optim trains it.

    python examples/tpu_training.py                 # both styles
    python examples/tpu_training.py --style jax --steps 20

Device choice: on a TPU host JAX and torch_xla pick the TPU. Elsewhere JAX
runs on 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set here unless you set XLA_FLAGS) and torch_xla on its CPU device
(torch_xla falls back to PJRT_DEVICE=CPU when it finds no TPU).

What was tested where: both styles run in this repository's tests on CPU
backends only (tests/test_examples_tpu.py: the jax style with torch 2.13 and
jax 0.10 on 8 simulated devices; the torch_xla style with torch_xla 2.9,
PJRT_DEVICE=CPU); the numerics of both paths are checked against
single-device / torch CPU training in tests/test_sharding.py and
tests/test_xla.py. Nothing here has run on a TPU: TPU-only are the device
topology of the mesh, torch_xla's DLPack refusing TPU buffers (its branch is
tested by simulation) and running JAX and torch_xla in one process on a TPU
host (torch_xla claims the TPU first, as its own call_jax does).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from bridge.adapters.sharding import shard_params  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bridge  # noqa: E402


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, 8),
    )


def train_jax(steps: int) -> list[float]:
    """JAX drives: translated torch MLP, FSDP over every device, optax."""
    import optax

    devices = jax.devices()
    mesh = Mesh(devices, ("data",))
    apply, params = bridge.torch_to_jax(mlp())
    # FSDP: shard each weight along a dimension the device count divides.
    n = len(devices)
    rules = [(r"\.weight$", P("data", None)), (r"\.bias$", P("data"))] if 8 % n == 0 else []
    params = shard_params(params, mesh, rules)
    batch = NamedSharding(mesh, P("data"))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (64, 16)), batch)
    y = jax.device_put(jnp.sin(x[:, :8] * 2), batch)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    print(
        f"[jax] {n} {devices[0].platform} device(s); 0.weight sharded as "
        f"{params['0.weight'].sharding.spec}"
    )
    losses = []
    for i in range(steps):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
        print(f"[jax] step {i} loss {losses[-1]:.6f}")
    return losses


def _jax_block(w, h):
    return jax.nn.gelu(h @ w) + h  # a residual block written in JAX


class _MixedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, 64)
        self.w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
        self.out = torch.nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bridge import xla

        return self.out(xla.xla_call(_jax_block, self.w, torch.tanh(self.inp(x))))


def train_torch_xla(steps: int) -> list[float]:
    """torch_xla drives: a JAX block inside the torch_xla graph, torch.optim."""
    from bridge import xla

    device = xla.xla_device()
    net = _MixedNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    x, y = x.to(device), torch.sin(x[:, :8] * 2).to(device)
    print(f"[torch_xla] device {device} ({xla.device_type()})")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        xla.sync()  # one graph per step: torch ops, the JAX block and its VJP
        losses.append(loss.detach())
    values = [float(v) for v in torch.stack(losses).cpu()]  # one read-back at the end
    for i, v in enumerate(values):
        print(f"[torch_xla] step {i} loss {v:.6f}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=["jax", "torch_xla", "both"], default="both")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    from bridge import xla

    ran = 0
    if args.style in ("jax", "both"):
        try:
            import optax  # noqa: F401
        except ImportError:
            print("[jax] skipped: needs optax (pip install optax)")
        else:
            losses = train_jax(args.steps)
            print(f"[jax] loss {losses[0]:.6f} -> {losses[-1]:.6f}")
            ran += 1
    if args.style in ("torch_xla", "both"):
        if not xla.available():
            print("[torch_xla] skipped: needs torch_xla (make venv-xla)")
        else:
            losses = train_torch_xla(args.steps)
            print(f"[torch_xla] loss {losses[0]:.6f} -> {losses[-1]:.6f}")
            ran += 1
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
