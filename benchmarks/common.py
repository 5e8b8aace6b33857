"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_x.py`)."""

from __future__ import annotations

import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name, for the results header."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def command_line(quick: bool) -> str:
    """The command that reproduces this run, with paths relative to the repo."""

    def rel(p: str) -> str:
        path = Path(p).absolute()
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else p

    env = "BRIDGE_BENCH_QUICK=1 " if quick else ""
    return env + shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])



def header(title: str, quick: bool, load: tuple[float, ...], versions: str = "") -> list[str]:
    """The first lines of a results table: title, command, machine, versions (+ `versions`)."""
    import datetime

    import jax
    import torch

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        title + (" (QUICK)" if quick else ""),
        "",
        f"- Command: `{command_line(quick)}` ({now})",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable), load average at start "
        f"{', '.join(f'{x:.2f}' for x in load)}; {platform.platform()}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"jax {jax.__version__}{versions}",
    ]


DEFAULT_RESULTS = REPO / "benchmarks" / "results"


def is_quick() -> bool:
    """`BRIDGE_BENCH_QUICK=1`: small models and few repetitions (a smoke test)."""
    return os.environ.get("BRIDGE_BENCH_QUICK") == "1"


def results_dir(quick: bool) -> Path:
    """Where a script writes its table: `BRIDGE_BENCH_RESULTS` or benchmarks/results.

    Quick runs must name another folder, so smoke-test numbers never replace
    the real ones."""
    out = Path(os.environ.get("BRIDGE_BENCH_RESULTS", DEFAULT_RESULTS))
    if quick and out.resolve() == DEFAULT_RESULTS.resolve():
        raise SystemExit(
            "BRIDGE_BENCH_QUICK=1 needs BRIDGE_BENCH_RESULTS=DIR (not benchmarks/results): "
            "quick numbers must not replace the real ones."
        )
    return out


def write_results(out_dir: Path, name: str, text: str) -> None:
    """Write `name`.md into `out_dir` (whole or not at all) and print it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{name}.md.tmp"
    tmp.write_text(text)
    tmp.replace(out_dir / f"{name}.md")
    print(text)


def time_interleaved(calls: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[int]]:
    """Per-call nanoseconds of each zero-argument call, called in turn.

    The order reverses every round, so no call always runs right after the
    same other one; the garbage collector is off while timing."""
    times: dict[str, list[int]] = {name: [] for name in calls}
    order = list(calls.items())
    gc.collect()
    gc.disable()
    try:
        for i in range(warmup + reps):
            for name, fn in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter_ns()
                fn()
                stop = time.perf_counter_ns()
                if i >= warmup:
                    times[name].append(stop - start)
    finally:
        gc.enable()
    return times


def median(ns: list[int]) -> float:
    return statistics.median(ns)


def _fmt(ns: list[int], per: float) -> str:
    deciles = statistics.quantiles(ns, n=10, method="inclusive") if len(ns) > 1 else [ns[0]] * 9
    p10, med, p90 = deciles[0] / per, statistics.median(ns) / per, deciles[-1] / per
    digits = 1 if med < 100 else 0
    return f"{med:,.{digits}f} [{p10:,.{digits}f}, {p90:,.{digits}f}]"


def fmt_us(ns: list[int]) -> str:
    """Median [p10, p90] of per-call nanoseconds, in microseconds."""
    return _fmt(ns, 1e3)


def fmt_ms(ns: list[int]) -> str:
    """Median [p10, p90] of per-call nanoseconds, in milliseconds."""
    return _fmt(ns, 1e6)
