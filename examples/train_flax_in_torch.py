"""Train a Flax block inside a torch model with torch.optim.

A torch model embeds 2-D points, a `flax.nnx` block (Linear, LayerNorm,
Dropout, GELU) transforms them, and a torch head classifies them. The Flax
block becomes an `nn.Module` with `bridge.jax_to_torch`; `torch.optim.AdamW`
trains all three parts together, and `model.eval()` turns the block's dropout
off.

Run: .venv/bin/python examples/train_flax_in_torch.py [--steps 300] [--compile]
"""

from __future__ import annotations

import argparse
import math

import jax
import torch
from flax import nnx

import bridge


class FlaxBlock(nnx.Module):
    """A residual MLP block written in Flax."""

    def __init__(self, width: int, rngs: nnx.Rngs) -> None:
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.drop(self.down(nnx.gelu(self.up(self.norm(x)))))


class Classifier(torch.nn.Module):
    """torch embedding -> Flax block -> torch head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(2, width)
        self.block = bridge.jax_to_torch(FlaxBlock(width, nnx.Rngs(0)))
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals, labelled 0 and 1."""
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    angle = t + label * math.pi
    points = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (3 * math.pi)
    return points + 0.02 * torch.randn(n, 2, generator=generator), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compile", action="store_true", help="train under torch.compile")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = spirals(512, generator)
    model = Classifier()
    print(f"Flax parameters as torch parameters: {[n for n, _ in model.block.named_parameters()]}")
    step_model = (
        torch.compile(model, backend="aot_eager", fullgraph=True) if args.compile else model
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    first = None
    for step in range(args.steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        logits = model(x)
        final = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    print(f"loss: {first:.4f} -> {final:.4f} (eval), accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
