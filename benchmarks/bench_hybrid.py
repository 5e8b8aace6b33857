"""What one unlowered op costs: the hybrid fallback against a full translation.

A residual MLP (`LAYERS` blocks of Linear -> GELU -> Linear, width `WIDTH`,
batch `BATCH`), float32 on the CPU, in four forms, timed in turn in the same
process:

- full translation: `jax.jit(apply)` of `bridge.torch_to_jax(model)`, every op
  lowered to JAX;
- hybrid: the same model, but the GELU of one block is a
  `torch.library.custom_op` with no JAX lowering, so trace mode runs that one
  op in torch behind a callback (`strict=False`, the default) inside the same
  jitted program;
- callback mode: `bridge.torch_to_jax(model, mode="callback")`, the whole
  model in torch behind one callback;
- torch eager: the model itself.

For each, the forward (`torch.no_grad()` for torch) and the forward+backward
(`jax.jit(jax.value_and_grad(loss))` against `loss.backward()`) are timed;
outputs and gradients are checked against torch eager before timing (fp32,
relative 1e-4).

Run: .venv/bin/python benchmarks/bench_hybrid.py
Writes: benchmarks/results/bench_hybrid.md

- `BRIDGE_BENCH_QUICK=1`: a tiny model and few repetitions (a smoke test).
- `BRIDGE_BENCH_RESULTS=DIR`: write the table into DIR instead; required
  with `BRIDGE_BENCH_QUICK=1`, so quick numbers never replace real ones.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import fmt_us, header, is_quick, median, results_dir, time_interleaved, write_results
from torch import nn

import bridge


@torch.library.custom_op("bridge_bench::opaque_gelu", mutates_args=())
def opaque_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU that the bridge cannot see into: it has no JAX lowering."""
    return torch.nn.functional.gelu(x)


@opaque_gelu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _gelu_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    with torch.enable_grad():
        xx = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(torch.nn.functional.gelu(xx), xx, grad)
    return g


def _gelu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


opaque_gelu.register_autograd(_gelu_backward, setup_context=_gelu_setup)


class Block(nn.Module):
    def __init__(self, width: int, opaque: bool) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.opaque = opaque

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = opaque_gelu(h) if self.opaque else torch.nn.functional.gelu(h)
        return x + self.down(h)


