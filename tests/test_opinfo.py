"""PyTorch's OpInfo database through the bridge: forward and gradient, per entry.

One test per OpInfo entry and mode (`forward`, and `grad` where torch defines
a gradient); each loops over the entry's float32 sample inputs and checks them
with `opinfo_harness.check_sample` (translate, run under `jax.jit`, compare
with torch eager). The CI sweep takes the first `BRIDGE_OPINFO_SAMPLES`
(default 1) samples of each entry to fit its time budget;
`BRIDGE_OPINFO_SAMPLES=all` (`make conformance`) takes every float32 sample;
`BRIDGE_CONFORMANCE=full` takes every sample, in float32, float64 and the
complex, integer and bool dtypes the entry supports.

A sample that torch itself rejects (its eager call or its own autograd
raises) or that `torch.export` cannot capture is not the bridge's business
and is left out; an entry none of whose samples is left ends as a skip. Every
other exception is ours, except where `opinfo_limitations.KNOWN` names the
limitation; an entry there that no longer matches a real failure fails the
test as stale.

`BRIDGE_OPINFO_RESULTS=path.jsonl` appends one JSON line per test (entry,
mode, outcome, sample counts, seconds); `tools/coverage.py` turns it into
docs/ops.md.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
from collections.abc import Iterator

import opinfo_harness as harness
import pytest
import torch
from opinfo_limitations import Kind, Outcome, Result, judge, known

pytestmark = pytest.mark.slow

# Every entry that does not simply pass, with its reason, lives in one place:
# `opinfo_limitations.KNOWN` (typed entries; a stale one fails its test).
# Exception type -> texts one of which its message must contain ("" for any)
# for a sample of a data-dependent entry to count as data-dependent rather
# than failing.
DATA_DEPENDENT_ERRORS = {
    "DataDependentShapeError": ("",),  # the bridge's error for nonzero, masked_select, ...
    "GuardOnDataDependentSymNode": ("",),  # torch.export, on a shape read from a tensor
    "PendingUnbackedSymbolNotFound": ("",),
    # _unique2 / unique_consecutive: lengths set by values; .item() (_local_scalar_dense)
    "UnsupportedOpsError": ("unique", "_local_scalar_dense"),
    "NotImplementedError": ("_local_scalar_dense",),  # .item()
}

FULL = os.environ.get("BRIDGE_CONFORMANCE") == "full"
if FULL:  # float64 samples need JAX's 64-bit mode, switched on before any array exists
    import jax

    jax.config.update("jax_enable_x64", True)
# The CI sweep checks the first MAX_SAMPLES samples of each entry (its time
# budget, about 20 minutes on 2 cores, allows no more); BRIDGE_OPINFO_SAMPLES=all
# (make conformance) checks every float32 sample, the full sweep every sample.
_SAMPLES = os.environ.get("BRIDGE_OPINFO_SAMPLES", "1")
MAX_SAMPLES = None if FULL or _SAMPLES == "all" else int(_SAMPLES)
RESULTS = os.environ.get("BRIDGE_OPINFO_RESULTS")
EXTRA_DTYPES = (torch.float64, torch.complex64, torch.int64, torch.int32, torch.bool)


def dtypes_for(op) -> list[torch.dtype]:
    supported = op.supported_dtypes("cpu")
    extra = [d for d in EXTRA_DTYPES if d in supported] if FULL else []
    return [torch.float32, *extra] if torch.float32 in supported else extra


def _cases() -> Iterator:
    for op in harness.op_db():
        modes = ["forward", "grad"] if op.supports_autograd else ["forward"]
        for mode in modes:
            yield pytest.param(op, mode, id=f"{harness.entry_id(op)}-{mode}")


def _origin(exc: BaseException) -> str:
    """'eager' if torch's own call raised, 'export' if torch.export did, else 'bridge'."""
    if type(exc).__name__ == "CaptureError" and exc.__cause__ is not None:
        exc = exc.__cause__  # the bridge's clear error for what torch.export raised
    frames = traceback.extract_tb(exc.__traceback__)
    if any(f.name == "_mutated" for f in frames):
        return "eager"  # torch's own call, made to find the inputs the op writes into
    for outer, inner in zip(frames, frames[1:], strict=False):
        if outer.name == "check_sample" and (outer.line or "").startswith("expected = fn("):
            return "eager"
        if outer.name == "_check_grad" and (outer.line or "").startswith("expected = torch.autograd.grad("):
            return "eager"  # torch defines no gradient for one of the inputs
        if outer.name == "_check_grad" and (outer.line or "").startswith("torch_out = "):
            return "eager"  # torch's own call with inputs that require grad (scatter with reduce=)
        if outer.name in ("capture", "_export") and inner.name == "export" and "torch/export" in inner.filename:
            return "export"
    # CaptureError: the bridge's wrapper of a torch.export failure (capture.py)
    if type(exc).__name__ in ("DynamicOutputShapeException", "DataDependentOutputException", "CaptureError"):
        return "export"
    return "bridge"


