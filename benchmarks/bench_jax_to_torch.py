"""Forward + backward through `bridge.jax_to_torch` against pure JAX.

For a JAX MLP and a small JAX transformer block (loss included: the mean of
the output squared), one training step's work is timed two ways on the same
inputs, in the same process, the two calls alternating:

- torch module: `loss = module(x); loss.backward()` through the `nn.Module`
  that `bridge.jax_to_torch(loss_fn, params)` returns (gradients land in
  `.grad`, reset with `zero_grad(set_to_none=True)`);
- pure JAX: `jax.jit(jax.value_and_grad(loss_fn))(params, x)`, blocked until
  ready, on the module's own parameter memory.

Target: torch module <= 1.2 x pure JAX + 50 us per call (medians). The
forward alone (`torch.no_grad()` against `jax.jit(loss_fn)`) is reported too,
and so is the model converted without its loss, with the loss computed in
torch (the module's output is then not a scalar, so its backward applies the
forward's residuals instead of taking gradients computed in the forward).

Run: .venv/bin/python benchmarks/bench_jax_to_torch.py
Writes: benchmarks/results/bench_jax_to_torch.md

- `BRIDGE_BENCH_QUICK=1`: small models and few repetitions (a smoke test).
- `BRIDGE_BENCH_RESULTS=DIR`: write the table into DIR instead; required
  with `BRIDGE_BENCH_QUICK=1`, so quick numbers never replace real ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import fmt_us, header, is_quick, results_dir, time_interleaved, write_results

import bridge

TORCH_THREADS = 1  # torch only glues here; its idle threads would compete with XLA's
Case = tuple[str, Callable, dict, np.ndarray]
# Residuals the forward keeps: all of jax.vjp's (the default), or matmul
# results only, recomputing elementwise ops in the backward as XLA's fused
# value_and_grad does.
POLICIES = [("", None), (", remat_policy=dots_saveable", jax.checkpoint_policies.dots_saveable)]
# The module returns the model's output (not a scalar) and torch computes the
# loss: the backward gets a full cotangent, so the forward keeps the residuals.
LOSS_IN_TORCH = ", model converted, loss in torch"
BREAKDOWN_CALLS = {False: 1000, True: 20}  # steps of the MLP timed in parts (full, quick)


def mlp_case(quick: bool) -> Case:
    sizes = [32, 64, 10] if quick else [256, 512, 512, 10]
    batch = 8 if quick else 64
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    params = {
        f"layer{i}": {
            "w": jax.random.normal(k, (sizes[i], sizes[i + 1])) / np.sqrt(sizes[i]),
            "b": jnp.zeros(sizes[i + 1]),
        }
        for i, k in enumerate(keys)
    }

    def model(params: dict, x: jax.Array) -> jax.Array:
        n = len(params)
        for i in range(n):
            x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
            if i < n - 1:
                x = jax.nn.gelu(x)
        return x

    x = np.random.default_rng(0).standard_normal((batch, sizes[0]), dtype=np.float32)
    return f"MLP {'-'.join(map(str, sizes))}, batch {batch}", model, params, x


def transformer_case(quick: bool) -> Case:
    d, heads, ff, seq, batch = (32, 2, 64, 8, 2) if quick else (128, 4, 512, 64, 8)
    k = iter(jax.random.split(jax.random.key(1), 8))

    def dense(n_in: int, n_out: int) -> dict:
        return {
            "w": jax.random.normal(next(k), (n_in, n_out)) / np.sqrt(n_in),
            "b": jnp.zeros(n_out),
        }

    params = {
        "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "qkv": dense(d, 3 * d),
        "out": dense(d, d),
        "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "ff1": dense(d, ff),
        "ff2": dense(ff, d),
    }

    def layer_norm(p: dict, x: jax.Array) -> jax.Array:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    def block(p: dict, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        h = layer_norm(p["ln1"], x)
        q, kk, v = jnp.split(h @ p["qkv"]["w"] + p["qkv"]["b"], 3, axis=-1)
        q, kk, v = (t.reshape(b, s, heads, d // heads) for t in (q, kk, v))
        att = jax.nn.dot_product_attention(q, kk, v, is_causal=True).reshape(b, s, d)
        x = x + att @ p["out"]["w"] + p["out"]["b"]
        h = jax.nn.gelu(layer_norm(p["ln2"], x) @ p["ff1"]["w"] + p["ff1"]["b"])
        return x + h @ p["ff2"]["w"] + p["ff2"]["b"]

    x = np.random.default_rng(1).standard_normal((batch, seq, d), dtype=np.float32)
    name = f"transformer block d={d}, {heads} heads, ff={ff}, seq {seq}, batch {batch}"
    return name, block, params, x


def mean_square(model: Callable) -> Callable:
    """The loss of every case: the mean of the model's output squared."""

    def loss(params: dict, x: jax.Array) -> jax.Array:
        return jnp.mean(model(params, x) ** 2)

    return loss