class ResidualMLP(nn.Module):
    def __init__(self, width: int, layers: int, opaque_block: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, i == opaque_block) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def close(got: jax.Array, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    got_np, want_np = np.asarray(got), want.detach().numpy()
    err = np.abs(got_np - want_np).max() / max(np.abs(want_np).max(), 1e-30)
    assert err <= rtol, f"{what}: max relative error {err:.2e} > {rtol}"


def main() -> None:
    quick = is_quick()
    out_dir = results_dir(quick)
    width, layers, batch = (32, 2, 4) if quick else (512, 8, 64)
    calls, warmup = (20, 3) if quick else (300, 20)
    load = os.getloadavg()
    torch.manual_seed(0)
    full_model = ResidualMLP(width, layers, opaque_block=None).eval()
    hybrid_model = ResidualMLP(width, layers, opaque_block=layers // 2).eval()
    hybrid_model.load_state_dict(full_model.state_dict())
    x = torch.randn(batch, width)
    xj = bridge.to_jax(x)

    forms: dict[str, tuple[Callable, dict]] = {}
    forms["full translation"] = bridge.torch_to_jax(full_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_h, params_h = bridge.torch_to_jax(hybrid_model)
        jax.jit(apply_h)(params_h, xj)
    fallback = [str(w.message) for w in caught if "opaque_gelu" in str(w.message)]
    assert fallback, "the hybrid model should fall back for bridge_bench.opaque_gelu"
    forms["hybrid (1 op in torch)"] = (apply_h, params_h)
    forms["callback mode"] = bridge.torch_to_jax(full_model, mode="callback")

    hlo = jax.jit(apply_h).lower(params_h, xj).as_text()
    callbacks_in_hybrid = hlo.count("stablehlo.custom_call")

    with torch.no_grad():
        ref = full_model(x)
    full_model.zero_grad()
    (full_model(x) ** 2).mean().backward()
    ref_grads = {k: p.grad.clone() for k, p in full_model.named_parameters()}

    forward_fns: dict[str, Callable[[], object]] = {}
    train_fns: dict[str, Callable[[], object]] = {}
    for name, (apply, params) in forms.items():
        fwd = jax.jit(apply)
        vg = jax.jit(jax.value_and_grad(lambda p, a, apply=apply: jnp.mean(apply(p, a) ** 2)))
        close(fwd(params, xj), ref, f"{name} forward")
        _, grads = vg(params, xj)
        for k, g in grads.items():
            close(g, ref_grads[k], f"{name} gradient of {k}")
        forward_fns[name] = lambda fwd=fwd, params=params: fwd(params, xj).block_until_ready()
        train_fns[name] = lambda vg=vg, params=params: jax.block_until_ready(vg(params, xj))

    def torch_forward() -> None:
        with torch.no_grad():
            full_model(x)

    def torch_train() -> None:
        full_model.zero_grad(set_to_none=True)
        (full_model(x) ** 2).mean().backward()

    forward_fns["torch eager"] = torch_forward
    train_fns["torch eager"] = torch_train
    results = {
        "forward": time_interleaved(forward_fns, calls, warmup),
        "forward + backward": time_interleaved(train_fns, calls, warmup),
    }
    text = render(results, quick, (width, layers, batch), calls, callbacks_in_hybrid, fallback[0], load)
    write_results(out_dir, "bench_hybrid", text)


def med(ns: list[int]) -> float:
    return median(ns) / 1e3


def render(results: dict, quick: bool, shape: tuple, calls: int, n_callbacks: int, warning: str,
           load: tuple) -> str:
    width, layers, batch = shape
    lines = [
        *header("## hybrid: one unlowered op run by torch inside a translated program", quick, load,
                f"; torch threads {torch.get_num_threads()}"),
        f"- Model: residual MLP, {layers} blocks of Linear({width}, {2 * width}) -> GELU -> "
        f"Linear({2 * width}, {width}), batch {batch}, float32. In the hybrid model the GELU of "
        "block "
        f"{layers // 2} is a `torch.library.custom_op` with no lowering: trace mode warned "
        f"\"{warning.splitlines()[0][:160]}\" and compiled one program with {n_callbacks} "
        "custom_call(s) in it.",
        f"- Method: {calls} calls per form after warm-up, the forms called in turn (order reversed every round); microseconds "
        "per call as median [p10, p90]. Forward: `jax.jit(apply)(params, x)` blocked until ready "
        "(torch: `model(x)` under no_grad). Forward + backward: `jax.jit(jax.value_and_grad(loss))` "
        "with `loss = mean(apply(params, x) ** 2)` (torch: `loss.backward()`). Outputs and every "
        "gradient were checked against torch eager (relative 1e-4) before timing.",
        "",
        "| work | form | us per call | / full translation |",
        "|---|---|---:|---:|",
    ]
    notes = []
    for work, times in results.items():
        base = med(times["full translation"])
        for form, ns in times.items():
            lines.append(f"| {work} | {form} | {fmt_us(ns)} | {med(ns) / base:.2f}x |")
        extra = med(times["hybrid (1 op in torch)"]) - base
        notes.append(
            f"- {work}: the one op in torch costs {extra:,.1f} us per call over the full "
            f"translation ({med(times['hybrid (1 op in torch)']) / base:.2f}x); callback mode "
            f"{med(times['callback mode']) / base:.2f}x; torch eager {med(times['torch eager']) / base:.2f}x"
        )
    return "\n".join([*lines, "", "Summary (no target; the issue asks for the cost to be recorded):", "", *notes, ""])


if __name__ == "__main__":
    main()
