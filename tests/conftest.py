"""Test collection shared by both environments.

`make test-xla` runs in the torch_xla environment, which has neither
transformers nor optax/flax: modules that need them are not collected there.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests/models.py, opinfo_harness.py
# benchmark scripts imported as modules by test_benchmarks.py find benchmarks/common.py
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

_NEEDS = {
    "test_transformers_models.py": ["transformers"],
    "test_examples.py": ["transformers", "optax"],
    "test_jax_to_torch.py": ["optax", "flax"],
    "test_examples_jax_to_torch.py": ["optax", "flax"],
    "test_readme.py": ["optax"],
    "test_dlpack.py": ["hypothesis"],
}

# torch's autograd engine sizes its per-device queues at the first backward:
# torch_xla must register its device before any test runs one, or backward
# on XLA tensors later fails an internal assert in engine.cpp.
if importlib.util.find_spec("torch_xla") is not None and os.environ.get("PJRT_DEVICE"):
    import torch_xla

    torch_xla.device()  # starts the runtime, which registers the device

collect_ignore = [
    name for name, modules in _NEEDS.items() if any(importlib.util.find_spec(m) is None for m in modules)
]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After a sweep of tests/test_opinfo.py, print its totals per mode."""
    totals: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if "test_opinfo.py::test_opinfo[" not in nodeid or report.when not in ("call", "setup"):
                continue
            mode = nodeid.rstrip("]").rsplit("-", 1)[-1]
            totals.setdefault(mode, {}).setdefault(outcome, 0)
            totals[mode][outcome] += 1
    if not totals:
        return
    terminalreporter.section("OpInfo conformance totals (entries)")
    for mode, counts in sorted(totals.items()):
        run = sum(counts.get(k, 0) for k in ("passed", "failed", "xfailed", "xpassed"))
        line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(
            f"{mode}: {line}; passing {counts.get('passed', 0)}/{run} of the entries run "
            "(tools/coverage.py gives the rates over exportable entries)"
        )
