"""The OpInfo harness's own rules (tests/opinfo_harness.py): each loosening of
"equal to torch eager" is checked to still reject a wrong answer."""

from __future__ import annotations

import jax.numpy as jnp
import opinfo_harness as harness
import pytest
import torch

TOL = harness.FORWARD_TOL


def test_float64_reference_accepts_only_results_at_least_as_close_as_torch():
    truth = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    torch32 = torch.tensor([1.0, 2.0, 3.001])  # torch's float32 result, off by 1e-3
    closer = jnp.asarray([1.0, 2.0, 3.0005], dtype=jnp.float32)
    farther = jnp.asarray([1.0, 2.0, 3.002], dtype=jnp.float32)
    with pytest.raises(AssertionError):
        harness._assert_close(closer, torch32, TOL, "out")  # no reference: plain tolerance
    harness._assert_close(closer, torch32, TOL, "out", reference=truth)
    with pytest.raises(AssertionError):
        harness._assert_close(farther, torch32, TOL, "out", reference=truth)
    with pytest.raises(AssertionError):  # NaN where the truth is a number
        harness._assert_close(jnp.asarray([1.0, 2.0, jnp.nan]), torch32, TOL, "out", reference=truth)


def test_values_false_still_checks_shape_and_dtype():
    harness._assert_close(jnp.zeros(3), torch.ones(3), TOL, "out", values=False)
    with pytest.raises(AssertionError, match="shape"):
        harness._assert_close(jnp.zeros(4), torch.ones(3), TOL, "out", values=False)
    with pytest.raises(AssertionError, match="dtype"):
        harness._assert_close(jnp.zeros(3, jnp.int32), torch.ones(3), TOL, "out", values=False)


def test_gauge_aligns_eigenvector_signs_and_nothing_else():
    v = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    flipped = v * torch.tensor([-1.0, 1.0])
    torch.testing.assert_close(harness._gauge(flipped), harness._gauge(v))
    other = torch.tensor([[0.8, -0.6], [0.6, 0.8]])
    assert not torch.allclose(harness._gauge(other), harness._gauge(v))


def test_mutated_finds_writes_the_schema_does_not_declare():
    (op,) = [o for o in harness.find_ops("native_batch_norm")]
    sample = next(s for s in harness.samples(op, torch.float32) if s.args[-3] is True and s.args[-2] > 0)
    written = harness._mutated(op, sample)
    assert written == {3, 4}  # running_mean, running_var: written by the kernel, not the schema
    (add,) = harness.find_ops("add")
    assert harness._mutated(add, next(harness.samples(add, torch.float32))) == frozenset()


def test_random_support_predicates_reject_values_outside_the_support():
    assert harness.RANDOM["uniform"](torch.tensor([-100.0, 0.0, 100.0]))
    assert not harness.RANDOM["uniform"](torch.tensor([100.5]))
    assert not harness.RANDOM["bernoulli"](torch.tensor([0.5]))
    assert not harness.RANDOM["geometric"](torch.tensor([0.0]))
    assert not harness.RANDOM["randn"](torch.tensor([float("inf")]))
