"""Probe: where ResNet-50's training step spends its time, torch eager against the translation.

The same model and batch as bench_torch_to_jax (transformers' ResNet-50,
random init, batch 8 x 3x128x128, train mode, cross-entropy loss, SGD).
torch eager is profiled with `torch.profiler` (each ATen op's self CPU time,
so nested ops are not counted twice); the translated, jitted step
(`jax.value_and_grad` + `optax.sgd`, as the bench runs it) with
`jax.profiler`, whose trace holds one event per XLA:CPU thunk, named after
its HLO instruction. Each thunk is put in the category of the heaviest op
the compiled HLO shows inside it (a fusion's called computation included).
XLA may run independent thunks on its two threads at once, so its per-
category sums can add up to more than the step's wall time; the table says
how much they add up to.

Run: .venv/bin/python benchmarks/probes/resnet_profile.py [steps]
Writes benchmarks/probes/results/resnet_profile.md. PROFILE_THUNKS=N also
prints the N longest thunks with the HLO ops inside each.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import torch
import transformers as tf
from jax.profiler import ProfileData

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import header, write_results  # noqa: E402

import bridge  # noqa: E402

CATEGORIES = [
    "convolution", "matmul", "batch norm", "max pool", "data movement", "elementwise arithmetic", "other",
]
# Opcodes that only move or relabel data (a thunk of nothing else is a copy or transpose).
_MOVES = {
    "copy", "transpose", "bitcast", "parameter", "tuple", "get-tuple-element", "reshape", "broadcast",
    "slice", "concatenate", "pad", "constant", "dynamic-slice", "dynamic-update-slice", "fusion",
}

# torch: ATen op name (self time) -> category.
_TORCH = [
    ("convolution", ("conv", "mkldnn")),
    ("batch norm", ("batch_norm",)),
    ("max pool", ("max_pool",)),
    ("matmul", ("addmm", "::mm", "bmm", "linear")),
    (
        "data movement",
        ("copy", "clone", "fill", "zero", "empty", "view", "reshape", "expand", "::to", "_to_copy",
         "contiguous", "detach", "as_strided", "::t", "transpose", "select", "slice", "resize", "ones",
         "squeeze", "unsqueeze", "flatten", "permute", "result_type", "item", "local_scalar"),
    ),
    (
        "elementwise arithmetic",
        ("relu", "clamp", "threshold", "add", "mul", "sum", "mean", "div", "foreach", "sub", "exp", "log", "neg",
         "nll", "softmax"),
    ),
]

# HLO opcode seen in a thunk -> category, in order of precedence (the heaviest op wins).
_HLO = [
    ("convolution", ("convolution",)),
    ("max pool", ("select-and-scatter", "reduce-window")),
    ("matmul", ("dot",)),
    ("batch norm", ("reduce",)),  # XLA's reductions here are BatchNorm's batch statistics and their gradients
]


def torch_category(name: str) -> str:
    low = name.lower()
    for cat, keys in _TORCH:
        if any(k in low for k in keys):
            return cat
    return "other"


def hlo_opcodes(hlo: str) -> dict[str, set[str]]:
    """Instruction name -> the opcodes it runs (its own, and those of the computations it calls)."""
    computations: dict[str, list[tuple[str, str, list[str]]]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            computations[current] = []
            continue
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(", line)
        if m and current is not None:
            called = re.findall(r"(?:calls|to_apply|select|scatter)=%?([\w.\-]+)", line)
            computations[current].append((m.group(1), m.group(2), called))

    def ops_of(comp: str, seen: set[str]) -> set[str]:
        if comp in seen or comp not in computations:
            return set()
        seen.add(comp)
        found: set[str] = set()
        for _, opcode, called in computations[comp]:
            found.add(opcode)
            for c in called:
                found |= ops_of(c, seen)
        return found

    out: dict[str, set[str]] = {}
    for instrs in computations.values():
        for name, opcode, called in instrs:
            ops = {opcode}
            for c in called:
                ops |= ops_of(c, set())
            out[name] = ops
    return out


def hlo_category(ops: set[str]) -> str:
    for cat, keys in _HLO:
        if any(k in ops for k in keys):
            return cat
    return "data movement" if ops <= _MOVES else "elementwise arithmetic"


def build():
    torch.manual_seed(0)
    model = tf.ResNetForImageClassification(tf.ResNetConfig(num_labels=1000)).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 128, 128, generator=g)
    y = torch.arange(8)
    return model, x, y


def profile_torch(steps: int) -> tuple[dict[str, float], float, collections.Counter]:
    model, x, y = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(pixel_values=x, labels=y).loss.backward()
        opt.step()

    for _ in range(2):
        step()
    walls = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    per_cat: dict[str, float] = collections.defaultdict(float)
    others: collections.Counter = collections.Counter()
    for ev in prof.key_averages():
        cat = torch_category(ev.key)
        ms = ev.self_cpu_time_total / 1e3 / steps
        per_cat[cat] += ms
        if cat == "other":
            others[ev.key] += ms
    return dict(per_cat), statistics.median(walls) * 1e3, others


def profile_jax(steps: int) -> tuple[dict[str, float], float, collections.Counter]:
    model, x, y = build()
    apply, params, state = bridge.torch_to_jax_with_state(model)
    xj, yj = bridge.to_jax(x), bridge.to_jax(y)
    tx = optax.sgd(1e-4)

    def train_step(p, s, o):
        def loss(p, s):
            out, new_s = apply(p, s, pixel_values=xj, labels=yj)
            return out.loss, new_s

        (value, new_s), grads = jax.value_and_grad(loss, has_aux=True)(p, s)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), new_s, o, value

    params = jax.tree.map(jnp.copy, params)
    opt = tx.init(params)
    compiled = jax.jit(train_step, donate_argnums=(0, 1, 2)).trace(params, state, opt).lower().compile()
    kinds = hlo_opcodes(compiled.as_text())
    live = [params, state, opt]

    def step():
        p, s, o, value = compiled(*live)
        live[:] = [p, s, o]
        jax.block_until_ready(value)

    for _ in range(2):
        step()
    walls = []
    out = tempfile.mkdtemp()
    with jax.profiler.trace(out):
        for _ in range(steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    data = ProfileData.from_file(glob.glob(f"{out}/**/*.xplane.pb", recursive=True)[0])
    per_cat: dict[str, float] = collections.defaultdict(float)
    unknown: collections.Counter = collections.Counter()
    top: collections.Counter = collections.Counter()
    patterns: collections.Counter = collections.Counter()  # elementwise thunks by the arithmetic they do
    counts: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                name = ev.name
                if name.startswith("end: ") or "::" in name:
                    continue  # ThunkExecutor::Execute and thread-pool events enclose the thunks
                ms = ev.duration_ns / 1e6 / steps
                if name in kinds:
                    cat = hlo_category(kinds[name])
                    per_cat[cat] += ms
                    top[f"{name} ({cat}: {', '.join(sorted(kinds[name] - {'parameter'}))})"] += ms
                    if cat == "elementwise arithmetic":
                        key = ", ".join(sorted(kinds[name] - _MOVES)) + (
                            " + transpose" if "transpose" in kinds[name] else ""
                        )
                        patterns[key] += ms
                        counts[key] += 1
                else:
                    per_cat["other"] += ms
                    unknown[name] += ms
    if os.environ.get("PROFILE_THUNKS"):
        print("largest thunks:", *(f"{v:8.1f} ms  {k}" for k, v in top.most_common(int(os.environ["PROFILE_THUNKS"]))), sep="\n")
    elementwise = [(k, v, counts[k] // steps) for k, v in patterns.most_common(6)]
    return dict(per_cat), statistics.median(walls) * 1e3, unknown, elementwise


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    load = os.getloadavg()
    t_cat, t_wall, t_other = profile_torch(steps)
    j_cat, j_wall, j_other, elementwise = profile_jax(steps)
    lines = header(
        "## Probe: ResNet-50 training step, time per kind of op, torch eager against the translation",
        False,
        load,
        f", transformers {tf.__version__}",
    )
    lines += [
        f"- Method: see the docstring of benchmarks/probes/resnet_profile.py; {steps} profiled steps "
        "each after 2 warm-up steps; milliseconds per step. torch: `torch.profiler` self CPU time per "
        "ATen op; translation: `jax.profiler` duration per XLA:CPU thunk, by the heaviest HLO op inside it "
        "(convolution > select-and-scatter / reduce-window > dot > reduce > the rest).",
        "",
        "| kind of op | torch eager ms | translated (XLA:CPU) ms | translated - torch ms |",
        "|---|---:|---:|---:|",
    ]
    for cat in CATEGORIES:
        a, b = t_cat.get(cat, 0.0), j_cat.get(cat, 0.0)
        lines.append(f"| {cat} | {a:,.1f} | {b:,.1f} | {b - a:+,.1f} |")
    ta, tb = sum(t_cat.values()), sum(j_cat.values())
    lines.append(f"| **sum of ops** | {ta:,.1f} | {tb:,.1f} | {tb - ta:+,.1f} |")
    lines.append(f"| **step wall time (median)** | {t_wall:,.1f} | {j_wall:,.1f} | {j_wall - t_wall:+,.1f} |")
    lines += [
        "",
        "- torch's largest 'other' ops: "
        + (", ".join(f"`{k}` {v:.1f}" for k, v in t_other.most_common(5)) or "none"),
        "- translation thunks not found in the compiled HLO: "
        + (", ".join(f"`{k}` {v:.1f}" for k, v in j_other.most_common(5)) or "none"),
        "- the translation's largest kinds of elementwise-arithmetic thunk (the arithmetic HLO ops "
        "inside, '+ transpose' where the fusion also transposes): "
        + "; ".join(f"{k or 'none'}: {n} thunks, {v:.1f} ms" for k, v, n in elementwise),
        "",
    ]
    write_results(Path(__file__).resolve().parent / "results", "resnet_profile", "\n".join(lines))


if __name__ == "__main__":
    main()
