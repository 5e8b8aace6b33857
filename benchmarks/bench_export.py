"""Exported models (`bridge.export`) against `jax.jit(apply)` from `bridge.torch_to_jax`.

For a GPT-2 (the 124M configuration) and a ResNet-50, both random-init
transformers models built as in bench_torch_to_jax.py, on the CPU in one
process: each model is exported in both formats (`format="source"` and
`format="stablehlo"`) to a temporary folder, each folder's `model.py` is loaded
with importlib (as docs/export.md shows), and the following are timed, the
contenders called in turn:

- forward: `jax.jit(apply)(params, **inputs)` on the translated model against
  the exported `model.apply(params, **inputs)` as a user calls it (its flat
  program is jitted inside model.py) and `jax.jit(model.apply)`, in both
  formats;
- one training step: `jax.jit` of `jax.value_and_grad(loss)` + `optax.sgd`,
  params, state and optimizer state donated, with the same loss (cross-entropy
  on the logits, computed in JAX) for all three.

Before timing, the forward logits of the three are compared (they should be
the same XLA program, so equal up to float rounding) and so are the first two
training losses (the second is taken after one update: it checks gradients).
The optimized HLO of each timed program is summarised (instruction count and
count per opcode) so that a difference in time can be traced to a difference
in program.

Run: .venv/bin/python benchmarks/bench_export.py
Writes: benchmarks/results/bench_export.md

- `BRIDGE_BENCH_QUICK=1`: tiny models and few repetitions (a smoke test).
- `BRIDGE_BENCH_RESULTS=DIR`: write the table into DIR instead; required
  with `BRIDGE_BENCH_QUICK=1`, so quick numbers never replace real ones.
"""

from __future__ import annotations

import collections
import functools
import gc
import importlib.util
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers as tf
from bench_torch_to_jax import MODELS, Model, rel_err, to_jax_tree
from common import fmt_ms, header, is_quick, median, results_dir, time_interleaved, write_results

import bridge

LR = 1e-4
FORMATS = ("source", "stablehlo")
TARGET_RATIO = 1.05  # exported / jax.jit(apply), medians
SAME_RTOL = 1e-6  # "the same XLA program": equal up to float rounding
BUG_RTOL = 1e-4  # beyond this the export computes something else: stop
STATIC = {"gpt2": {"use_cache": False}, "resnet": {}}  # non-array arguments, fixed at export


# --------------------------------------------------------------------------- helpers


