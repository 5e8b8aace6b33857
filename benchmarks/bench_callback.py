"""Time torch run behind a JAX primitive (`bridge.callback.wrap`) under `jax.jit`.

Each row times one torch function two ways in the same run, alternating:
called directly on a torch tensor ("torch direct"), and wrapped with
`bridge.callback.wrap` and called under `jax.jit` on a JAX array, waiting for
the result ("callback"). The difference of the medians is the callback's
per-call overhead. Pure JAX (`jax.jit` of the same math in jax.numpy) is timed
alongside for scale.

Every timed call records the data pointer torch received; the table says
whether each equals the JAX array's `unsafe_buffer_pointer()`, so the 256 MiB
rows prove torch read JAX's buffer in place, and their time shows it: the
callback costs the same as on a small tensor, plus torch's own compute.

Writes `benchmarks/results/bench_callback.md`. Environment, as bench_dlpack.py:

- `BRIDGE_BENCH_QUICK=1`: small sizes and few repetitions (the smoke test).
- `BRIDGE_BENCH_RESULTS=DIR`: write the table into DIR instead; required
  with `BRIDGE_BENCH_QUICK=1`, so quick numbers never replace real ones.

Trace mode with one op falling back to a callback, against a full
translation, is bench_hybrid.py.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import torch
from common import (
    fmt_us,
    header,
    is_quick,
    results_dir,
    time_interleaved,
    write_results,
)
from jax.experimental.buffer_callback import buffer_callback
from torch._subclasses.fake_tensor import FakeTensor

from bridge import callback

NAME = "bench_callback"
OVERHEAD_TARGET_US = 30.0  # callback under jit minus torch direct, small tensor
NO_COPY_FACTOR = 2.0  # overhead on 256 MiB at most this times the small-tensor overhead


@dataclass(frozen=True)
class Config:
    small: int  # float32 elements
    large: int  # float32 elements
    reps_fast: int  # rows whose torch compute is O(1)
    reps_slow: int  # rows whose torch compute reads the whole large tensor
    warmup: int


FULL = Config(small=16, large=(256 << 20) // 4, reps_fast=3000, reps_slow=30, warmup=20)
QUICK = Config(small=16, large=(1 << 20) // 4, reps_fast=30, reps_slow=5, warmup=3)
SLOW_WARMUP = 3  # rows that read the large tensor: a few calls warm them up

# torch's OpenMP threads and XLA's share two busy cores on the reference
# machine; with more than one torch thread a 1 MiB sum took 13 ms instead of
# 0.2 ms, in the direct call and the callback alike. One thread measures the
# bridge, not the contention.
TORCH_THREADS = 1


@dataclass
class Row:
    case: str
    fn: str
    torch_ns: list[int]
    callback_ns: list[int]
    jax_ns: list[int]
    pointers: str  # "yes (N calls)" / "no"


# ------------------------------------------------------------------ timing


class Pointers:
    """Wraps a torch function to record the data pointer of its first input."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.seen: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, FakeTensor):
            self.seen.append(x.data_ptr())
        return self.fn(x)


def _case(
    case: str,
    label: str,
    torch_fn: Callable[[torch.Tensor], torch.Tensor],
    jax_fn: Callable[[jax.Array], jax.Array],
    n: int,
    reps: int,
    warmup: int,
) -> Row:
    x = jnp.full((n,), 0.5, dtype=jnp.float32).block_until_ready()
    t = torch.full((n,), 0.5, dtype=torch.float32)
    recorder = Pointers(torch_fn)
    wrapped = jax.jit(callback.wrap(recorder))
    pure = jax.jit(jax_fn)
    np.testing.assert_allclose(  # same answer both ways before timing anything
        np.asarray(wrapped(x)), torch_fn(t).numpy(), rtol=1e-5, atol=1e-5
    )
    recorder.seen.clear()
    times = time_interleaved(
        {
            "torch": lambda: torch_fn(t),
            "callback": lambda: wrapped(x).block_until_ready(),
            "jax": lambda: pure(x).block_until_ready(),
        },
        reps,
        warmup,
    )
    expected = x.unsafe_buffer_pointer()
    shared = recorder.seen and all(p == expected for p in recorder.seen)
    pointers = f"yes ({len(recorder.seen):,} calls)" if shared else "**no**"
    return Row(case, label, times["torch"], times["callback"], times["jax"], pointers)


