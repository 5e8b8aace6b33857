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
other exception is ours, except where `KNOWN` below names the limitation.

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

pytestmark = pytest.mark.slow

# Every entry that does not simply pass, with its reason, in one place.
# Keys are OpInfo ids (`name` or `name.variant`) with the mode: "forward",
# "grad", or "both". "skip" entries are not run; "xfail" entries are run, and
# a pass is recorded as a pass (the entry is then stale: delete it).
# "data-dependent" entries are run: samples whose output shape (or a Python
# number) depends on tensor values are left out, as torch's rejected samples
# are, when they fail with one of DATA_DEPENDENT_ERRORS; the others must pass.
SKIP, XFAIL, DATA_DEPENDENT = "skip", "xfail", "data-dependent"
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
_STATIC = "JAX arrays have static shapes under jit"
KNOWN: dict[tuple[str, str], tuple[str, str]] = {
    # Output shapes that depend on tensor values.
    ("masked_select", "both"): (DATA_DEPENDENT, f"output length = number of True values; {_STATIC}"),
    ("combinations", "both"): (DATA_DEPENDENT, f"decomposes into masked_select; {_STATIC}"),
    ("nonzero", "both"): (DATA_DEPENDENT, f"output length = number of nonzeros; {_STATIC}"),
    ("argwhere", "both"): (DATA_DEPENDENT, f"output length = number of nonzeros; {_STATIC}"),
    ("unique", "both"): (DATA_DEPENDENT, f"output length = number of distinct values; {_STATIC}"),
    ("unique_consecutive", "both"): (DATA_DEPENDENT, f"output length = number of runs; {_STATIC}"),
    ("item", "both"): (DATA_DEPENDENT, "returns a Python number, which a traced JAX function cannot"),
    ("tensor_split", "both"): (DATA_DEPENDENT, f"samples with tensor split points: {_STATIC}"),
    # References torch itself marks wrong.
    ("as_strided_scatter", "grad"): (
        XFAIL,
        "torch's own OpInfo marks this gradient expectedFailure (TestBwdGradients.test_fn_grad): "
        "torch's backward of as_strided_scatter is not the true derivative",
    ),
    ("as_strided.partial_views", "both"): (
        XFAIL,
        "a view whose as_strided reaches storage outside the view (sample 1) "
        "raises NotImplementedError: the lowering sees only its input, not the base it views",
    ),
    # Dtypes JAX does not have.
    ("chalf", "both"): (SKIP, "complex32: JAX has no complex32 dtype"),
    # Limitations of torch.export that the bridge reports rather than hides.
    ("nn.functional.instance_norm", "both"): (
        XFAIL,
        "torch.export drops instance_norm's running-statistics update in training mode; "
        "the bridge raises NotImplementedError instead of returning stale statistics",
    ),
    # Inputs torch.export cannot take.
    ("sparse.sampled_addmm", "both"): (SKIP, "sparse tensors: torch.export has no sparse layouts"),
    ("sparse.mm.reduce", "both"): (SKIP, "sparse tensors: torch.export has no sparse layouts"),
    ("to_sparse", "both"): (SKIP, "sparse tensors: torch.export has no sparse layouts"),
    # Limitations of JAX (named), not of the lowerings.
    ("linalg.ldl_factor", "both"): (XFAIL, "JAX has no LDL^T (LAPACK sytrf) factorisation"),
    ("linalg.ldl_factor_ex", "both"): (XFAIL, "JAX has no LDL^T (LAPACK sytrf) factorisation"),
    ("linalg.ldl_solve", "both"): (XFAIL, "JAX has no LDL^T (LAPACK sytrs) solve"),
    ("linalg.eig", "grad"): (XFAIL, "JAX's eig defines no derivative of the eigenvectors"),
    ("linalg.eigvals", "grad"): (
        XFAIL,
        "ATen's linalg_eig always computes eigenvectors, and JAX's eig defines no derivative then",
    ),
    ("linalg.householder_product", "grad"): (XFAIL, "JAX defines no derivative of householder_product"),
    ("ormqr", "grad"): (XFAIL, "JAX defines no derivative of ormqr (Householder products)"),
    ("geqrf", "both"): (XFAIL, "JAX has geqrf only as a private API (jax._src.lax.linalg)"),
    # Random ops: their samples draw from torch's generator, which JAX cannot replay.
    ("svd_lowrank", "both"): (SKIP, "draws torch.randn: output depends on torch's RNG stream"),
    ("pca_lowrank", "both"): (SKIP, "draws torch.randn: output depends on torch's RNG stream"),
    # Limitations of capture (bridge/capture.py), see the issue note of #4.
    ("lu_unpack", "both"): (XFAIL, "capture exports JAX int32 pivots as int64; torch requires int32"),
    ("linalg.lu_solve", "both"): (XFAIL, "capture exports JAX int32 pivots as int64; torch requires int32"),
    ("lu_solve", "both"): (XFAIL, "capture exports JAX int32 pivots as int64; torch requires int32"),
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


def known(name: str, mode: str) -> tuple[str, str] | None:
    return KNOWN.get((name, mode)) or KNOWN.get((name, "both"))


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
    if entry is not None and entry[0] == SKIP:
        _record(op=name, mode=mode, status="skip", reason=entry[1])
        pytest.skip(entry[1])
    counts = {"passed": 0, "eager": 0, "export": 0, "x64": 0, "data_dependent": 0}
    failures: list[str] = []
    start = time.monotonic()
    for dtype in dtypes_for(op):
        for k, sample in enumerate(itertools.islice(harness.samples(op, dtype), MAX_SAMPLES)):
            try:
                harness.check_sample(op, sample, grad=mode == "grad")
                counts["passed"] += 1
            except harness.NeedsX64:
                counts["x64"] += 1  # float64 inputs: run by the x64 sweep (BRIDGE_CONFORMANCE=full)
                continue
            except Exception as e:  # classified below, nothing is swallowed
                if entry is not None and entry[0] == DATA_DEPENDENT and _data_dependent(e):
                    counts["data_dependent"] += 1
                    continue
                origin = _origin(e)
                if origin == "eager" or (origin == "export" and (entry is None or entry[0] == DATA_DEPENDENT)):
                    counts[origin] += 1
                    continue
                msg = (str(e).strip().splitlines() or [""])[0][:300]
                failures.append(f"{dtype} sample {k}: {type(e).__name__}: {msg}")
    total = counts["passed"] + len(failures)
    seconds = round(time.monotonic() - start, 2)
    row = dict(op=name, mode=mode, **counts, failed=len(failures), first_failure=failures[:1], seconds=seconds)
    if failures:
        xfail = entry is not None and entry[0] == XFAIL
        status, reason = (XFAIL, entry[1]) if xfail else ("fail", failures[0])
        _record(**row, status=status, reason=reason)
        if xfail:
            pytest.xfail(f"{entry[1]} ({len(failures)}/{total} samples fail)")
        pytest.fail(f"{len(failures)}/{total} samples fail:\n" + "\n".join(failures[:10]), pytrace=False)
    if total == 0:
        if counts["data_dependent"]:
            reason = f"{DATA_DEPENDENT}: {entry[1]}"
        elif counts["export"]:
            reason = "torch cannot export"
        elif counts["x64"]:
            reason = "every sample has float64 inputs (run with x64 by BRIDGE_CONFORMANCE=full)"
        else:
            reason = "torch rejects every sample"
        _record(**row, status="skip", reason=reason)
        pytest.skip(reason)
    _record(**row, status="pass", reason="")
