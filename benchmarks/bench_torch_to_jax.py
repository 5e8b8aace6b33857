"""Translated models (`bridge.torch_to_jax`) against torch eager and torch.compile.

For a GPT-2 (the 124M configuration) and a ResNet-50, both random-init
transformers models, on the CPU in one process:

- forward: torch eager and `torch.compile` under `torch.no_grad()`, against
  `jax.jit(apply)(params, ...)` on the translated model;
- one training step (forward, backward, SGD update): torch eager and
  `torch.compile`d modules with `torch.optim.SGD`, against
  `jax.jit` of `jax.value_and_grad` + `optax.sgd` on the translated model
  (parameters and optimizer state donated, as a training loop would);
- conversion cost: `torch_to_jax` itself, capture + trace to a jaxpr, lowering,
  XLA compilation, against torch.compile's first call;
- peak memory of conversion, each model in a fresh process: peak RSS growth
  (Linux `VmHWM`, reset between stages) against the size of the weights;
- native anchors: the same models written by hand in JAX
  (benchmarks/native_models.py: ResNet in NHWC with `lax.conv_general_dilated`,
  GPT-2 in plain jax.numpy), loading the torch model's weights, timed in the
  same interleaved rounds: a translated model is one XLA program, so the
  hand-written one is the limit it is measured against;
- dispatch overhead: `jax.jit(apply)` of a 3-layer, 64-wide torch MLP at batch
  8 against a hand-written `jax.jit` JAX MLP taking the same params dict
  (same math), calls alternating.

Before timing, the translated and native forwards are checked against torch
eager and the first two training losses of every JAX step against torch
eager's (the second one shows that the gradients and the update agree).

Run: .venv/bin/python benchmarks/bench_torch_to_jax.py
Writes: benchmarks/results/bench_torch_to_jax.md

- `BRIDGE_BENCH_QUICK=1`: tiny models and few repetitions (a smoke test).
- `BRIDGE_BENCH_RESULTS=DIR`: write the table into DIR instead; required
  with `BRIDGE_BENCH_QUICK=1`, so quick numbers never replace real ones.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import os
import subprocess
import sys
import time
import unittest.mock
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import native_models as native
import numpy as np
import optax
import torch
import transformers as tf
from common import (
    fmt_ms,
    fmt_us,
    header,
    is_quick,
    median,
    results_dir,
    time_interleaved,
    write_results,
)

import bridge
from bridge import capture, layout

LR = 1e-4
FORWARD_RTOL = 1e-4  # whole-model fp32 tolerance against torch eager
LOSS_RTOL = 1e-4
# Loss 1 comes after one SGD update, so float32 rounding of every gradient adds
# in, scaled by the gradients' size: random-init ResNet-50's first update moves
# its loss by 0.2 at lr 1e-4, and bench_export measured 5.9e-4 between two
# compilations of the same program. The gradients themselves are checked
# exactly in float64 by the tests (tests/test_layout.py, test_nn_layers.py).
LOSS1_RTOL = 1e-3


# --------------------------------------------------------------------------- models


@dataclass
class Model:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]  # forward inputs
    labels: Callable[[dict], dict[str, torch.Tensor]]  # inputs + labels for the loss
    train_mode: bool  # BatchNorm in train mode: the step carries state
    native: Callable[[torch.nn.Module], Native]  # the hand-written JAX model on its weights
    results: dict = field(default_factory=dict)


@dataclass
class Native:
    """A hand-written JAX model (native_models.py) on a torch model's weights."""

    params: dict
    state: dict
    inputs: Callable[[dict], tuple]  # torch inputs (+ labels) -> the JAX arguments
    forward: Callable  # (params, state, *inputs) -> logits (eval mode)
    loss: Callable  # (params, state, *inputs, labels) -> (loss, new state)


def gpt2(quick: bool) -> Model:
    if quick:
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=96)
        batch, seq = 2, 16
    else:  # the 124M configuration (GPT2Config's defaults)
        cfg = tf.GPT2Config()
        batch, seq = 1, 128
    # Dropout off (eval mode) on both sides: its random draws are not the work
    # being compared, and a translated dropout needs an rng= key.
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0

    def inputs() -> dict:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)}

    def hand_written(model: torch.nn.Module) -> Native:
        params, state = native.gpt2_weights(model)
        return Native(
            params,
            state,
            lambda x: (bridge.to_jax(x["input_ids"]),),
            lambda p, s, ids: native.gpt2_apply(cfg, p, ids),
            lambda p, s, ids: (native.gpt2_loss(cfg, p, ids), s),
        )

    name = f"GPT-2 {'tiny' if quick else '124M'}, batch {batch} x {seq} tokens"
    return Model(
        name,
        lambda: tf.GPT2LMHeadModel(cfg).eval(),
        inputs,
        lambda x: {**x, "labels": x["input_ids"]},
        train_mode=False,
        native=hand_written,
    )


