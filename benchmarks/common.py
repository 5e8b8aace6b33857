"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_x.py`)."""

from __future__ import annotations

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
