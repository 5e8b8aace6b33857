"""Time zero-copy `bridge.to_jax` / `bridge.to_torch` against the raw DLPack calls.

Cases: single float32 CPU tensors of 1 KiB, 1 MiB and 1 GiB, and a state_dict
of 1,000 tensors of 64x64. Each bridge call is timed in the same run as the
raw call it wraps (`jax.dlpack.from_dlpack(t)`, `torch.from_dlpack(a)`),
alternating which goes first, so the difference is the bridge's own cost.
Every result is checked to share its source's memory (data pointers equal),
outside the timed region, so what is timed is sharing, not copying.

Writes `benchmarks/results/bench_dlpack.md`. Environment:

- `BRIDGE_BENCH_QUICK=1`: tiny sizes and few repetitions (the smoke test).
- `BRIDGE_BENCH_RESULTS=DIR`: write the table into DIR instead; required
  with `BRIDGE_BENCH_QUICK=1`, so quick numbers never replace real ones.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.dlpack
import jax.numpy as jnp
import jaxlib
import torch
from common import fmt_us, header, is_quick, results_dir, write_results

import bridge

NAME = "bench_dlpack"
OVERHEAD_TARGET = 1.5  # bridge / raw, single tensor
SCALING_TARGET = 2.0  # largest / smallest single tensor, bridge


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]  # bytes of float32 data per single tensor
    state_dict: tuple[int, tuple[int, int]]  # number of tensors, shape of each
    single_reps: int
    state_dict_reps: int
    warmup: int


FULL = Config(
    sizes=(1 << 10, 1 << 20, 1 << 30),
    state_dict=(1000, (64, 64)),
    single_reps=5000,
    state_dict_reps=60,
    warmup=20,
)
QUICK = Config(
    sizes=(1 << 10, 1 << 16),
    state_dict=(10, (8, 8)),
    single_reps=20,
    state_dict_reps=5,
    warmup=2,
)


@dataclass
class Row:
    case: str
    direction: str  # "torch -> jax" or "jax -> torch"
    raw_call: str
    raw_ns: list[int]
    bridge_ns: list[int]
    shared_checks: int


def _size_label(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


# ------------------------------------------------------------------ checks


def _jax_ptr(a: jax.Array) -> int:
    return a.unsafe_buffer_pointer()


def _check_shared(source_ptr: int, result_ptr: int, what: str) -> None:
    # An explicit raise, not `assert`: the check must hold under `python -O` too.
    if source_ptr != result_ptr:
        raise AssertionError(
            f"{what}: the result does not share the source buffer "
            f"({result_ptr:#x} != {source_ptr:#x}); the timing would be of a copy"
        )


def _check_tensor_to_jax(t: torch.Tensor, a: jax.Array) -> None:
    _check_shared(t.data_ptr(), _jax_ptr(a), "torch -> jax")


def _check_jax_to_tensor(a: jax.Array, t: torch.Tensor) -> None:
    _check_shared(_jax_ptr(a), t.data_ptr(), "jax -> torch")


def _check_dict(check: Callable[[Any, Any], None]) -> Callable[[dict, dict], None]:
    def check_all(source: dict, result: dict) -> None:
        if result.keys() != source.keys():
            raise AssertionError("the converted state_dict lost or reordered keys")
        for k, v in source.items():
            check(v, result[k])

    return check_all


# ------------------------------------------------------------------ timing


def _time_pair(
    raw: Callable[[Any], Any],
    bridged: Callable[[Any], Any],
    arg: Any,
    check: Callable[[Any, Any], None],
    reps: int,
    warmup: int,
) -> tuple[list[int], list[int], int]:
    """Per-call nanoseconds of `raw(arg)` and `bridged(arg)`, interleaved.

    Each call is timed alone; checking and freeing its result happen outside
    the timed region. Returns (raw times, bridge times, results checked).
    """
    times: dict[str, list[int]] = {"raw": [], "bridge": []}
    checks = 0
    gc.collect()
    gc.disable()
    try:
        for i in range(warmup + reps):
            order = (("raw", raw), ("bridge", bridged))
            for name, fn in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter_ns()
                out = fn(arg)
                stop = time.perf_counter_ns()
                check(arg, out)
                checks += 1
                del out
                if i >= warmup:
                    times[name].append(stop - start)
    finally:
        gc.enable()
    return times["raw"], times["bridge"], checks


def _raw_to_jax(t: torch.Tensor) -> jax.Array:
    return jax.dlpack.from_dlpack(t)


def _raw_to_torch(a: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(a)


def _raw_dict_to_jax(sd: dict[str, torch.Tensor]) -> dict[str, jax.Array]:
    return {k: jax.dlpack.from_dlpack(v) for k, v in sd.items()}


def _raw_dict_to_torch(sd: dict[str, jax.Array]) -> dict[str, torch.Tensor]:
    return {k: torch.from_dlpack(v) for k, v in sd.items()}


def run_cases(cfg: Config) -> list[Row]:
    rows = []
    for nbytes in cfg.sizes:
        n = nbytes // 4
        case = f"{_size_label(nbytes)} tensor"
        # One buffer per size and direction, allocated once and written so its
        # pages are real; freed before the next one so at most one is alive.
        t = torch.full((n,), 1.0, dtype=torch.float32)
        raw, bri, checks = _time_pair(
            _raw_to_jax, bridge.to_jax, t, _check_tensor_to_jax, cfg.single_reps, cfg.warmup
        )
        rows.append(Row(case, "torch -> jax", "jax.dlpack.from_dlpack(t)", raw, bri, checks))
        del t
        a = jnp.full((n,), 1.0, dtype=jnp.float32).block_until_ready()
        raw, bri, checks = _time_pair(
            _raw_to_torch, bridge.to_torch, a, _check_jax_to_tensor, cfg.single_reps, cfg.warmup
        )
        rows.append(Row(case, "jax -> torch", "torch.from_dlpack(a)", raw, bri, checks))
        del a

    count, shape = cfg.state_dict
    case = f"state_dict, {count:,} x {shape[0]}x{shape[1]}"
    keys = [f"layers.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(count)]
    directions = (
        ("torch -> jax", torch.full, torch.float32, _raw_dict_to_jax, bridge.to_jax,
         _check_tensor_to_jax, "{k: jax.dlpack.from_dlpack(v)}"),
        ("jax -> torch", jnp.full, jnp.float32, _raw_dict_to_torch, bridge.to_torch,
         _check_jax_to_tensor, "{k: torch.from_dlpack(v)}"),
    )
    for direction, full, dtype, raw_fn, bridge_fn, check, raw_text in directions:
        # One dict alive at a time: the next direction's is built after this one is freed.
        tree = {k: full(shape, float(i), dtype=dtype) for i, k in enumerate(keys)}
        jax.block_until_ready([v for v in tree.values() if isinstance(v, jax.Array)])
        raw, bri, checks = _time_pair(
            raw_fn, bridge_fn, tree, _check_dict(check), cfg.state_dict_reps, cfg.warmup
        )
        rows.append(Row(case, direction, raw_text, raw, bri, checks))
        del tree
    return rows


# ------------------------------------------------------------------ report


def _median(ns: list[int]) -> float:
    return statistics.median(ns)


def _ratio(row: Row) -> float:
    return _median(row.bridge_ns) / _median(row.raw_ns)


def _targets(rows: list[Row], cfg: Config) -> list[str]:
    lines = []
    small, large = _size_label(cfg.sizes[0]), _size_label(cfg.sizes[-1])
    for direction, fn in (("torch -> jax", "to_jax"), ("jax -> torch", "to_torch")):
        by_case = {r.case: r for r in rows if r.direction == direction}
        scale = _median(by_case[f"{large} tensor"].bridge_ns) / _median(
            by_case[f"{small} tensor"].bridge_ns
        )
        met = "met" if scale <= SCALING_TARGET else "**missed**"
        lines.append(
            f"- `{fn}` sharing is O(1): {large} / {small} median = {scale:.2f}x "
            f"(target <= {SCALING_TARGET:g}x): {met}"
        )
    for direction, fn in (("torch -> jax", "to_jax"), ("jax -> torch", "to_torch")):
        singles = [r for r in rows if r.direction == direction and r.case.endswith(" tensor")]
        worst = max(singles, key=_ratio)
        met = "met" if _ratio(worst) <= OVERHEAD_TARGET else "**missed**"
        lines.append(
            f"- `{fn}` overhead on a single tensor: worst bridge / raw = {_ratio(worst):.2f}x "
            f"({worst.case}; target <= {OVERHEAD_TARGET:g}x): {met}"
        )
    return lines


def render(rows: list[Row], cfg: Config, quick: bool, load: tuple[float, ...]) -> str:
    count = cfg.state_dict[0]
    lines = [
        *header("## dlpack: zero-copy `to_jax` / `to_torch` vs raw DLPack", quick, load,
                f", jaxlib {jaxlib.__version__}"),
        f"- Method: float32 on the CPU; {cfg.single_reps:,} calls per single-tensor row and "
        f"{cfg.state_dict_reps:,} per state_dict row (after {cfg.warmup} warm-up calls), raw "
        "and bridge calls alternating; per-call microseconds as median [p10, p90]. "
        "Freeing the result is not timed. Every result was checked to share its "
        "source's memory (equal data pointers) outside the timed region.",
        "",
        "| case | direction | raw call | raw us | bridge us | bridge / raw | shared |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.direction} | `{r.raw_call}` | {fmt_us(r.raw_ns)} | "
            f"{fmt_us(r.bridge_ns)} | {_ratio(r):.2f}x | yes ({r.shared_checks:,} results) |"
        )
    per_tensor = "; ".join(
        f"{r.direction}: raw {_median(r.raw_ns) / count / 1e3:.1f} us, "
        f"bridge {_median(r.bridge_ns) / count / 1e3:.1f} us"
        for r in rows
        if r.case.startswith("state_dict")
    )
    lines += [
        "",
        "Targets (bridge medians):",
        "",
        *_targets(rows, cfg),
        f"- state_dict, per tensor: {per_tensor} (no target)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    quick = is_quick()
    out_dir = results_dir(quick)
    cfg = QUICK if quick else FULL
    load = os.getloadavg()
    rows = run_cases(cfg)
    write_results(out_dir, NAME, render(rows, cfg, quick, load))


if __name__ == "__main__":
    main()
