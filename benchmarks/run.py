"""Run the benchmarks and regenerate benchmarks/README.md.

    .venv/bin/python benchmarks/run.py            # every benchmarks/bench_*.py
    .venv/bin/python benchmarks/run.py dlpack     # only bench_dlpack.py

Each `bench_<name>.py` runs in its own process (from the repository root) and
writes its markdown table to `benchmarks/results/bench_<name>.md`. The README
is then rebuilt as the header below followed by every results file, in name
order, so results of benchmarks not run this time stay as they were.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
README = BENCHMARKS / "README.md"

HEADER = """\
# Benchmarks

Speed and memory measurements of the bridge, each compared where it can be
with the plain PyTorch / JAX call it wraps. Every `bench_<name>.py` writes a
markdown table to `results/bench_<name>.md`; this README is this header
followed by those tables, rebuilt by `benchmarks/run.py` (edit the header
there, not here).

## Running

- All of them: `make bench` (runs `.venv/bin/python benchmarks/run.py`).
- Some of them: `.venv/bin/python benchmarks/run.py dlpack` (names without
  the `bench_` prefix), which also rebuilds this README.
- One script directly: `.venv/bin/python benchmarks/bench_dlpack.py` writes
  its results file but leaves this README alone.

## Reading the numbers

Each table names the machine, library versions, date and exact command it
was measured with. The reference machine has 2 CPU cores shared with other
jobs, so single calls are noisy: tables report medians (with p10 / p90) over
many repetitions, and the bridge is timed in the same run as the raw call,
alternating with it. Compare ratios, not absolute microseconds across runs
or machines.
"""


def available() -> dict[str, Path]:
    """Benchmark scripts by name: `bench_dlpack.py` is `dlpack`."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCHMARKS.glob("bench_*.py"))}


def select(names: list[str]) -> list[Path]:
    """The scripts named (with or without `bench_` / `.py`), or all of them."""
    scripts = available()
    if not names:
        return list(scripts.values())
    wanted = [n.removesuffix(".py").removeprefix("bench_") for n in names]
    unknown = [n for n in wanted if n not in scripts]
    if unknown:
        raise SystemExit(
            f"no benchmark named {', '.join(unknown)}; available: {', '.join(scripts)}"
        )
    return [scripts[n] for n in dict.fromkeys(wanted)]


def render_readme(results: Path = RESULTS) -> str:
    """The header followed by every results file in `results`, in name order."""
    tables = [p.read_text().strip() + "\n" for p in sorted(results.glob("*.md"))]
    return "\n".join([HEADER, *tables])


def main(argv: list[str]) -> int:
    failed = []
    for script in select(argv):
        rel = script.relative_to(REPO)
        print(f"== {rel}", flush=True)
        if subprocess.run([sys.executable, str(rel)], cwd=REPO).returncode != 0:
            failed.append(str(rel))
    README.write_text(render_readme())
    print(f"== wrote {README.relative_to(REPO)}")
    if failed:
        print(f"failed (their previous results, if any, are kept): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