def resnet(quick: bool) -> Model:
    if quick:
        cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10)
        batch, size = 2, 32
    else:  # ResNet-50 (ResNetConfig's defaults), 1000 classes
        cfg = tf.ResNetConfig(num_labels=1000)
        batch, size = 8, 128

    def inputs() -> dict:
        g = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}

    def labels(x: dict) -> dict:
        return {**x, "labels": torch.arange(batch) % cfg.num_labels}

    def hand_written(model: torch.nn.Module) -> Native:
        params, state = native.resnet_weights(model)

        def loss(p, s, x, y):
            logits, new_s = native.resnet_apply(cfg, p, s, x, train=True)
            return native.cross_entropy(logits, y), new_s

        return Native(
            params,
            state,
            # NHWC, as a JAX input pipeline would hand it over (not timed)
            lambda b: (jnp.asarray(b["pixel_values"].numpy().transpose(0, 2, 3, 1)),)
            + ((bridge.to_jax(b["labels"]),) if "labels" in b else ()),
            lambda p, s, x: native.resnet_apply(cfg, p, s, x, train=False)[0],
            loss,
        )

    name = f"ResNet-{'tiny' if quick else '50'}, batch {batch} x 3x{size}x{size}"
    # Training runs in train() mode: BatchNorm uses batch statistics and the
    # translated step returns the running statistics as new state.
    return Model(
        name, lambda: tf.ResNetForImageClassification(cfg).eval(), inputs, labels, train_mode=True, native=hand_written
    )


MODELS = {"gpt2": gpt2, "resnet": resnet}


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    fn()
    return float(time.perf_counter_ns() - start)


def to_jax_tree(x: dict) -> dict:
    return {k: bridge.to_jax(v) for k, v in x.items()}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def layout_pass_off():
    """The layout pass turned off on this backend (bridge/layout.py): torch's
    layout end to end, the translation before the pass existed."""
    return unittest.mock.patch.dict(layout.CHANNELS_LAST, {jax.default_backend(): False})


# --------------------------------------------------------------------------- forward


def bench_forward(m: Model, reps: int, warmup: int) -> None:
    torch.manual_seed(0)
    model = m.build()
    x = m.inputs()
    xj = to_jax_tree(x)

    start = time.perf_counter_ns()
    apply, params = bridge.torch_to_jax(model)
    t_convert = time.perf_counter_ns() - start
    jitted = jax.jit(apply)
    # Captures counted by wrapping the function the adapter calls (capture_lib.capture).
    with unittest.mock.patch.object(capture, "capture", wraps=capture.capture) as counted:
        start = time.perf_counter_ns()
        traced = jitted.trace(params, **xj)
        t_trace = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        lowered = traced.lower()
        t_lower = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        lowered.compile()
        t_compile = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        out = jax.block_until_ready(jitted(params, **xj))
        t_first = time.perf_counter_ns() - start
    captures = counted.call_count

    with torch.no_grad():
        ref = model(**x).logits.numpy()
    err = rel_err(np.asarray(out.logits), ref)
    assert err <= FORWARD_RTOL, f"{m.name}: translated forward differs from torch eager: {err:.2e}"

    with layout_pass_off():
        apply_off, _ = bridge.torch_to_jax(model)
        nchw = jax.jit(apply_off).trace(params, **xj).lower().compile()
    err_off = rel_err(np.asarray(nchw(params, **xj).logits), ref)
    assert err_off <= FORWARD_RTOL, f"{m.name}: forward without the layout pass differs from torch eager: {err_off:.2e}"

    nat = m.native(model)
    nat_x = nat.inputs(x)
    nat_fwd = jax.jit(nat.forward)
    nat_err = rel_err(np.asarray(nat_fwd(nat.params, nat.state, *nat_x)), ref)
    assert nat_err <= FORWARD_RTOL, f"{m.name}: the hand-written JAX model differs from torch eager: {nat_err:.2e}"

    compiled = torch.compile(model)
    with torch.no_grad():
        t_eager_first = timed(lambda: model(**x))
        t_tc_first = timed(lambda: compiled(**x))

    def eager() -> None:
        with torch.no_grad():
            model(**x)

    def tcompile() -> None:
        with torch.no_grad():
            compiled(**x)

    def bridged() -> None:
        jax.block_until_ready(jitted(params, **xj))

    def bridged_off() -> None:
        jax.block_until_ready(nchw(params, **xj))

    def hand_written() -> None:
        jax.block_until_ready(nat_fwd(nat.params, nat.state, *nat_x))

    times = time_interleaved(
        {"eager": eager, "compile": tcompile, "native": hand_written, "bridge": bridged, "bridge_off": bridged_off},
        reps,
        warmup,
    )
    m.results["forward"] = times
    m.results["forward_err"] = {"bridge": err, "bridge_off": err_off, "native": nat_err}
    m.results["weights_mb"] = sum(p.nbytes for p in params.values()) / 2**20
    m.results["convert"] = {
        "torch_to_jax": t_convert,
        "trace": t_trace,
        "lower": t_lower,
        "compile": t_compile,
        "first_call": t_first,
        "captures": captures,
        "torch_compile_first": t_tc_first,
        "eager_first": t_eager_first,
    }
    torch._dynamo.reset()


