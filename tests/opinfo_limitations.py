"""The OpInfo entries that do not simply pass through the bridge, as typed entries.

`KNOWN` maps an OpInfo id (`name` or `name.variant`, as
`opinfo_harness.entry_id` spells it) to its `Limitation`: what kind it is,
why, and which modes, dtypes and sample indices it covers. Modelled on
jax2tf's `Jax2TfLimitation`: an entry must keep matching a real failure, and
`judge` reports one that no longer does ("stale KNOWN entry: delete it").

Kinds:

- `SKIP`: the covered samples are not run (a skip of the whole test when the
  entry names no dtypes and no samples). They cannot be checked by running;
  tests/test_opinfo_limitations.py checks that the entry and mode exist.
- `XFAIL`: the covered samples run and may fail. Without `samples`, at least
  one covered sample that runs must fail, or the entry is stale. With
  `samples`, exactly those sample indices may fail: each of them that runs
  must fail, and every other sample must pass.
- `DATA_DEPENDENT`: the covered samples run; a sample whose output shape (or
  a Python number) depends on tensor values is left out, as torch's rejected
  samples are, and the others must pass. Without `samples` the entry is
  stale when every sample ran (`complete`) and none was data-dependent; with
  `samples`, each listed sample that runs must be data-dependent.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

MODES = ("forward", "grad")


class Kind(enum.Enum):
    SKIP = "skip"
    XFAIL = "xfail"
    DATA_DEPENDENT = "data-dependent"


@dataclass(frozen=True)
class Limitation:
    """Why an OpInfo entry does not pass, and for which modes, dtypes and samples."""

    kind: Kind
    reason: str
    modes: tuple[str, ...] = MODES
    dtypes: frozenset[torch.dtype] | None = None  # None: every dtype
    samples: frozenset[int] | None = None  # None: every sample; else the indices it covers

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("a Limitation needs a reason")
        if not self.modes or not set(self.modes) <= set(MODES):
            raise ValueError(f"modes must be a non-empty subset of {MODES}, not {self.modes}")

    def covers(self, dtype: torch.dtype, index: int) -> bool:
        """Whether sample `index` of `dtype` is one this limitation speaks for."""
        return (self.dtypes is None or dtype in self.dtypes) and (self.samples is None or index in self.samples)

    @property
    def whole_test(self) -> bool:
        """Whether it covers every sample of every dtype."""
        return self.dtypes is None and self.samples is None


class Outcome(enum.Enum):
    """What one sample that ran came to (samples torch rejects are not outcomes)."""

    PASSED = "passed"
    FAILED = "failed"
    DATA_DEPENDENT = "data-dependent"


class Result(NamedTuple):
    """One sample's outcome: sample `index` of the entry's samples in `dtype`."""

    dtype: torch.dtype
    index: int
    outcome: Outcome


@dataclass(frozen=True)
class Verdict:
    """`status`: "pass" (nothing to say), "xfail", "fail" (`unexpected` lists the
    results the entry does not explain) or "stale" (`reason` says why)."""

    status: str
    reason: str = ""
    unexpected: tuple[Result, ...] = ()


STALE = "stale KNOWN entry: delete it"


def judge(limitation: Limitation | None, results: Iterable[Result], complete: bool) -> Verdict:
    """The verdict on one test's sample results under its KNOWN entry (None: none).

    `complete` says whether every sample ran (no sample budget).
    """
    results = list(results)
    kind = limitation.kind if limitation is not None else None
    covered = [r for r in results if limitation is not None and limitation.covers(r.dtype, r.index)]
    explained = {
        Kind.XFAIL: {Outcome.FAILED},
        Kind.DATA_DEPENDENT: {Outcome.DATA_DEPENDENT},
    }.get(kind, set())
    unexpected = tuple(
        r for r in results if r.outcome is not Outcome.PASSED and not (r in covered and r.outcome in explained)
    )
    if unexpected:
        return Verdict("fail", unexpected=unexpected)
    if kind not in (Kind.XFAIL, Kind.DATA_DEPENDENT):
        return Verdict("pass")
    shown = [r for r in covered if r.outcome is not Outcome.PASSED]
    if limitation.samples is not None:
        passing = sorted({r.index for r in covered if r.outcome is Outcome.PASSED})
        if passing:
            return Verdict("stale", f"{STALE} (listed sample(s) {passing} pass)")
    elif not shown and covered and (kind is Kind.XFAIL or complete):
        what = "fails" if kind is Kind.XFAIL else "is data-dependent"
        return Verdict("stale", f"{STALE} (no sample {what}: {len(covered)} run)")
    if kind is Kind.XFAIL and shown:
        return Verdict("xfail", limitation.reason)
    return Verdict("pass")


_STATIC = "JAX arrays have static shapes under jit"
_SPARSE = "sparse tensors: torch.export has no sparse layouts"
_TORCH_RNG = "draws torch.randn: output depends on torch's RNG stream"
GRAD = ("grad",)

SKIP, XFAIL, DATA_DEPENDENT = Kind.SKIP, Kind.XFAIL, Kind.DATA_DEPENDENT
KNOWN: dict[str, Limitation] = {
    # Output shapes that depend on tensor values.
    "masked_select": Limitation(DATA_DEPENDENT, f"output length = number of True values; {_STATIC}"),
    "combinations": Limitation(
        XFAIL,
        "its output shape C(n, r) is static, but torch decomposes it into masked_select, which "
        f"JAX cannot take ({_STATIC}); where that decomposition stops torch.export (n < r), capture "
        "keeps aten.combinations whole, which has no lowering yet (strict=False runs it in torch)",
    ),
    "nonzero": Limitation(DATA_DEPENDENT, f"output length = number of nonzeros; {_STATIC}"),
    "argwhere": Limitation(DATA_DEPENDENT, f"output length = number of nonzeros; {_STATIC}"),
    "unique": Limitation(DATA_DEPENDENT, f"output length = number of distinct values; {_STATIC}"),
    "unique_consecutive": Limitation(DATA_DEPENDENT, f"output length = number of runs; {_STATIC}"),
    "item": Limitation(DATA_DEPENDENT, "returns a Python number, which a traced JAX function cannot"),
    "tensor_split": Limitation(DATA_DEPENDENT, f"samples with tensor split points: {_STATIC}"),
    # References torch itself marks wrong.
    "as_strided_scatter": Limitation(
        XFAIL,
        "torch's own OpInfo marks this gradient expectedFailure (TestBwdGradients.test_fn_grad): "
        "torch's backward of as_strided_scatter is not the true derivative",
        modes=GRAD,
    ),
    "as_strided.partial_views": Limitation(
        XFAIL,
        "a view whose as_strided reaches storage outside the view (sample 1) "
        "raises NotImplementedError: the lowering sees only its input, not the base it views",
        samples=frozenset({1}),
    ),
    # Dtypes JAX does not have.
    "chalf": Limitation(SKIP, "complex32: JAX has no complex32 dtype"),
    # Limitations of torch.export that the bridge reports rather than hides.
    "nn.functional.instance_norm": Limitation(
        XFAIL,
        "torch.export drops instance_norm's running-statistics update in training mode; "
        "the bridge raises NotImplementedError instead of returning stale statistics",
    ),
    # Ops capture keeps whole (their decomposition or fake kernel needs values) with no lowering yet.
    "nn.functional.ctc_loss": Limitation(
        XFAIL,
        "aten.ctc_loss has no JAX lowering: capture keeps it whole (aten._ctc_loss has no fake "
        "kernel for its shapes), and strict=True reports the missing lowering; strict=False runs "
        "it in torch through a callback (tests/test_function_fallback.py)",
    ),
    # Inputs torch.export cannot take.
    "sparse.sampled_addmm": Limitation(SKIP, _SPARSE),
    "sparse.mm.reduce": Limitation(SKIP, _SPARSE),
    "to_sparse": Limitation(SKIP, _SPARSE),
    # Limitations of JAX (named), not of the lowerings.
    "linalg.ldl_factor": Limitation(XFAIL, "JAX has no LDL^T (LAPACK sytrf) factorisation"),
    "linalg.ldl_factor_ex": Limitation(XFAIL, "JAX has no LDL^T (LAPACK sytrf) factorisation"),
    "linalg.ldl_solve": Limitation(XFAIL, "JAX has no LDL^T (LAPACK sytrs) solve"),
    "linalg.eig": Limitation(XFAIL, "JAX's eig defines no derivative of the eigenvectors", modes=GRAD),
    "linalg.eigvals": Limitation(
        XFAIL, "ATen's linalg_eig always computes eigenvectors, and JAX's eig defines no derivative then",
        modes=GRAD,
    ),
    "linalg.householder_product": Limitation(
        XFAIL, "JAX defines no derivative of householder_product", modes=GRAD
    ),
    "ormqr": Limitation(XFAIL, "JAX defines no derivative of ormqr (Householder products)", modes=GRAD),
    "geqrf": Limitation(XFAIL, "JAX has geqrf only as a private API (jax._src.lax.linalg)"),
    # Random ops: their samples draw from torch's generator, which JAX cannot replay.
    "svd_lowrank": Limitation(SKIP, _TORCH_RNG),
    "pca_lowrank": Limitation(SKIP, _TORCH_RNG),
}


def known(name: str, mode: str) -> Limitation | None:
    """The limitation of OpInfo entry `name` in `mode`, if KNOWN has one."""
    limitation = KNOWN.get(name)
    return limitation if limitation is not None and mode in limitation.modes else None