def check_same_numbers(
    module: torch.nn.Module, loss: Callable, params_j: dict, x: np.ndarray, torch_loss: Callable
) -> None:
    """The module computes JAX's loss and gradients (checked before timing)."""
    value, grads = jax.jit(jax.value_and_grad(loss))(params_j, jnp.asarray(x))
    module.zero_grad(set_to_none=True)
    out = torch_loss(module(torch.from_numpy(x)))
    out.backward()
    np.testing.assert_allclose(out.item(), float(value), rtol=1e-5)
    for path, p in module.named_parameters():
        g = grads
        for part in path.split("."):
            g = g[part]
        np.testing.assert_allclose(p.grad.numpy(), np.asarray(g), rtol=1e-4, atol=1e-6)


def _same(out: torch.Tensor) -> torch.Tensor:
    return out


def _torch_mean_square(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


def run_case(case: Case, calls: int, warmup: int) -> list[tuple]:
    name, model, params, x_np = case
    loss = mean_square(model)
    x_t, x_j = torch.from_numpy(x_np), jnp.asarray(x_np)
    value_and_grad, forward = jax.jit(jax.value_and_grad(loss)), jax.jit(loss)
    rows = []
    # (label, policy, the function converted, the loss torch adds to its output)
    variants = [(label, policy, loss, _same) for label, policy in POLICIES]
    variants.append((LOSS_IN_TORCH, None, model, _torch_mean_square))
    for policy_name, policy, converted, torch_loss in variants:
        module = bridge.jax_to_torch(converted, params, remat_policy=policy)
        params_j = module.jax_params()  # the module's own memory, as JAX arrays
        check_same_numbers(module, loss, params_j, x_np, torch_loss)

        def torch_train(module: torch.nn.Module = module, torch_loss: Callable = torch_loss) -> None:
            module.zero_grad(set_to_none=True)
            torch_loss(module(x_t)).backward()

        def jax_train(params_j: dict = params_j) -> None:
            jax.block_until_ready(value_and_grad(params_j, x_j))

        def torch_forward(module: torch.nn.Module = module) -> None:
            with torch.no_grad():
                module(x_t)

        def jax_forward(params_j: dict = params_j) -> None:
            jax.block_until_ready(forward(params_j, x_j))

        works = [("forward + backward", (torch_train, jax_train))]
        if policy is None and torch_loss is _same:  # the policy changes nothing without gradients
            works.append(("forward, no_grad", (torch_forward, jax_forward)))
        for work, (torch_fn, jax_fn) in works:
            times = time_interleaved({"torch": torch_fn, "jax": jax_fn}, calls, warmup)
            rows.append((name, f"{work}{policy_name}", times["torch"], times["jax"]))
    return rows


def breakdown(case: Case, calls: int, warmup: int) -> dict[str, list[int]]:
    """Where a scalar-loss training step's time goes (default module), timed in
    turn with pure JAX: `zero_grad`, the forward (tensors to arrays, the one
    fused XLA program, outputs back, autograd's bookkeeping) and the backward
    (torch's engine and the gradients handed over: no XLA call); pure JAX's
    `value_and_grad` with `x` as a JAX array, and with `x` as the NumPy view
    the module passes it as (so JAX imports it on every call too)."""
    name, model, params, x_np = case
    loss = mean_square(model)
    x_t, x_j = torch.from_numpy(x_np), jnp.asarray(x_np)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    module = bridge.jax_to_torch(loss, params)
    params_j = module.jax_params()
    parts: dict[str, list[int]] = {"zero_grad": [], "forward": [], "backward": []}

    def step() -> None:
        t0 = time.perf_counter_ns()
        module.zero_grad(set_to_none=True)
        t1 = time.perf_counter_ns()
        out = module(x_t)
        t2 = time.perf_counter_ns()
        out.backward()
        t3 = time.perf_counter_ns()
        for key, ns in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key].append(ns)

    times = time_interleaved(
        {
            "step": step,
            "jax": lambda: jax.block_until_ready(value_and_grad(params_j, x_j)),
            "jax, x as NumPy": lambda: jax.block_until_ready(value_and_grad(params_j, x_np)),
        },
        calls,
        warmup,
    )
    return {**{k: v[warmup:] for k, v in parts.items()}, **times}


