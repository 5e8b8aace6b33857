"""The README's quick start runs as written."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_trains():
    text = README.read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    model, params, loss = scope["model"], scope["params"], scope["loss"]
    # keyed like named_parameters() (JAX returns dicts with sorted keys)
    assert sorted(scope["grads"]) == sorted(n for n, _ in model.named_parameters())
    # the updated params loaded back into torch
    np.testing.assert_allclose(model[0].weight.detach().numpy(), np.asarray(params["0.weight"]), rtol=0, atol=0)
    assert float(loss(params)) >= 0
