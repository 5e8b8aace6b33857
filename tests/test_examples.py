"""Every example runs as written and checks its own results (asserts inside)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quickstart():
    out = run_example("quickstart.py")
    assert "max |jax - torch|" in out and "loss:" in out


@pytest.mark.slow
def test_port_transformers():
    out = run_example("port_transformers.py", "--steps", "5")
    assert "fine-tuning loss" in out
