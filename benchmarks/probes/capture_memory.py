"""Probe: what the peak-RSS growth of capturing a model is made of.

bench_torch_to_jax measures the growth of the peak RSS through capture and
trace (about 19 MiB for GPT-2 124M and for ResNet-50 alike, after a tiny
model of the same family has paid the one-time costs). This probe repeats
that conversion (same warm-up, same models) under `tracemalloc`, which
counts the Python heap only: the peak of Python allocations during
capture + trace, and what is still held after it (the captured program and
JAX's trace), grouped by the package whose code allocated it (the innermost
frame of a known package). It also counts the captured graph's nodes.

Run: .venv/bin/python benchmarks/probes/capture_memory.py [resnet] [gpt2]
(each model in its own process)
Writes benchmarks/probes/results/capture_memory.md.
"""

from __future__ import annotations

import collections
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_torch_to_jax import MODELS, to_jax_tree  # noqa: E402
from common import header, write_results  # noqa: E402

import bridge  # noqa: E402
from bridge import capture as capture_lib  # noqa: E402

_PACKAGES = ("torch/_subclasses", "torch/fx", "torch/export", "torch/_export", "torch/_functorch",
             "torch/utils", "torch", "jax", "jaxlib", "bridge", "adapters", "transformers", "sympy")


def package(filename: str) -> str:
    path = filename.replace("\\", "/")
    for p in _PACKAGES:
        if f"/{p}/" in path:
            return p
    return "other (" + Path(path).name + ")"


def measure(key: str) -> list[str]:
    tiny = MODELS[key](True)
    tiny_apply, tiny_params = bridge.torch_to_jax(tiny.build())
    jax.jit(tiny_apply).trace(tiny_params, **to_jax_tree(tiny.inputs())).lower().compile()
    del tiny, tiny_apply, tiny_params
    m = MODELS[key](False)
    model = m.build()
    xj = to_jax_tree(m.inputs())
    captured = []
    real = capture_lib.capture

    def spy(*a, **k):
        captured.append(real(*a, **k))
        return captured[-1]

    capture_lib.capture = spy
    gc.collect()
    tracemalloc.start(25)
    apply, params = bridge.torch_to_jax(model)
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    traced = jax.jit(apply).trace(params, **xj)
    now, peak = tracemalloc.get_traced_memory()
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    capture_lib.capture = real
    del traced
    by_pkg: collections.Counter = collections.Counter()
    for stat in snap.statistics("traceback"):
        frames = [f.filename for f in stat.traceback]
        # the innermost frame of a known package: who asked for the memory
        owner = next((package(f) for f in frames if not package(f).startswith("other")), package(frames[0]))
        by_pkg[owner] += stat.size
    nodes = sum(1 for c in captured for _ in c.program.graph.nodes)
    mib = 2**20
    return [
        f"- {m.name}: Python-heap peak during capture + trace {(peak - base) / mib:.1f} MiB above the "
        f"heap before it; {(now - base) / mib:.1f} MiB still held after it (the captured program and "
        f"the trace); {nodes:,} graph nodes. Held after, by the package that allocated it: "
        + ", ".join(f"{k} {v / mib:.1f}" for k, v in by_pkg.most_common(6))
    ]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # one model, in the fresh process the bench measures it in
        print("\n".join(measure(sys.argv[2])))
        return
    lines = header("## Probe: what capture's peak memory is made of", False, os.getloadavg())
    lines += ["- Method: see the docstring of benchmarks/probes/capture_memory.py; MiB = 2^20 bytes.", ""]
    for key in sys.argv[1:] or ["resnet", "gpt2"]:
        child = subprocess.run([sys.executable, __file__, "--child", key], capture_output=True, text=True, check=True)
        lines += [line for line in child.stdout.splitlines() if line.startswith("- ")]
    write_results(Path(__file__).resolve().parent / "results", "capture_memory", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
