"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_x.py`)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

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


def fmt_us(ns: list[int] | list[float]) -> str:
    """Median [p10, p90] of per-call nanoseconds, in microseconds."""
    import numpy as np

    p10, p50, p90 = np.percentile(np.asarray(ns, dtype=float) / 1e3, [10, 50, 90])
    return f"{p50:,.1f} [{p10:,.1f}, {p90:,.1f}]"