def run_cases(cfg: Config) -> list[Row]:
    small, large = _size_label(cfg.small * 4), _size_label(cfg.large * 4)
    rows = [
        _case(
            f"{small}", "`torch.sin(x)`", torch.sin, jnp.sin, cfg.small, cfg.reps_fast, cfg.warmup
        ),
        _case(
            f"{large}",
            "`x[:16] * 2` (O(1) compute)",
            lambda x: x[:16] * 2,
            lambda x: x[:16] * 2,
            cfg.large,
            cfg.reps_fast,
            cfg.warmup,
        ),
        _case(
            f"{large}",
            "`x.sum()` (reads all of x)",
            torch.sum,
            jnp.sum,
            cfg.large,
            cfg.reps_slow,
            min(cfg.warmup, SLOW_WARMUP),
        ),
        _case(
            f"{large}",
            f"`x * 2` ({large} output)",
            lambda x: x * 2,
            lambda x: x * 2,
            cfg.large,
            cfg.reps_slow,
            min(cfg.warmup, SLOW_WARMUP),
        ),
    ]
    return rows


def floor_ns(cfg: Config) -> dict[str, list[int]]:
    """Where a small callback's time goes, timed alternating with the bridge:
    `jax.jit(jnp.sin)` ("jit"), a jitted buffer_callback whose callback does
    nothing ("empty"), one that only imports its input and output buffers
    into torch through DLPack ("dlpack"), and one that runs `torch.sin` on
    them with nothing else ("minimal": no checks, no pytrees, no caching).
    Each step's difference to the one before is its share."""
    x = jnp.full((cfg.small,), 0.5, jnp.float32)
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    from_dlpack = torch._C._from_dlpack

    def nothing(ctx: Any, out: Any, x: Any) -> None:
        pass

    def imports(ctx: Any, out: Any, x: Any) -> None:
        from_dlpack(x.__dlpack__())
        from_dlpack(out.__dlpack__())

    def minimal(ctx: Any, out: Any, x: Any) -> None:
        from_dlpack(out.__dlpack__()).copy_(torch.sin(from_dlpack(x.__dlpack__())))

    plain = jax.jit(jnp.sin)
    empty = jax.jit(lambda x: buffer_callback(nothing, shape)(x))
    dlpack = jax.jit(lambda x: buffer_callback(imports, shape)(x))
    hand = jax.jit(lambda x: buffer_callback(minimal, shape)(x))
    bridged = jax.jit(callback.wrap(torch.sin))
    np.testing.assert_allclose(np.asarray(hand(x)), np.asarray(bridged(x)), rtol=1e-6)
    return time_interleaved(
        {
            "jit": lambda: plain(x).block_until_ready(),
            "empty": lambda: empty(x).block_until_ready(),
            "dlpack": lambda: dlpack(x).block_until_ready(),
            "minimal": lambda: hand(x).block_until_ready(),
            "bridge": lambda: bridged(x).block_until_ready(),
        },
        cfg.reps_fast,
        cfg.warmup,
    )


# ------------------------------------------------------------------ report


