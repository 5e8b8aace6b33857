"""Probe (not a bench_ script; its numbers are quoted in reports, not tables).

ResNet-50 (batch 8, 128x128), translated, forward and training step in one
process under whatever XLA_FLAGS the environment sets (XLA reads them when jax
initialises its backend, so each setting needs its own process). Prints the
median milliseconds and the forward's max relative difference to torch eager
(a different convolution kernel shows as a different rounding error).

Run: .venv/bin/python benchmarks/probes/resnet_xla_flags.py [rounds]
runs every setting of FLAGS (the default first and last, to show the drift
between two runs of the same setting), each in its own process, and writes
benchmarks/probes/results/resnet_xla_flags.md. With XLA_FLAGS set in the
environment and `--one`, it measures that one setting and prints it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import header, write_results  # noqa: E402

import bridge  # noqa: E402

FLAGS = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "",
]


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--one"]
    rounds = int(args[0]) if args else 3
    if "--one" not in sys.argv:
        lines = header("## Probe: ResNet-50 translated under XLA:CPU's kernel flags", False, os.getloadavg())
        lines += [
            f"- Method: see the docstring of benchmarks/probes/resnet_xla_flags.py; {rounds} rounds per "
            "setting after one warm-up, each setting in a fresh process, in this order.",
            "",
        ]
        for flags in FLAGS:
            env = dict(os.environ, XLA_FLAGS=flags)
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(rounds)], env=env, capture_output=True, text=True
            )
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else (
                f"XLA_FLAGS={flags!r}: failed: {out.stderr.strip().splitlines()[-1]}"
            )
            lines.append(f"- {line}")
            print(lines[-1], flush=True)
        write_results(Path(__file__).resolve().parent / "results", "resnet_xla_flags", "\n".join(lines) + "\n")
        return
    torch.manual_seed(0)
    model = tf.ResNetForImageClassification(tf.ResNetConfig(num_labels=1000)).eval()
    x = torch.randn(8, 3, 128, 128)
    xj = bridge.to_jax(x)
    apply, params = bridge.torch_to_jax(model)
    forward = jax.jit(apply).trace(params, pixel_values=xj).lower().compile()
    with torch.no_grad():
        ref = model(pixel_values=x).logits.numpy()
    err = np.abs(np.asarray(forward(params, pixel_values=xj).logits) - ref).max() / np.abs(ref).max()

    model.train()
    apply_s, params_s, state = bridge.torch_to_jax_with_state(model)
    labels = bridge.to_jax(torch.arange(8))
    tx = optax.sgd(1e-4)

    def loss(p, s):
        out, new_s = apply_s(p, s, pixel_values=xj, labels=labels)
        return out.loss, new_s

    def step(p, s, o):
        (value, new_s), grads = jax.value_and_grad(loss, has_aux=True)(p, s)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), new_s, o, value

    opt_state = tx.init(params_s)
    train = jax.jit(step).trace(params_s, state, opt_state).lower().compile()
    t_fwd, t_train = [], []
    for i in range(rounds + 1):  # round 0 warms up
        a = time.perf_counter()
        forward(params, pixel_values=xj).logits.block_until_ready()
        b = time.perf_counter()
        jax.block_until_ready(train(params_s, state, opt_state))
        c = time.perf_counter()
        if i:
            t_fwd.append(b - a)
            t_train.append(c - b)
    print(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: forward {statistics.median(t_fwd) * 1e3:.1f} ms, "
        f"training step {statistics.median(t_train) * 1e3:.1f} ms, forward vs torch {err:.1e}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
