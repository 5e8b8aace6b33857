"""Benchmarks: bench_dlpack.py's quick mode writes every row with sharing
verified, its sharing check catches copies, and run.py selects scripts and
builds the README from the results files. Nothing here asserts on time."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

# The cases of bench_dlpack.QUICK, in the order the table lists them.
QUICK_CASES = ["1 KiB tensor", "64 KiB tensor", "state_dict, 10 x 8x8"]
DIRECTIONS = ["torch -> jax", "jax -> torch"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows[1:]]


def _run_quick(script: str, tmp_path: Path) -> str:
    env = {**os.environ, "BRIDGE_BENCH_QUICK": "1", "BRIDGE_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == [f"{script}.md"]
    return (tmp_path / f"{script}.md").read_text()


def test_bench_dlpack_quick_mode_writes_every_row_with_sharing_verified(tmp_path):
    real = BENCHMARKS / "results" / "bench_dlpack.md"
    real_before = real.read_bytes() if real.exists() else None
    text = _run_quick("bench_dlpack", tmp_path)
    rows = table_rows(text)
    assert [(r[0], r[1]) for r in rows] == [(c, d) for c in QUICK_CASES for d in DIRECTIONS]
    for case, _, _, raw_us, bridge_us, ratio, shared in rows:
        assert float(raw_us.split()[0].replace(",", "")) > 0, case
        assert float(bridge_us.split()[0].replace(",", "")) > 0, case
        assert ratio.endswith("x"), case
        assert shared.startswith("yes (") and int(shared.split()[1].lstrip("(")) > 0, case
    command = next(line for line in text.splitlines() if line.startswith("- Command: "))
    assert command.startswith("- Command: `BRIDGE_BENCH_QUICK=1 ")
    assert "python benchmarks/bench_dlpack.py`" in command
    assert text.count("sharing is O(1)") == 2
    assert text.count("overhead on a single tensor") == 2
    assert (real.read_bytes() if real.exists() else None) == real_before


def test_bench_dlpack_quick_mode_refuses_the_real_results_folder():
    env = {k: v for k, v in os.environ.items() if k != "BRIDGE_BENCH_RESULTS"}
    env["BRIDGE_BENCH_QUICK"] = "1"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_dlpack.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "BRIDGE_BENCH_RESULTS" in proc.stderr


def test_bench_dlpack_sharing_check_rejects_a_copy():
    bench = load("bench_dlpack")
    t = torch.ones(256)
    copied = jnp.asarray(t.numpy().copy())
    with pytest.raises(AssertionError, match="does not share"):
        bench._check_tensor_to_jax(t, copied)
    with pytest.raises(AssertionError, match="does not share"):
        bench._check_jax_to_tensor(copied, t)


def test_run_selects_scripts_by_name():
    run = load("run")
    script = BENCHMARKS / "bench_dlpack.py"
    assert script in run.select([])
    assert run.select(["dlpack"]) == [script]
    assert run.select(["bench_dlpack.py", "dlpack"]) == [script]
    with pytest.raises(SystemExit, match="no benchmark named nosuch; available: .*dlpack"):
        run.select(["nosuch"])


def test_run_readme_is_header_then_results_in_name_order(tmp_path):
    run = load("run")
    (tmp_path / "bench_b.md").write_text("## b\n\n| x |\n")
    (tmp_path / "bench_a.md").write_text("## a\n\n| y |\n")
    (tmp_path / "bench_a.md.tmp").write_text("half-written")
    readme = run.render_readme(tmp_path, tmp_path / "no probes")
    assert readme.startswith(run.HEADER)
    assert readme[len(run.HEADER) :] == "\n## a\n\n| y |\n\n## b\n\n| x |\n"
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "p.md").write_text("## p\n")
    with_probes = run.render_readme(tmp_path, tmp_path / "probes")
    assert with_probes == readme + "\n" + run.PROBES_HEADER + "\n## p\n"


def test_bench_torch_to_jax_quick_mode_checks_parity_and_writes_every_table(tmp_path):
    text = _run_quick("bench_torch_to_jax", tmp_path)
    rows = table_rows(text)
    speed = [r for r in rows if r[1] in ("forward", "training step")]
    assert [(r[0].split(",")[0], r[1]) for r in speed] == [
        ("GPT-2 tiny", "forward"), ("GPT-2 tiny", "training step"),
        ("ResNet-tiny", "forward"), ("ResNet-tiny", "training step"),
    ]
    for row in speed:
        assert all(float(cell.split()[0].replace(",", "")) > 0 for cell in row[2:5]), row
    # conversion cost, memory and dispatch tables, and one verdict per target
    assert sum(r[0].startswith(("GPT-2 tiny", "ResNet-tiny")) for r in rows) == 8
    assert any(r[0].startswith("MLP 64-64-64-64") for r in rows)
    targets = text.split("Targets:")[1]
    assert targets.count(": met") + targets.count(": **missed**") == 11


def test_bench_hybrid_quick_mode_checks_gradients_and_times_every_form(tmp_path):
    text = _run_quick("bench_hybrid", tmp_path)
    rows = table_rows(text)
    forms = ["full translation", "hybrid (1 op in torch)", "callback mode", "torch eager"]
    assert [(r[0], r[1]) for r in rows] == [(w, f) for w in ("forward", "forward + backward") for f in forms]
    assert "compiled one program with 1 custom_call(s)" in text


def test_bench_export_quick_mode_checks_parity_and_times_every_form(tmp_path):
    # Compiling without XLA's backend optimizations keeps this smoke test fast; the
    # programs, the parity checks and the table are the same.
    env = {
        **os.environ, "BRIDGE_BENCH_QUICK": "1", "BRIDGE_BENCH_RESULTS": str(tmp_path),
        "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
    }
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_export.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [p.name for p in tmp_path.iterdir()] == ["bench_export.md"]
    text = (tmp_path / "bench_export.md").read_text()
    rows = table_rows(text)
    forward = ["torch_to_jax", "checks=False", "source: `model.apply`", "source: `jax.jit(model.apply)`",
               "stablehlo: `model.apply`", "stablehlo: `jax.jit(model.apply)`"]
    train = ["torch_to_jax", "checks=False", "source", "stablehlo"]
    expected = [("forward", f) for f in forward] + [("training step", f) for f in train]
    assert len(rows) == 2 * len(expected)
    for model, half in (("GPT-2 tiny", rows[:10]), ("ResNet-tiny", rows[10:])):
        for row, (work, form) in zip(half, expected, strict=True):
            assert row[0].startswith(model) and row[1] == work and form in row[2], row
            assert float(row[3].split()[0].replace(",", "")) > 0, row
            assert row[4].endswith("x"), row
    assert "the same HLO once names are removed" in text
    targets = text.split("Targets (")[1]
    assert targets.count(": met") + targets.count(": **not met**") == 16
    assert targets.count("same forward outputs") == targets.count("same first training loss") == 2
