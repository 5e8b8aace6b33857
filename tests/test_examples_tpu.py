"""examples/tpu_training.py runs end to end (briefly) in each style on CPU backends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "tpu_training.py"


def _run(style: str, steps: int) -> tuple[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--style", style, "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    losses = [float(v) for v in re.findall(rf"\[{style}\] step \d+ loss ([\d.]+)", proc.stdout)]
    return proc.stdout, losses


def test_example_jax_style_trains_fsdp_on_eight_cpu_devices():
    pytest.importorskip("optax")
    out, losses = _run("jax", steps=6)
    assert "[jax] 8 cpu device(s)" in out
    assert "'data'" in out  # the first weight is sharded over the data axis
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]


@pytest.mark.xla
def test_example_torch_xla_style_trains_with_a_jax_block():
    pytest.importorskip("torch_xla")
    out, losses = _run("torch_xla", steps=6)
    assert "[torch_xla] device xla:0" in out
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]