def _size_label(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _overhead_us(row: Row) -> float:
    return (statistics.median(row.callback_ns) - statistics.median(row.torch_ns)) / 1e3


def _spread_us(ns: list[int]) -> float:
    deciles = statistics.quantiles(ns, n=10, method="inclusive")
    return (deciles[-1] - deciles[0]) / 1e3


def _shares(floor: dict[str, list[int]]) -> str:
    steps = [
        ("jit", "empty", "JAX's host-callback machinery"),
        ("empty", "dlpack", "DLPack imports of the two buffers"),
        ("dlpack", "minimal", "torch (`sin` and the copy into XLA's buffer)"),
        ("minimal", "bridge", "the bridge's own checks and glue"),
    ]
    parts = [
        f"{name} {(statistics.median(floor[b]) - statistics.median(floor[a])) / 1e3:.1f} us"
        for a, b, name in steps
    ]
    return "; ".join(parts)


def _targets(rows: list[Row], floor: dict[str, list[int]]) -> list[str]:
    small, large_o1, large_sum, large_out = rows
    overhead = _overhead_us(small)
    met = "met" if overhead < OVERHEAD_TARGET_US else "**missed**"
    lines = [
        f"- Per-call overhead on a small tensor (callback under jit minus torch direct, "
        f"medians): {overhead:.1f} us (target < {OVERHEAD_TARGET_US:g} us): {met}",
        "- Where the time of a small callback goes, `torch.sin` on 64 B, the five timed "
        f"alternating: `jax.jit(jnp.sin)` {fmt_us(floor['jit'])} us; an empty "
        f"buffer_callback {fmt_us(floor['empty'])} us; one that only imports its two buffers "
        f"through DLPack {fmt_us(floor['dlpack'])} us; a minimal hand-written torch callback "
        f"(no checks) {fmt_us(floor['minimal'])} us; `bridge.callback` "
        f"{fmt_us(floor['bridge'])} us. Shares, as differences of medians: {_shares(floor)} "
        "(no target)",
    ]
    # A copy of the large input would add milliseconds; the overhead must stay
    # within twice the small-tensor overhead, or within the noise of torch's own time.
    for row in (large_o1, large_sum):
        extra = _overhead_us(row)
        allowed = max(NO_COPY_FACTOR * overhead, _spread_us(row.torch_ns))
        ok = "met" if extra <= allowed and row.pointers.startswith("yes") else "**missed**"
        lines.append(
            f"- No copy of a {row.case} input, {row.fn}: overhead {extra:,.1f} us against "
            f"{overhead:.1f} us on the small tensor (torch's own time "
            f"{statistics.median(row.torch_ns) / 1e3:,.1f} us, p10-p90 spread "
            f"{_spread_us(row.torch_ns):,.1f} us), and torch got JAX's buffer on every call "
            f"(target: overhead <= {NO_COPY_FACTOR:g}x the small-tensor overhead or within "
            f"torch's spread): {ok}"
        )
    lines.append(
        f"- {large_out.case} output, {large_out.fn}: overhead {_overhead_us(large_out):,.0f} us, "
        "the one copy of torch's result into the buffer XLA allocated for it (no target; "
        "inputs are never copied, and outside `jit` the result is shared instead)"
    )
    return lines


def render(
    rows: list[Row],
    floor: dict[str, list[int]],
    cfg: Config,
    quick: bool,
    load: tuple[float, ...],
) -> str:
    transport = callback.TRANSPORT
    lines = [
        *header("## callback: torch behind a JAX primitive under `jax.jit`", quick, load,
                f", jaxlib {jaxlib.__version__}; transport: `jax.experimental.{transport}`"),
        f"- Method: float32 on the CPU, `torch.set_num_threads({TORCH_THREADS})`; "
        f"{cfg.reps_fast:,} calls per O(1) row (after {cfg.warmup} warm-up calls) and "
        f"{cfg.reps_slow:,} per row that reads the large tensor (after "
        f"{min(cfg.warmup, SLOW_WARMUP)}), the three calls alternating; per-call microseconds "
        "as median [p10, p90]. "
        '"callback" is `jax.jit(bridge.callback.wrap(fn))(x).block_until_ready()`; '
        '"torch direct" is `fn(t)` on a torch tensor; "pure JAX" is `jax.jit` of the '
        'same math in jax.numpy. "torch got JAX\'s buffer" compares, on every timed call, '
        "the data pointer torch received with `x.unsafe_buffer_pointer()`.",
        "",
        "| input | fn | torch direct us | callback us | overhead us | pure JAX us "
        "| torch got JAX's buffer |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.fn} | {fmt_us(r.torch_ns)} | {fmt_us(r.callback_ns)} | "
            f"{_overhead_us(r):,.1f} | {fmt_us(r.jax_ns)} | {r.pointers} |"
        )
    lines += [
        "",
        "Targets:",
        "",
        *_targets(rows, floor),
        "- Trace mode with one op falling back to a callback, against a full translation: "
        "see bench_hybrid.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    quick = is_quick()
    out_dir = results_dir(quick)
    cfg = QUICK if quick else FULL
    torch.set_num_threads(TORCH_THREADS)
    load = os.getloadavg()
    rows = run_cases(cfg)
    floor = floor_ns(cfg)
    write_results(out_dir, NAME, render(rows, floor, cfg, quick, load))


if __name__ == "__main__":
    main()
