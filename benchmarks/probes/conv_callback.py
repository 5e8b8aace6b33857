"""Probe (not a bench_ script; its numbers are quoted in reports, not tables).

XLA's channels-last convolution, as bridge's layout pass lowers it, against
torch's own kernel run through `bridge.callback`, on ResNet-50 (batch 8,
128x128) convolution shapes, under `jax.jit`, forward and gradient, the four
calls interleaved; milliseconds as median [p10, p90].

Run: .venv/bin/python benchmarks/probes/conv_callback.py [reps]
Writes benchmarks/probes/results/conv_callback.md.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import fmt_ms, header, time_interleaved, write_results  # noqa: E402

import bridge  # noqa: E402
from bridge.ops.conv import convolve  # noqa: E402

# (N, C, H, W, O, kernel, stride)
SHAPES = [
    (8, 64, 32, 32, 64, 3, 1),
    (8, 128, 16, 16, 128, 3, 1),
    (8, 256, 8, 8, 256, 3, 1),
    (8, 512, 4, 4, 512, 3, 1),
    (8, 256, 32, 32, 64, 1, 1),
    (8, 3, 128, 128, 64, 7, 2),
]


def probe(shape: tuple[int, ...], reps: int) -> str:
    n, c, h, w, o, k, s = shape
    p = k // 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    wt = rng.standard_normal((o, c, k, k), dtype=np.float32) * 0.05
    x_last, x_first, wj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(x), jnp.asarray(wt)

    def xla(a, b):
        return convolve(jnp.float32, a, b, None, s, p, 1, False, 0, 1, channels_last=True)

    torch_conv = bridge.callback.wrap(lambda a, b: torch.nn.functional.conv2d(a, b, stride=s, padding=p))
    fx, fc = jax.jit(xla), jax.jit(torch_conv)
    gx = jax.jit(jax.grad(lambda a, b: (xla(a, b) ** 2).sum(), argnums=(0, 1)))
    gc = jax.jit(jax.grad(lambda a, b: (torch_conv(a, b) ** 2).sum(), argnums=(0, 1)))
    ref = np.asarray(fx(x_last, wj)).transpose(0, 3, 1, 2)
    err = np.abs(ref - np.asarray(fc(x_first, wj))).max() / np.abs(ref).max()
    t = time_interleaved(
        {
            "xla": lambda: fx(x_last, wj).block_until_ready(),
            "cb": lambda: fc(x_first, wj).block_until_ready(),
            "g_xla": lambda: jax.block_until_ready(gx(x_last, wj)),
            "g_cb": lambda: jax.block_until_ready(gc(x_first, wj)),
        },
        reps,
        3,
    )
    m = {key: statistics.median(v) for key, v in t.items()}
    return (
        f"{n}x{c}x{h}x{w}->{o} k{k}s{s}: forward XLA {fmt_ms(t['xla'])}, torch callback {fmt_ms(t['cb'])} "
        f"({m['cb'] / m['xla']:.2f}x); gradient XLA {fmt_ms(t['g_xla'])}, torch callback {fmt_ms(t['g_cb'])} "
        f"({m['g_cb'] / m['g_xla']:.2f}x); max rel. difference {err:.1e}"
    )


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    lines = header(
        "## Probe: one convolution, XLA's channels-last kernel against torch's through `bridge.callback`",
        False,
        os.getloadavg(),
        f"; torch threads {torch.get_num_threads()}",
    )
    lines += [f"- Method: see the docstring of benchmarks/probes/conv_callback.py; {reps} rounds.", ""]
    for shape in SHAPES:
        lines.append("- " + probe(shape, reps))
        print(lines[-1], flush=True)
    write_results(Path(__file__).resolve().parent / "results", "conv_callback", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