def _data_dependent(exc: BaseException) -> bool:
    needles = DATA_DEPENDENT_ERRORS.get(type(exc).__name__, ())
    return any(needle in str(exc) for needle in needles)


def _record(**row) -> None:
    if RESULTS:
        with open(RESULTS, "a") as f:  # one short write per line: safe under xdist
            f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize(("op", "mode"), list(_cases()))
def test_opinfo(op, mode: str) -> None:
    name = harness.entry_id(op)
    entry = known(name, mode)
    if entry is not None and entry.kind is Kind.SKIP and entry.whole_test:
        _record(op=name, mode=mode, status="skip", reason=entry.reason)
        pytest.skip(entry.reason)
    counts = {"passed": 0, "eager": 0, "export": 0, "x64": 0, "data_dependent": 0}
    results: list[Result] = []
    failures: dict[tuple[torch.dtype, int], str] = {}
    start = time.monotonic()
    for dtype in dtypes_for(op):
        for k, sample in enumerate(itertools.islice(harness.samples(op, dtype), MAX_SAMPLES)):
            covered = entry is not None and entry.covers(dtype, k)
            if covered and entry.kind is Kind.SKIP:
                continue
            try:
                harness.check_sample(op, sample, grad=mode == "grad")
                counts["passed"] += 1
                results.append(Result(dtype, k, Outcome.PASSED))
            except harness.NeedsX64:
                counts["x64"] += 1  # float64 inputs: run by the x64 sweep (BRIDGE_CONFORMANCE=full)
                continue
            except Exception as e:  # classified below, nothing is swallowed
                if covered and entry.kind is Kind.DATA_DEPENDENT and _data_dependent(e):
                    counts["data_dependent"] += 1
                    results.append(Result(dtype, k, Outcome.DATA_DEPENDENT))
                    continue
                origin = _origin(e)
                if origin == "eager" or (origin == "export" and not (covered and entry.kind is Kind.XFAIL)):
                    counts[origin] += 1
                    continue
                msg = (str(e).strip().splitlines() or [""])[0][:300]
                failures[dtype, k] = f"{dtype} sample {k}: {type(e).__name__}: {msg}"
                results.append(Result(dtype, k, Outcome.FAILED))
    verdict = judge(entry, results, complete=MAX_SAMPLES is None)
    total = counts["passed"] + len(failures)
    seconds = round(time.monotonic() - start, 2)
    row = dict(op=name, mode=mode, **counts, failed=len(failures), first_failure=list(failures.values())[:1],
               seconds=seconds)
    if verdict.status == "fail":
        unexpected = [failures[r.dtype, r.index] for r in verdict.unexpected]
        _record(**{**row, "first_failure": unexpected[:1]}, status="fail", reason=unexpected[0])
        pytest.fail(f"{len(unexpected)}/{total} samples fail:\n" + "\n".join(unexpected[:10]), pytrace=False)
    if verdict.status == "stale":
        _record(**{**row, "first_failure": [verdict.reason]}, status="fail", reason=verdict.reason)
        pytest.fail(f"{name} {mode}: {verdict.reason}; KNOWN says: {entry.reason}", pytrace=False)
    if verdict.status == "xfail":
        _record(**row, status=Kind.XFAIL.value, reason=entry.reason)
        pytest.xfail(f"{entry.reason} ({len(failures)}/{total} samples fail)")
    if total == 0:
        if counts["data_dependent"]:
            reason = f"{Kind.DATA_DEPENDENT.value}: {entry.reason}"
        elif counts["export"]:
            reason = "torch cannot export"
        elif counts["x64"]:
            reason = "every sample has float64 inputs (run with x64 by BRIDGE_CONFORMANCE=full)"
        elif entry is not None and entry.kind is Kind.SKIP:
            reason = entry.reason
        else:
            reason = "torch rejects every sample"
        _record(**row, status="skip", reason=reason)
        pytest.skip(reason)
    _record(**row, status="pass", reason="")