# --------------------------------------------------------------------------- training step


def jax_step(loss_fn: Callable, params: dict, state: dict, args: tuple, tx) -> Callable[[], float]:
    """One jitted SGD step of `loss_fn(params, state, *args) -> (loss, new state)` on its
    own copy of the weights (the step donates them), compiled now; calling it steps."""

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(p, s, opt_state, *a):
        (loss, new_s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, *a)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), new_s, opt_state, loss

    params = jax.tree.map(jnp.copy, params)
    live = {"p": params, "s": jax.tree.map(jnp.copy, state), "o": tx.init(params)}
    compiled = step.trace(live["p"], live["s"], live["o"], *args).lower().compile()

    def run() -> float:
        p, s, o, loss = compiled(live["p"], live["s"], live["o"], *args)
        live.update(p=p, s=s, o=o)
        return float(jax.block_until_ready(loss))

    return run


def bench_train(m: Model, reps: int, warmup: int) -> None:
    torch.manual_seed(0)
    model = m.build().train(m.train_mode)
    batch = m.labels(m.inputs())
    bj = to_jax_tree(batch)
    tx = optax.sgd(LR)

    def translate():
        if m.train_mode:
            apply, params, state = bridge.torch_to_jax_with_state(model)
        else:
            (apply, params), state = bridge.torch_to_jax(model), {}

        def loss_fn(p, s, b):
            out, new_s = apply(p, s, **b) if m.train_mode else (apply(p, **b), s)
            return out.loss, new_s

        return loss_fn, params, state

    start = time.perf_counter_ns()
    bridged = jax_step(*translate(), (bj,), tx)  # includes capture + compile of the step
    j_losses = {"bridge": [bridged()]}
    t_first = time.perf_counter_ns() - start
    with layout_pass_off():
        bridged_off = jax_step(*translate(), (bj,), tx)
    j_losses["bridge_off"] = [bridged_off()]
    nat = m.native(model)
    hand_written = jax_step(nat.loss, nat.params, nat.state, nat.inputs(batch), tx)
    j_losses["native"] = [hand_written()]
    for key, fn in [("bridge", bridged), ("bridge_off", bridged_off), ("native", hand_written)]:
        j_losses[key].append(fn())

    # torch: eager and torch.compile, each on its own copy of the initial weights.
    compiled_model = torch.compile(copy.deepcopy(model))
    contenders = {}
    t_losses = {}
    firsts = {}
    for key, mod, net in [("eager", model, model), ("compile", compiled_model, compiled_model._orig_mod)]:
        opt = torch.optim.SGD(net.parameters(), lr=LR)

        def torch_step(mod=mod, opt=opt) -> float:
            opt.zero_grad(set_to_none=True)
            loss = mod(**batch).loss
            loss.backward()
            opt.step()
            return loss.item()

        start = time.perf_counter_ns()
        t_losses[key] = [torch_step()]
        firsts[key] = time.perf_counter_ns() - start
        t_losses[key].append(torch_step())
        contenders[key] = torch_step
    contenders.update(native=hand_written, bridge=bridged, bridge_off=bridged_off)

    # Against torch eager, the reference (torch.compile's own losses may
    # differ from eager's by more than the tolerance).
    for key, losses in j_losses.items():
        for i, (a, b) in enumerate(zip(losses, t_losses["eager"], strict=True)):
            tol = LOSS_RTOL if i == 0 else LOSS1_RTOL
            assert abs(a - b) <= tol * abs(b), f"{m.name}: {key} training loss {i} differs from torch eager: {a} vs {b}"
    m.results["losses"] = {"eager": t_losses["eager"], **j_losses}
    times = time_interleaved(contenders, reps, warmup)
    m.results["train"] = times
    m.results["train_first"] = {"bridge": t_first, **firsts}
    torch._dynamo.reset()


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), in KiB."""
    for line in open("/proc/self/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def memory_child(key: str, quick: bool) -> dict:
    """In a fresh process: peak RSS growth of each conversion stage, in MiB."""
    # One-time costs first: convert and compile a tiny model of the same
    # family, so that imports, torch.export's and XLA's caches and JAX's
    # runtime are in the baseline and the growth measured is per-model.
    tiny = MODELS[key](True)
    tiny_apply, tiny_params = bridge.torch_to_jax(tiny.build())
    jax.jit(tiny_apply).trace(tiny_params, **to_jax_tree(tiny.inputs())).lower().compile()
    del tiny, tiny_apply, tiny_params
    m = MODELS[key](quick)
    torch.manual_seed(0)
    model = m.build()
    xj = to_jax_tree(m.inputs())
    weights = sum(t.nbytes for t in model.state_dict().values())
    gc.collect()
    _reset_hwm()
    base = _status_kb("VmRSS")
    apply, params = bridge.torch_to_jax(model)
    after_convert = _status_kb("VmHWM")
    traced = jax.jit(apply).trace(params, **xj)
    after_trace = _status_kb("VmHWM")
    traced.lower().compile()
    after_compile = _status_kb("VmHWM")
    mib = 1024.0
    return {
        "weights_mib": weights / 2**20,
        "base_mib": base / mib,
        "torch_to_jax": (after_convert - base) / mib,
        "trace": (after_trace - base) / mib,
        "compile": (after_compile - base) / mib,
    }


def bench_memory(key: str, quick: bool) -> dict:
    env = dict(os.environ, BRIDGE_BENCH_QUICK="1" if quick else "0")
    proc = subprocess.run(
        [sys.executable, __file__, "--memory", key], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {key} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- dispatch


def bench_mlp(calls: int) -> dict:
    torch.manual_seed(0)
    width, batch = 64, 8
    mlp = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width),
    ).eval()
    apply, params = bridge.torch_to_jax(mlp)
    translated = jax.jit(apply)

    # The same arguments on both sides: the params dict torch_to_jax returned
    # (torch's (out, in) weights), so only the programs differ.
    layers = [name.removesuffix(".weight") for name in params if name.endswith(".weight")]

    @jax.jit
    def hand(p: dict, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(layers):
            x = x @ p[f"{layer}.weight"].T + p[f"{layer}.bias"]
            if i < len(layers) - 1:
                x = jax.nn.relu(x)
        return x

    x = np.random.default_rng(0).standard_normal((batch, width), dtype=np.float32)
    xj = jnp.asarray(x)
    np.testing.assert_allclose(np.asarray(translated(params, xj)), np.asarray(hand(params, xj)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(translated(params, xj)), ref, rtol=1e-5, atol=1e-6)

    def run_translated() -> None:
        translated(params, xj).block_until_ready()

    def run_hand() -> None:
        hand(params, xj).block_until_ready()

    tx = torch.from_numpy(x)

    def run_torch() -> None:
        with torch.no_grad():
            mlp(tx)

    times = time_interleaved({"translated": run_translated, "hand": run_hand, "torch": run_torch}, calls, 200)
    return {"name": f"MLP {width}-{width}-{width}-{width}, batch {batch}", **times}


# --------------------------------------------------------------------------- report


def med_ms(ns: list[int]) -> float:
    return median(ns) / 1e6


def s(ns: float) -> str:
    return f"{ns / 1e9:,.2f}"


def render(models: list[Model], mem: dict, mlp: dict, quick: bool, reps: tuple, load: tuple) -> str:
    fwd_reps, train_reps, mlp_calls = reps
    lines = [
        *header("## torch_to_jax: translated models vs torch eager, torch.compile and hand-written JAX", quick, load,
                f", transformers {tf.__version__}, optax {optax.__version__}; "
                f"torch threads {torch.get_num_threads()}, XLA CPU backend"),
        "- Method: float32, random-init transformers models (no weights downloaded). "
        f"{fwd_reps} forward and {train_reps} training-step rounds per model after 2 warm-up "
        "rounds, the five contenders called in turn (order reversed every round); milliseconds per call as "
        "median [p10, p90]. Forward: `model(**inputs)` under `torch.no_grad()`, the same on "
        "`torch.compile(model)`, the hand-written JAX model (benchmarks/native_models.py: "
        "ResNet in NHWC with `lax.conv_general_dilated`, GPT-2 in plain jax.numpy; the same "
        "weights, its NHWC input transposed outside the timing) under `jax.jit`, and "
        "`jax.jit(apply)(params, **inputs)` on the translated model, with bridge's layout pass "
        "(bridge/layout.py) as it is on this backend and turned off, all blocked until ready. "
        "Training step: `zero_grad; model(**inputs, labels=...).loss.backward(); "
        f"SGD(lr={LR}).step()` against `jax.jit` of `jax.value_and_grad` + `optax.sgd` with "
        "params, state and optimizer state donated (the same step around the hand-written "
        "model's loss). GPT-2 runs in eval mode (dropout off) with "
        "the LM loss; ResNet trains in train mode (BatchNorm batch statistics, running "
        "statistics returned as new state by `torch_to_jax_with_state`).",
        "- Checked before timing: the forward logits of the translated and hand-written models "
        f"against torch eager (max relative error <= {FORWARD_RTOL:g}), and the first two "
        "training losses of every JAX step against torch eager "
        f"(relative <= {LOSS_RTOL:g} for the first, "
        f"{LOSS1_RTOL:g} for the second, which is taken after one update, so it checks "
        "gradients and update too; float32 rounding of the gradients, amplified by the size of a "
        "random-init model's first update, moves it by up to 6e-4 between two compilations of one program, "
        "see bench_export).",
        "",
        "| model | work | torch eager ms | torch.compile ms | native JAX ms | bridge `jax.jit` ms "
        "| bridge, layout pass off ms | bridge / eager | bridge / compile | bridge / native |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets = []
    for m in models:
        native_limit = 1.10 if "ResNet" in m.name else 1.05
        for work, key in [("forward", "forward"), ("training step", "train")]:
            t = m.results[key]
            e, c, n, b = (med_ms(t[k]) for k in ("eager", "compile", "native", "bridge"))
            lines.append(
                f"| {m.name} | {work} | {fmt_ms(t['eager'])} | {fmt_ms(t['compile'])} | "
                f"{fmt_ms(t['native'])} | {fmt_ms(t['bridge'])} | {fmt_ms(t['bridge_off'])} | "
                f"{b / e:.2f}x | {b / c:.2f}x | {b / n:.2f}x |"
            )
            met = "met" if b <= e else "**missed**"
            targets.append(
                f"- {m.name}, {work}: bridge {b:,.1f} ms against torch eager {e:,.1f} ms "
                f"(target: at least as fast): {met}; against torch.compile {c:,.1f} ms: {b / c:.2f}x"
            )
            met = "met" if b <= native_limit * n else "**missed**"
            targets.append(
                f"- {m.name}, {work}: bridge / native JAX {b / n:.2f}x ({b:,.1f} ms against "
                f"{n:,.1f} ms; target <= {native_limit:.2f}x): {met}; with the layout pass off "
                f"{med_ms(t['bridge_off']) / n:.2f}x"
            )
    lines += [
        "",
        "Conversion cost, seconds (one call each, so noisier than the tables above): "
        "`torch_to_jax` is the call itself (capture is lazy); trace is the first "
        "`jax.jit(apply).trace(...)`, which runs `torch.export` and the interpreter; then "
        "`.lower()` and `.compile()`. The training step's first call includes its own capture "
        "(the loss adds `labels`, a new signature) and compile. torch.compile's first calls are "
        "the compiled module's first forward (no_grad) and first training step.",
        "",
        "| model | `torch_to_jax` | capture + trace | lower | XLA compile | forward total | "
        "torch.compile first forward | bridge first training step | torch.compile first training step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        c, f = m.results["convert"], m.results["train_first"]
        total = c["torch_to_jax"] + c["trace"] + c["lower"] + c["compile"]
        lines.append(
            f"| {m.name} | {c['torch_to_jax'] / 1e6:,.2f} ms | {s(c['trace'])} | {s(c['lower'])} | "
            f"{s(c['compile'])} | {s(total)} | {s(c['torch_compile_first'])} | {s(f['bridge'])} | "
            f"{s(f['compile'])} |"
        )
    lines += [
        "",
        "Peak memory of conversion, each model in a fresh process: growth of the peak RSS "
        "(`VmHWM`, reset before conversion) over the RSS with the torch model built, after each "
        "stage, cumulative. The process first converts and compiles a tiny model of the same "
        "family, so one-time costs (imports, torch.export's and XLA's caches) are not counted. Target: `torch_to_jax` + capture do not duplicate the weights "
        "(growth <= 10% of the weights' size). XLA compilation's working memory is reported "
        "beside it (the weights are arguments of the compiled program, not constants in it).",
        "",
        "| model | weights MiB | after `torch_to_jax` MiB | after capture + trace MiB | after XLA compile MiB | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m in models:
        r = mem[m.name]
        limit = 0.1 * r["weights_mib"]
        met = "met" if r["trace"] <= limit else "**missed**"
        lines.append(
            f"| {m.name} | {r['weights_mib']:,.1f} | {r['torch_to_jax']:,.1f} | {r['trace']:,.1f} | "
            f"{r['compile']:,.1f} | <= {limit:,.1f}: {met} |"
        )
        targets.append(
            f"- {m.name}, conversion memory: peak RSS growth {r['trace']:,.1f} MiB through capture "
            f"against {limit:,.1f} MiB (10% of {r['weights_mib']:,.1f} MiB of weights): {met}"
        )
    for m in models:
        losses = m.results["losses"]
        ref = losses["eager"][1]
        diffs = ", ".join(f"{k} {abs(v[1] - ref) / abs(ref):.1e}" for k, v in losses.items() if k != "eager")
        targets.append(f"- {m.name}, loss after one update against torch eager (no target): {diffs}")
    ratio = med_ms(mlp["translated"]) / med_ms(mlp["hand"])
    lines += [
        "",
        f"Dispatch overhead: {mlp['name']}, {mlp_calls:,} calls per contender after 200 warm-up "
        "calls, in turn; microseconds per call as median [p10, p90]. Translated: "
        "`jax.jit(apply)(params, x).block_until_ready()` on `torch_to_jax(nn.Sequential(Linear, "
        "ReLU, Linear, ReLU, Linear))`; hand-written: `jax.jit` of `x @ w.T + b` and `jax.nn.relu` "
        "taking the same params dict (same arguments, so only the programs differ; outputs checked equal).",
        "",
        "| model | torch eager us | hand-written `jax.jit` us | translated `jax.jit` us | translated / hand-written |",
        "|---|---:|---:|---:|---:|",
        f"| {mlp['name']} | {fmt_us(mlp['torch'])} | {fmt_us(mlp['hand'])} | {fmt_us(mlp['translated'])} | {ratio:.2f}x |",
    ]
    met = "met" if ratio <= 1.05 else "**missed**"
    targets.append(f"- {mlp['name']}, translated / hand-written `jax.jit`: {ratio:.2f}x (target <= 1.05x): {met}")
    return "\n".join([*lines, "", "Targets:", "", *targets, ""])


def main() -> None:
    quick = is_quick()
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(memory_child(sys.argv[2], quick)))
        return
    out_dir = results_dir(quick)
    load = os.getloadavg()
    fwd_reps, train_reps, mlp_calls = (3, 2, 200) if quick else (8, 4, 5000)
    models = [make(quick) for make in MODELS.values()]
    mem = {}
    for key, m in zip(MODELS, models, strict=True):
        print(f"== {m.name}: memory", flush=True)
        mem[m.name] = bench_memory(key, quick)
        print(f"== {m.name}: forward", flush=True)
        bench_forward(m, fwd_reps, 2)
        print(f"== {m.name}: training step", flush=True)
        bench_train(m, train_reps, 2)
        gc.collect()
    print("== MLP dispatch", flush=True)
    mlp = bench_mlp(mlp_calls)
    text = render(models, mem, mlp, quick, (fwd_reps, train_reps, mlp_calls), load)
    write_results(out_dir, "bench_torch_to_jax", text)


if __name__ == "__main__":
    main()
