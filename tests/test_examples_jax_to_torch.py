"""examples/train_flax_in_torch.py runs and its loss falls (eager and compiled)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_flax_in_torch.py"


@pytest.mark.parametrize("flags", [[], ["--compile"]], ids=["eager", "compiled"])
def test_train_flax_in_torch_loss_falls(flags):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "60", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=EXAMPLE.parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "down.kernel" in result.stdout  # Flax names became torch parameter names
    match = re.search(r"loss: ([\d.]+) -> ([\d.]+) \(eval\), accuracy ([\d.]+)", result.stdout)
    assert match, result.stdout
    first, final, accuracy = map(float, match.groups())
    assert final < 0.8 * first
    assert accuracy > 0.6