def median_us(ns: list[int]) -> float:
    return float(np.median(ns)) / 1e3


def render(rows: list[tuple], quick: bool, calls: int, load: tuple[float, ...]) -> str:
    lines = [
        *header("## jax_to_torch: a JAX model as a torch `nn.Module` vs pure JAX", quick, load,
                f", backend {jax.default_backend()}"),
        f"- Method: float32, `torch.set_num_threads({TORCH_THREADS})`; {calls} calls per row "
        "after warm-up, the torch and JAX calls in turn (order reversed every round); per-call microseconds as median "
        "[p10, p90]. torch module: `module.zero_grad(set_to_none=True); module(x).backward()` "
        "on `bridge.jax_to_torch(loss, params)`. Pure JAX: "
        "`jax.jit(jax.value_and_grad(loss))(params, x)` and `jax.block_until_ready`. Loss "
        "and every gradient were checked equal (rtol 1e-4) before timing. Rows with "
        "`remat_policy=dots_saveable` build the module with "
        "`jax_to_torch(loss, params, remat_policy=jax.checkpoint_policies.dots_saveable)`. "
        "Rows \"model converted, loss in torch\" convert the model without its loss "
        "(`jax_to_torch(model, params)`, which returns the output, not a scalar) and run "
        "`module(x).pow(2).mean().backward()`, against the same pure JAX `value_and_grad`.",
        "",
        "| model | work | pure JAX us | torch module us | overhead us | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    targets = []
    for name, work, t, j in rows:
        over = median_us(t) - median_us(j)
        lines.append(
            f"| {name} | {work} | {fmt_us(j)} | {fmt_us(t)} | {over:,.1f} | "
            f"{median_us(t) / median_us(j):.2f}x |"
        )
        budget = 1.2 * median_us(j) + 50
        met = "met" if median_us(t) <= budget else "**missed**"
        targets.append(
            f"- {name}, {work}: {median_us(t):,.1f} us against 1.2 x {median_us(j):,.1f} + 50 "
            f"= {budget:,.1f} us: {met}"
        )
    return "\n".join(
        [*lines, "", "Targets (torch module <= 1.2 x pure JAX + 50 us):", "", *targets, ""]
    )


def render_breakdown(name: str, split: dict[str, list[int]]) -> str:
    parts = "; ".join(f"{k} {fmt_us(v)} us" for k, v in split.items())
    step = sum(median_us(split[k]) for k in ("zero_grad", "forward", "backward"))
    return (
        f"- Where the time goes, {name}, forward + backward of the default module "
        f"({len(split['step']):,} steps, each timed in parts, in turn with pure JAX): "
        f"{parts}. The parts' medians add up to {step:,.1f} us; the forward exceeds pure "
        f"JAX with x as NumPy by {median_us(split['forward']) - median_us(split['jax, x as NumPy']):,.1f} us "
        "(no target)\n"
    )


def main() -> None:
    quick = is_quick()
    out_dir = results_dir(quick)
    torch.set_num_threads(TORCH_THREADS)
    load = os.getloadavg()
    calls, warmup = (20, 5) if quick else (300, 30)
    rows = []
    for make in (mlp_case, transformer_case):
        rows.extend(run_case(make(quick), calls, warmup))
    mlp = mlp_case(quick)
    split = breakdown(mlp, BREAKDOWN_CALLS[quick], warmup)
    text = render(rows, quick, calls, load) + render_breakdown(mlp[0], split)
    write_results(out_dir, "bench_jax_to_torch", text)


if __name__ == "__main__":
    main()
