"""Probe: where the forward of a `jax_to_torch` training step spends its time.

bench_jax_to_torch's MLP case (256-512-512-10, batch 64, scalar loss): the
module's forward runs one jitted JAX program that computes the loss and the
gradients together, and the backward hands the gradients over. This probe
times, per step, the parts of that forward by wrapping the functions of
adapters/jax_autograd.py it calls (module attributes, looked up per call):

- inputs: `jax_boundary.jax_input` for every tensor (params and x);
- JAX call: from the last input to the outputs' conversion, i.e. the jitted
  program's dispatch (and whatever of its compute runs before the wait);
- wait: `jax.block_until_ready` on its outputs (the rest of the compute);
- outputs: `jax_boundary.torch_outputs` on the now-ready arrays (the
  forward's call only; the backward's hand-over of the gradients is not
  part of the forward);
- around: the forward's time outside `_forward` (torch.autograd.Function,
  the module's and the call's Python).

Pure JAX (`jax.jit(jax.value_and_grad(loss))` with x as NumPy, as the module
passes it) is timed in turn. Medians in microseconds; the parts are medians
of their own, so they need not add up exactly.

Run: .venv/bin/python benchmarks/probes/jax_to_torch_forward.py [steps]
Writes benchmarks/probes/results/jax_to_torch_forward.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_jax_to_torch import TORCH_THREADS, mean_square, mlp_case  # noqa: E402
from bridge.adapters import jax_autograd  # noqa: E402
from bridge.adapters import jax_boundary as boundary  # noqa: E402
from common import header, time_interleaved, write_results  # noqa: E402

import bridge  # noqa: E402

PARTS = ("inputs", "JAX call", "wait", "outputs", "around")


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    torch.set_num_threads(TORCH_THREADS)
    load = os.getloadavg()
    name, model, params, x_np = mlp_case(False)
    loss = mean_square(model)
    module = bridge.jax_to_torch(loss, params)
    params_j = module.jax_params()
    x_t = torch.from_numpy(x_np)
    value_and_grad = jax.jit(jax.value_and_grad(loss))

    acc = dict.fromkeys(PARTS, 0)
    marks: dict[str, int] = {}
    jax_input, torch_outputs, forward = boundary.jax_input, boundary.torch_outputs, jax_autograd._forward

    def timed_input(*a, **k):
        t = time.perf_counter_ns()
        out = jax_input(*a, **k)
        marks["last_input"] = time.perf_counter_ns()
        acc["inputs"] += marks["last_input"] - t
        return out

    def timed_outputs(arrays):
        if not marks.get("in_forward"):
            return torch_outputs(arrays)  # the backward hands the gradients over: not timed here
        t0 = time.perf_counter_ns()
        acc["JAX call"] += t0 - marks["last_input"]
        jax.block_until_ready(arrays)
        t1 = time.perf_counter_ns()
        out = torch_outputs(arrays)
        acc["wait"] += t1 - t0
        acc["outputs"] += time.perf_counter_ns() - t1
        return out

    def timed_forward(*a, **k):
        marks["in_forward"] = True
        t = time.perf_counter_ns()
        try:
            return forward(*a, **k)
        finally:
            marks["forward"] = time.perf_counter_ns() - t
            marks["in_forward"] = False

    parts: dict[str, list[int]] = {p: [] for p in PARTS}
    totals: list[int] = []

    def step() -> None:
        for p in PARTS:
            acc[p] = 0
        module.zero_grad(set_to_none=True)
        t = time.perf_counter_ns()
        out = module(x_t)
        total = time.perf_counter_ns() - t
        out.backward()
        acc["around"] = total - marks["forward"]
        totals.append(total)
        for p in PARTS:
            parts[p].append(acc[p])

    boundary.jax_input, boundary.torch_outputs, jax_autograd._forward = timed_input, timed_outputs, timed_forward
    try:
        warmup = 100
        times = time_interleaved(
            {"step": step, "jax": lambda: jax.block_until_ready(value_and_grad(params_j, x_np))}, steps, warmup
        )
    finally:
        boundary.jax_input, boundary.torch_outputs, jax_autograd._forward = jax_input, torch_outputs, forward

    def us(ns: list[int]) -> float:
        return float(np.median(ns[warmup:])) / 1e3

    pure = float(np.median(times["jax"])) / 1e3
    lines = header("## Probe: the forward of a `jax_to_torch` training step, in parts", False, load)
    lines += [
        f"- Method: see the docstring of benchmarks/probes/jax_to_torch_forward.py; {name}; {steps} steps "
        f"after {warmup} warm-up ones, in turn with pure JAX; microseconds, medians.",
        "",
        "| part | us |",
        "|---|---:|",
        *(f"| {p} | {us(parts[p]):,.1f} |" for p in PARTS),
        f"| **forward** | {us(totals):,.1f} |",
        f"| pure JAX `value_and_grad`, x as NumPy | {pure:,.1f} |",
        "",
    ]
    write_results(Path(__file__).resolve().parent / "results", "jax_to_torch_forward", "\n".join(lines))


if __name__ == "__main__":
    main()
