"""Regenerate docs/ops.md: core ATen coverage and the OpInfo conformance table.

    .venv/bin/python tools/coverage.py                       # run the sweep (pytest -n 2), then write
    .venv/bin/python tools/coverage.py --results r.jsonl     # write from an earlier sweep's results
    .venv/bin/python tools/coverage.py --results r.jsonl --seconds 5400   # ... and its wall time
    .venv/bin/python tools/coverage.py -- -k "linalg or fft" # pass extra arguments to pytest
    BRIDGE_OPINFO_SAMPLES=all .venv/bin/python tools/coverage.py --conformance   # make conformance

The sweep is tests/test_opinfo.py; with BRIDGE_OPINFO_RESULTS set it appends
one JSON line per test, which this script reads. BRIDGE_OPINFO_SAMPLES (a
number, or `all`) says how many float32 samples per entry it ran. Pass rates are taken over
the OpInfo entries torch itself can export (entries skipped because torch
rejects or cannot export every sample, or takes sparse inputs, are left out
of the denominators).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.ops import LOWERINGS  # noqa: E402

TARGETS = {"core": 100.0, "forward": 95.0, "grad": 90.0}


def core_overloads() -> list[torch._ops.OpOverload]:
    """Every ATen overload tagged `torch.Tag.core`, sorted by name."""
    found = []
    for qualified in torch._C._dispatch_get_all_op_names():
        if not qualified.startswith("aten::"):
            continue
        name, _, overload = qualified[len("aten::") :].partition(".")
        try:
            op = getattr(getattr(torch.ops.aten, name), overload or "default")
        except (AttributeError, RuntimeError):
            continue
        if torch.Tag.core in op.tags:
            found.append(op)
    return sorted(set(found), key=str)


def run_sweep(results: Path, pytest_args: list[str]) -> float:
    env = dict(os.environ, BRIDGE_OPINFO_RESULTS=str(results))
    cmd = [sys.executable, "-m", "pytest", "tests/test_opinfo.py", "-n", "2", "-q", "-p", "no:cacheprovider"]
    start = time.monotonic()
    subprocess.run(cmd + pytest_args, cwd=ROOT, env=env, check=False)
    return time.monotonic() - start


def read_results(path: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row["op"], row["mode"])] = row
    return rows


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    status = row["status"]
    ran = row.get("passed", 0) + row.get("failed", 0)
    if status == "pass":
        return f"pass ({ran}/{ran})" if ran else "pass"
    if status == "fail":
        first = (row.get("first_failure") or [""])[0].replace("|", "\\|")
        return f"**fail** ({row['failed']}/{ran}): {first[:160]}"
    return f"{status}: {row.get('reason', '')}".replace("|", "\\|")


# Skips that are torch's: it cannot export the entry, rejects every sample, or
# the inputs are sparse. They leave the denominators. Every other skip (a
# KNOWN entry: data-dependent shapes, dtypes JAX lacks, torch's RNG) stays in
# the strict denominator as not passing.
TORCH_SKIPS = ("torch cannot export", "torch rejects every sample", "sparse tensors")


def _torchs(row: dict) -> bool:
    return row["status"] == "skip" and row.get("reason", "").startswith(TORCH_SKIPS)


def _rate(rows: list[dict]) -> tuple[int, int]:
    """Passes over every entry torch can export (skips of ours count as not passing)."""
    counted = [r for r in rows if not _torchs(r)]
    return sum(r["status"] == "pass" for r in counted), len(counted)


def _rate_run(rows: list[dict]) -> tuple[int, int]:
    """Passes over the entries run to a verdict (pass, fail or xfail)."""
    counted = [r for r in rows if r["status"] in ("pass", "fail", "xfail")]
    return sum(r["status"] == "pass" for r in counted), len(counted)


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100.0 * n / d:.1f}%)" if d else "0/0"


def _verdict(n: int, d: int, target: float) -> str:
    return "met" if d and 100.0 * n / d >= target else "**missed**"


def _skip_lines(rows: list[dict], mode: str) -> list[str]:
    reasons: dict[str, int] = {}
    for r in rows:
        if r["status"] == "skip":
            reason = r.get("reason", "")
            key = next((t for t in TORCH_SKIPS if reason.startswith(t)), None) or reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return [f"  - {mode}, {k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]


def _samples_phrase() -> str:
    n = os.environ.get("BRIDGE_OPINFO_SAMPLES", "1")
    return "every float32 sample of each entry" if n == "all" else f"the first {n} float32 sample(s) of each entry"


# Per-sample counts a results row carries: checked (passed, failed) and left out, by whose reason.
SAMPLE_COUNTS = {"passed": "passed", "failed": "failed", "eager": "rejected by torch",
                 "export": "not exportable", "data_dependent": "data-dependent", "x64": "need x64"}


def _sample_totals(rows: list[dict]) -> str:
    """Samples over all tests (forward and gradient), by outcome."""
    totals = {k: sum(r.get(k, 0) for r in rows) for k in SAMPLE_COUNTS}
    return ", ".join(f"{v} {SAMPLE_COUNTS[k]}" for k, v in totals.items())


def render(results: dict[tuple[str, str], dict], sweep_seconds: float | None) -> str:
    from torch.testing._internal.common_methods_invocations import op_db

    core = core_overloads()
    lowered = [op for op in core if op in LOWERINGS]
    out = [
        "# Op coverage",
        "",
        "Generated by `tools/coverage.py` (`make coverage`); do not edit by hand.",
        f"torch {torch.__version__}. Targets: {TARGETS['core']:.0f}% of core ATen overloads lowered; "
        f"≥{TARGETS['forward']:.0f}% of exportable OpInfo entries pass forward, "
        f"≥{TARGETS['grad']:.0f}% gradient.",
        "",
        "## Summary",
        "",
    ]
    ids = [f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name for op in op_db]
    fwd = [results[(i, "forward")] for i in ids if (i, "forward") in results]
    grad = [results[(i, "grad")] for i in ids if (i, "grad") in results]
    not_run = sum((i, "forward") not in results for i in ids)
    (fp, fd), (gp, gd) = _rate(fwd), _rate(grad)
    out += [
        f"- Core ATen overloads lowered: {_pct(len(lowered), len(core))}: "
        f"{_verdict(len(lowered), len(core), TARGETS['core'])}",
        f"- OpInfo entries passing forward (float32): {_pct(fp, fd)} of the entries torch can export: "
        f"{_verdict(fp, fd, TARGETS['forward'])}",
        f"- OpInfo entries passing gradient (float32): {_pct(gp, gd)} of the entries torch can export "
        f"and differentiate: {_verdict(gp, gd, TARGETS['grad'])}",
        f"- Over the entries run to a verdict (our KNOWN skips left out too): forward "
        f"{_pct(*_rate_run(fwd))}, gradient {_pct(*_rate_run(grad))}",
        f"- OpInfo entries: {len(ids)}; not run in this sweep: {not_run}. Skipped, by reason "
        "(torch's skips leave the denominators, the others count as not passing):",
        *_skip_lines(fwd, "forward"),
        *_skip_lines(grad, "gradient"),
        f"- Samples: {_samples_phrase()} (`make conformance` runs every float32 sample, "
        "`BRIDGE_CONFORMANCE=full` every sample and dtype)",
        f"- Sample totals: {_sample_totals([*fwd, *grad])}",
    ]
    if sweep_seconds is not None:
        out.append(f"- Sweep time: {sweep_seconds / 60:.1f} min (`pytest -n 2`)")
    out += ["", "## Core ATen overloads", "", "| overload | lowered |", "|---|---|"]
    out += [f"| `{op}` | {'yes' if op in LOWERINGS else '**no**'} |" for op in core]
    out += ["", "## OpInfo entries (float32)", "", "| OpInfo | forward | gradient |", "|---|---|---|"]
    for op, i in zip(op_db, ids, strict=True):
        g = _cell(results.get((i, "grad"))) if op.supports_autograd else "—"
        out.append(f"| `{i}` | {_cell(results.get((i, 'forward')))} | {g} |")
    return "\n".join(out) + "\n"


CONFORMANCE = "## Conformance: every float32 sample"


def render_conformance(results: dict[tuple[str, str], dict], sweep_seconds: float | None) -> str:
    """The `make conformance` section: every float32 sample of every entry, its totals and failures."""
    from torch.testing._internal.common_methods_invocations import op_db

    expected = sum(2 if op.supports_autograd else 1 for op in op_db)
    rows = list(results.values())
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    out = [
        CONFORMANCE,
        "",
        "Generated by `make conformance` (`BRIDGE_OPINFO_SAMPLES=all tools/coverage.py --conformance`): "
        "every float32 sample of every OpInfo entry, forward and gradient.",
        "",
        f"- Tests run (entry x mode): {len(rows)} of {expected}"
        + ("" if len(rows) >= expected else " (**incomplete**: the rest had not run when this was written)"),
        "- Tests by outcome: " + ", ".join(f"{v} {k}" for k, v in sorted(by_status.items(), key=lambda kv: -kv[1])),
        f"- Sample totals: {_sample_totals(rows)}",
    ]
    if sweep_seconds is not None:
        out.append(f"- Sweep time: {sweep_seconds / 60:.1f} min")
    failing = sorted((r for r in rows if r["status"] == "fail"), key=lambda r: (r["op"], r["mode"]))
    out += ["", "Failing tests:", "", *(f"- `{r['op']}` {r['mode']}: {_cell(r)}" for r in failing)] if failing \
        else ["", "Failing tests: none."]
    return "\n".join(out) + "\n"


def _with_section(doc: str, title: str, section: str) -> str:
    """`doc` with the section headed `title` replaced by `section` (added before the ATen table if absent)."""
    section = section.rstrip("\n") + "\n"
    start = doc.find(title)
    if start < 0:
        anchor = doc.find("## Core ATen overloads")
        anchor = len(doc) if anchor < 0 else anchor
        return doc[:anchor] + section + "\n" + doc[anchor:]
    end = doc.find("\n## ", start + len(title))
    return doc[:start] + section + ("\n" + doc[end + 1 :] if end >= 0 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, help="read this results file instead of running the sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ops.md")
    parser.add_argument("--seconds", type=float, help="with --results: the wall time that sweep took")
    parser.add_argument("--conformance", action="store_true",
                        help="write only the every-sample conformance section of --out")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    seconds = None
    if args.results is None:
        results = Path(tempfile.mkdtemp()) / "opinfo.jsonl"
        seconds = run_sweep(results, args.pytest_args)
    else:
        results, seconds = args.results, args.seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = args.out.read_text() if args.out.exists() else ""
    if args.conformance:
        doc = _with_section(old or render({}, None), CONFORMANCE, render_conformance(read_results(results), seconds))
    else:
        doc = render(read_results(results), seconds)
        if CONFORMANCE in old:  # keep the last conformance sweep's section
            end = old.find("\n## ", old.find(CONFORMANCE) + len(CONFORMANCE))
            doc = _with_section(doc, CONFORMANCE, old[old.find(CONFORMANCE) : end + 1 if end >= 0 else None])
    args.out.write_text(doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
