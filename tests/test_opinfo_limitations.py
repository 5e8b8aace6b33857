"""The KNOWN table of tests/opinfo_limitations.py: its entries exist, and its
staleness rules catch an entry that no longer matches a real failure."""

from __future__ import annotations

import opinfo_harness as harness
import pytest
import torch
from opinfo_limitations import KNOWN, Kind, Limitation, Outcome, Result, judge, known

F32 = torch.float32
PASSED, FAILED, DATA = Outcome.PASSED, Outcome.FAILED, Outcome.DATA_DEPENDENT


def results(*outcomes: Outcome, dtype: torch.dtype = F32) -> list[Result]:
    return [Result(dtype, k, o) for k, o in enumerate(outcomes)]


def test_every_known_entry_names_an_opinfo_entry_and_a_mode_it_has():
    ops = {harness.entry_id(op): op for op in harness.op_db()}
    for name, limitation in KNOWN.items():
        assert name in ops, f"KNOWN entry {name!r}: no OpInfo entry has that id"
        # Every entry has a forward test; one that names only grad needs a grad test.
        if "forward" not in limitation.modes:
            assert ops[name].supports_autograd, f"KNOWN entry {name!r}: grad, but torch defines no gradient"


def test_known_looks_up_by_mode():
    assert known("linalg.eig", "grad") is KNOWN["linalg.eig"]
    assert known("linalg.eig", "forward") is None
    assert known("geqrf", "forward") is known("geqrf", "grad") is KNOWN["geqrf"]
    assert known("add", "forward") is None


def test_limitation_rejects_unknown_modes_and_empty_reasons():
    with pytest.raises(ValueError, match="modes"):
        Limitation(Kind.XFAIL, "why", modes=("backward",))
    with pytest.raises(ValueError, match="reason"):
        Limitation(Kind.XFAIL, "")


def test_xfail_without_samples_is_stale_when_every_sample_run_passes():
    xfail = Limitation(Kind.XFAIL, "JAX lacks it")
    assert judge(xfail, results(PASSED, FAILED), complete=False).status == "xfail"
    assert judge(xfail, results(FAILED), complete=False).status == "xfail"
    for complete in (False, True):  # the run samples decide, whatever the budget
        verdict = judge(xfail, results(PASSED), complete=complete)
        assert verdict.status == "stale"
        assert verdict.reason.startswith("stale KNOWN entry: delete it")
    assert judge(xfail, [], complete=True).status == "pass"  # nothing ran: nothing to judge


def test_xfail_with_samples_allows_exactly_those_to_fail():
    partial = Limitation(Kind.XFAIL, "sample 1 reaches outside its view", samples=frozenset({1}))
    assert judge(partial, results(PASSED, FAILED, PASSED), complete=True).status == "xfail"
    assert judge(partial, results(PASSED), complete=False).status == "pass"  # sample 1 did not run
    wrong = judge(partial, results(FAILED, FAILED), complete=True)  # sample 0 is not listed
    assert wrong.status == "fail" and wrong.unexpected == (Result(F32, 0, FAILED),)
    stale = judge(partial, results(PASSED, PASSED), complete=False)  # listed sample 1 ran and passed
    assert stale.status == "stale" and "[1]" in stale.reason


def test_xfail_with_dtypes_speaks_only_for_those_dtypes():
    f64 = Limitation(Kind.XFAIL, "float64 only", dtypes=frozenset({torch.float64}))
    assert judge(f64, results(FAILED), complete=True).status == "fail"  # a float32 failure is real
    assert judge(f64, results(FAILED, dtype=torch.float64), complete=True).status == "xfail"
    assert judge(f64, results(PASSED, dtype=torch.float64), complete=True).status == "stale"
    assert judge(f64, results(PASSED), complete=True).status == "pass"  # float64 did not run


def test_data_dependent_is_stale_only_when_every_sample_ran():
    dd = Limitation(Kind.DATA_DEPENDENT, "output length depends on values")
    assert judge(dd, results(PASSED, DATA), complete=True).status == "pass"
    assert judge(dd, results(PASSED), complete=False).status == "pass"  # the CI's sample budget
    assert judge(dd, results(PASSED, PASSED), complete=True).status == "stale"
    assert judge(dd, results(DATA, FAILED), complete=True).status == "fail"  # the others must pass


def test_failures_without_an_entry_fail_and_skips_are_not_judged():
    assert judge(None, results(PASSED, FAILED), complete=True).status == "fail"
    assert judge(None, results(PASSED), complete=True).status == "pass"
    skip = Limitation(Kind.SKIP, "complex32")
    assert judge(skip, results(FAILED), complete=True).status == "fail"  # a skip explains no failure
    assert judge(skip, [], complete=True).status == "pass"


def test_a_deliberately_wrong_entry_is_caught():
    # add passes every sample: an XFAIL entry for it is stale, a DATA_DEPENDENT
    # one too once every sample ran.
    (op,) = harness.find_ops("add")
    ran = []
    for k, sample in enumerate(harness.samples(op, F32)):
        if k == 2:
            break
        harness.check_sample(op, sample)
        ran.append(Result(F32, k, PASSED))
    assert judge(Limitation(Kind.XFAIL, "wrong"), ran, complete=False).status == "stale"
    assert judge(Limitation(Kind.DATA_DEPENDENT, "wrong"), ran, complete=True).status == "stale"
    assert judge(Limitation(Kind.XFAIL, "wrong", samples=frozenset({1})), ran, complete=False).status == "stale"