def load_model_py(folder: Path, name: str) -> ModuleType:
    """An exported folder's model.py, loaded the way docs/export.md shows."""
    spec = importlib.util.spec_from_file_location(name, folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_both(module: torch.nn.Module, x: dict, static: dict, root: Path, tag: str) -> dict[str, tuple]:
    """Export `module` in both formats; per format: (loaded model.py, export seconds)."""
    out = {}
    for fmt in FORMATS:
        start = time.perf_counter()
        folder = bridge.export(module, path=root / f"{tag}-{fmt}", format=fmt, **x, **static)
        out[fmt] = (load_model_py(folder, f"exported_{tag}_{fmt}".replace("-", "_")), time.perf_counter() - start)
    return out


def copy_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def loss_of(key: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy on the logits: next-token for GPT-2, the class for ResNet."""
    if key == "gpt2":
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return ce.mean()


@dataclass
class Hlo:
    """An optimized HLO module: opcode counts, and its text with names and metadata removed."""

    ops: collections.Counter
    normalized: str

    @property
    def size(self) -> int:
        return sum(self.ops.values())


def hlo_summary(compiled: Any) -> Hlo:
    ops: collections.Counter = collections.Counter()
    lines = []
    in_tables = False  # the stack-frame tables (FileNames ... StackFrames) before the computations
    for line in compiled.as_text().splitlines():
        if line == "FileNames":
            in_tables = True
        elif line.startswith(("%", "ENTRY")):
            in_tables = False
        if in_tables:
            continue
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = [^=]*?\s([a-z][\w\-]*)\(", line)
        if m:
            ops[m.group(1)] += 1
        if line.startswith("HloModule"):
            continue
        line = re.sub(r",? metadata=\{[^}]*\}", "", line)
        # how a parameter was placed (a committed array's sharding annotations)
        line = re.sub(r"(parameter\(\d+\)).*", r"\1", line)
        lines.append(re.sub(r"%?[A-Za-z_][\w.\-]*\.\d+|%[\w.\-]+", "%_", line))
    return Hlo(ops, "\n".join(lines))


def hlo_diff(a: Hlo, b: Hlo) -> str:
    """How b's program differs from a's."""
    if a.normalized == b.normalized:
        return "the same HLO once names are removed"
    diffs = [f"{op} {a.ops[op]} -> {b.ops[op]}" for op in sorted(a.ops.keys() | b.ops.keys()) if a.ops[op] != b.ops[op]]
    if not diffs:
        return "same opcode counts, text differs"
    return ", ".join(diffs[:8]) + (f" (+{len(diffs) - 8} more)" if len(diffs) > 8 else "")


# --------------------------------------------------------------------------- forward


def bench_forward(key: str, m: Model, root: Path, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = m.build()  # eval mode
    x = m.inputs()
    xj = to_jax_tree(x)
    static = STATIC[key]
    apply, params = bridge.torch_to_jax(model)
    exports = export_both(model, x, static, root, f"{key}-eval")

    apply_nc, params_nc = bridge.torch_to_jax(model, checks=False)
    contenders: dict[str, tuple[Callable, dict]] = {
        "bridge": (jax.jit(functools.partial(apply, **static)), params),
        "bridge nochecks": (jax.jit(functools.partial(apply_nc, **static)), params_nc),
    }
    for fmt, (mod, _) in exports.items():
        eparams, _ = mod.load()
        contenders[f"{fmt} plain"] = (functools.partial(mod.apply, **static), eparams)
        contenders[f"{fmt} jit"] = (jax.jit(functools.partial(mod.apply, **static)), eparams)

    logits = {name: np.asarray(fn(p, **xj)["logits"]) for name, (fn, p) in contenders.items()}
    ref = logits["bridge"]
    errs = {name: rel_err(v, ref) for name, v in logits.items() if name != "bridge"}
    bad = {n: e for n, e in errs.items() if e > BUG_RTOL}
    assert not bad, f"{m.name}: exported forward differs from jax.jit(apply): {bad}"
    with torch.no_grad():
        torch_err = rel_err(ref, model(**x).logits.numpy())

    # The programs that run: the optimized HLO of each jitted form (compiled by the call above:
    # lowering again with the same arguments hits jax's cache).
    hlo = {
        name: hlo_summary(fn.lower(p, **xj).compile())
        for name, (fn, p) in contenders.items() if not name.endswith("plain")
    }

    def call(fn: Callable, p: dict) -> Callable[[], None]:
        return lambda: jax.block_until_ready(fn(p, **xj))

    times = time_interleaved({n: call(fn, p) for n, (fn, p) in contenders.items()}, reps, warmup)
    return {
        "times": times, "errs": errs, "torch_err": torch_err, "hlo": hlo,
        "exports": exports,
    }


# --------------------------------------------------------------------------- training step


def bench_train(key: str, m: Model, root: Path, reps: int, warmup: int, eval_exports: dict | None) -> dict:
    torch.manual_seed(0)
    model = m.build().train(m.train_mode)
    x = m.inputs()
    xj = to_jax_tree(x)
    labels = bridge.to_jax(m.labels(x)["labels"])
    static = STATIC[key]
    tx = optax.sgd(LR)

    # Each contender: forward(p, s, inputs) -> (logits, new_s), params, state.
    forms: dict[str, tuple[Callable, dict, dict]] = {}
    if m.train_mode:  # BatchNorm in train mode: the state (running statistics) is carried
        for name, checks in (("bridge", True), ("bridge nochecks", False)):
            apply, params, state = bridge.torch_to_jax_with_state(model, checks=checks)
            forms[name] = (lambda p, s, b, apply=apply: _logits_state(apply(p, s, **b, **static)), params, state)
        exports = export_both(model, x, static, root, f"{key}-train")
        for fmt, (mod, _) in exports.items():
            eparams, estate = mod.load()
            fn = functools.partial(mod.apply_with_state, **static)
            forms[fmt] = (lambda p, s, b, fn=fn: _logits_state(fn(p, s, **b)), eparams, estate)
    else:  # eval mode (GPT-2, dropout off): no state; the forward's exports serve
        for name, checks in (("bridge", True), ("bridge nochecks", False)):
            apply, params = bridge.torch_to_jax(model, checks=checks)
            forms[name] = (lambda p, s, b, apply=apply: (apply(p, **b, **static)["logits"], s), params, {})
        exports = eval_exports
        for fmt, (mod, _) in exports.items():
            fn = functools.partial(mod.apply, **static)
            forms[fmt] = (lambda p, s, b, fn=fn: (fn(p, **b)["logits"], s), mod.load()[0], {})

    def make_step(forward: Callable) -> Callable:
        def loss_fn(p, s, b, y):
            logits, new_s = forward(p, s, b)
            return loss_of(key, logits, y), new_s

        @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
        def step(p, s, o, b, y):
            (loss, new_s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, b, y)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), new_s, o, loss

        return step

    calls: dict[str, Callable[[], float]] = {}
    losses: dict[str, list[float]] = {}
    hlo: dict[str, Hlo] = {}
    for name, (forward, p, s) in forms.items():
        step = make_step(forward)
        # its own copy of the initial weights: the step donates them
        st = {"p": copy_tree(p), "s": copy_tree(s)}
        st["o"] = tx.init(st["p"])

        def run(step=step, st=st) -> float:
            p, s, o, loss = step(st["p"], st["s"], st["o"], xj, labels)
            st.update(p=p, s=s, o=o)
            return float(jax.block_until_ready(loss))

        losses[name] = [run(), run()]
        calls[name] = run
        # compiled by the calls above: lowering again with arguments alike hits jax's cache
        hlo[name] = hlo_summary(step.lower(st["p"], st["s"], st["o"], xj, labels).compile())

    ref = losses["bridge"]
    loss_errs = {
        name: [abs(a - b) / abs(b) for a, b in zip(v, ref, strict=True)]
        for name, v in losses.items() if name != "bridge"
    }
    # The first loss is the forward: it must agree. The second (after one update) shows whether
    # the gradients agree; it is reported, not asserted (see "Loss after one update").
    bad = {n: e for n, e in loss_errs.items() if e[0] > BUG_RTOL}
    assert not bad, f"{m.name}: exported training losses differ from jax.jit(apply)'s: {bad} ({losses})"
    times = time_interleaved(calls, reps, warmup)
    return {"times": times, "loss_errs": loss_errs, "losses": ref, "hlo": hlo, "exports": exports}


def _logits_state(out_state: tuple) -> tuple:
    out, new_s = out_state
    return out["logits"], new_s


# --------------------------------------------------------------------------- report


BRIDGE_NOCHECKS = "`jax.jit(apply)`, `torch_to_jax(..., checks=False)` as export converts"
FORWARD_FORMS = [
    ("bridge", "`jax.jit(apply)` (torch_to_jax)"),
    ("bridge nochecks", BRIDGE_NOCHECKS),
    ("source plain", "source: `model.apply`"),
    ("source jit", "source: `jax.jit(model.apply)`"),
    ("stablehlo plain", "stablehlo: `model.apply`"),
    ("stablehlo jit", "stablehlo: `jax.jit(model.apply)`"),
]
TRAIN_FORMS = [
    ("bridge", "`jax.jit(apply)` (torch_to_jax)"),
    ("bridge nochecks", BRIDGE_NOCHECKS),
    ("source", "source: exported `apply`"),
    ("stablehlo", "stablehlo: exported `apply`"),
]


def _ms(ns: list[int]) -> float:
    return median(ns) / 1e6


def render(results: list[tuple[Model, dict, dict]], quick: bool, reps: tuple, load: tuple) -> str:
    fwd_reps, train_reps = reps
    lines = [
        *header("## export: exported programs (`bridge.export`) vs `jax.jit(apply)`", quick, load,
                f", transformers {tf.__version__}, optax {optax.__version__}; XLA CPU backend"),
        "- Method: float32, random-init transformers models (bench_torch_to_jax.py's builders), "
        "each exported with `bridge.export` in both formats to a temporary folder whose "
        "`model.py` is loaded with importlib, all in one process. "
        f"{fwd_reps} forward and {train_reps} training-step rounds per model after 2 warm-up "
        "rounds, the contenders called in turn (order reversed every round); milliseconds per "
        "call as median [p10, p90], and the ratio of medians to `jax.jit(apply)`. "
        "Forward (eval mode): `jax.jit(apply)(params, **inputs)` on `bridge.torch_to_jax(model)`, "
        "against the exported `model.apply(params, **inputs)` as a user calls it (model.py "
        "flattens the inputs, checks shapes and calls its flat program, which it jits itself) "
        "and the same wrapped in `jax.jit`, with `params` from `model.load()`; each blocked "
        "until ready. GPT-2 is called with `use_cache=False` (fixed at export; partial'd into "
        "every form). Training step: `jax.jit` of `jax.value_and_grad(loss)` + "
        f"`optax.sgd({LR:g})`, params, state and optimizer state donated, the loss the same "
        "cross-entropy on the logits for all three (next token for GPT-2, the class for "
        "ResNet); the exported forms use `model.apply` (GPT-2, eval mode, dropout off) or "
        "`model.apply_with_state` of a train-mode export (ResNet: BatchNorm batch statistics, "
        "running statistics carried as state), against `torch_to_jax` / "
        "`torch_to_jax_with_state`.",
        "- Checked before timing: forward logits of each exported form against `jax.jit(apply)`'s "
        "(max |difference| / max |reference|; the run stops beyond "
        f"{BUG_RTOL:g}, the target is {SAME_RTOL:g}), and the first two training losses "
        f"(relative; the run stops if the first differs beyond {BUG_RTOL:g}; the second is "
        "taken after one update, so it compares gradients and update, and is reported).",
        "",
        "| model | work | form | ms | / `jax.jit(apply)` | max rel. difference |",
        "|---|---|---|---:|---:|---:|",
    ]
    targets, notes = [], []
    for m, fwd, train in results:
        base = _ms(fwd["times"]["bridge"])
        for key, label in FORWARD_FORMS:
            t = fwd["times"][key]
            err = "reference" if key == "bridge" else f"{fwd['errs'][key]:.1e}"
            ratio = _ms(t) / base
            lines.append(f"| {m.name} | forward | {label} | {fmt_ms(t)} | {ratio:.3f}x | {err} |")
            if key not in ("bridge", "bridge nochecks"):
                met = "met" if ratio <= TARGET_RATIO else "**not met**"
                targets.append(f"- {m.name}, forward, {label}: {ratio:.3f}x (target <= {TARGET_RATIO}x): {met}")
        base = _ms(train["times"]["bridge"])
        for key, label in TRAIN_FORMS:
            t = train["times"][key]
            err = "reference" if key == "bridge" else (
                f"loss 0: {train['loss_errs'][key][0]:.1e}, loss 1: {train['loss_errs'][key][1]:.1e}"
            )
            ratio = _ms(t) / base
            lines.append(f"| {m.name} | training step | {label} | {fmt_ms(t)} | {ratio:.3f}x | {err} |")
            if key not in ("bridge", "bridge nochecks"):
                met = "met" if ratio <= TARGET_RATIO else "**not met**"
                targets.append(
                    f"- {m.name}, training step, {label}: {ratio:.3f}x (target <= {TARGET_RATIO}x): {met}"
                )
        worst = max(fwd["errs"].values())
        targets.append(
            f"- {m.name}, same forward outputs: max relative difference {worst:.1e} "
            f"(target <= {SAME_RTOL:g}): {'met' if worst <= SAME_RTOL else '**not met**'}"
        )
        worst0 = max(e[0] for e in train["loss_errs"].values())
        targets.append(
            f"- {m.name}, same first training loss: max relative difference {worst0:.1e} "
            f"(target <= {SAME_RTOL:g}): {'met' if worst0 <= SAME_RTOL else '**not met**'}"
        )
        targets.append(
            f"- {m.name}, loss after one update (compares the gradients; no target): relative "
            "difference to `jax.jit(apply)`'s "
            + ", ".join(f"{k} {e[1]:.1e}" for k, e in train["loss_errs"].items())
            + f" (losses {train['losses'][0]:.7g} then {train['losses'][1]:.7g})"
        )
        for work, data, forms in (("forward", fwd, ("source jit", "stablehlo jit")),
                                  ("training step", train, ("source", "stablehlo"))):
            h = data["hlo"]
            notes.append(
                f"- {m.name}, {work}: `jax.jit(apply)` {h['bridge'].size:,} instructions; with "
                f"`checks=False` {h['bridge nochecks'].size:,} ({hlo_diff(h['bridge'], h['bridge nochecks'])}); "
                + "; ".join(f"{k.split()[0]} {h[k].size:,} (against `checks=False`: "
                            f"{hlo_diff(h['bridge nochecks'], h[k])})" for k in forms)
                + "."
            )
        notes.append(f"- {m.name}: `jax.jit(apply)`'s forward against torch eager: {fwd['torch_err']:.1e}.")
    lines += [
        "",
        "Programs: the optimized HLO of each jitted form (`.lower(...).compile().as_text()`), its "
        "instruction count, and how it differs from another: the same text once instruction "
        "names and metadata are removed, or the opcodes whose counts differ:",
        "",
        *notes,
        "",
        "Export time, seconds (`bridge.export` to a folder, one call each; ResNet's training "
        "step uses a second, train-mode export; GPT-2's reuses the forward's): "
        + "; ".join(
            f"{m.name}: " + ", ".join(
                f"{mode} {fmt} {s:.1f}"
                for mode, ex in (("eval", fwd["exports"]), ("train", train["exports"]))
                if mode == "eval" or ex is not fwd["exports"]
                for fmt, (_, s) in ex.items()
            )
            for m, fwd, train in results
        )
        + ".",
        "",
        "Targets (exported / `jax.jit(apply)`, medians):",
        "",
        *targets,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    quick = is_quick()
    out_dir = results_dir(quick)
    load = os.getloadavg()
    reps = (3, 2) if quick else (20, 8)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        root = Path(tmp)
        for key, make in MODELS.items():
            m = make(quick)
            print(f"== {m.name}: forward", flush=True)
            fwd = bench_forward(key, m, root, reps[0], 2)
            print(f"== {m.name}: training step", flush=True)
            train = bench_train(key, m, root, reps[1], 2, fwd["exports"])
            results.append((m, fwd, train))
            gc.collect()
    text = render(results, quick, reps, load)
    write_results(out_dir, "bench_export", text)


if __name__ == "__main__":
    main()
