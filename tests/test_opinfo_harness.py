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


def test_partial_view_samples_keep_their_storage():
    # as_strided.partial_views sample 2 views 10 elements at offset 5 of a
    # 20-element storage and reads storage elements 10..13: a clone of the
    # view has no element 13, and torch's own call failed in setStorage.
    (op,) = harness.find_ops("as_strided.partial_views")[:1]
    sample = list(harness.samples(op, torch.float32))[2]
    assert harness._partial_view(sample.input)
    fn, tensors = harness._as_function(op, sample)
    assert tensors[0].shape == (sample.input.untyped_storage().nbytes() // 4,)
    torch.testing.assert_close(fn(tensors[0].clone()), op.op(sample.input, *sample.args, **sample.kwargs))
    harness.check_sample(op, sample, grad=True)
    (add,) = harness.find_ops("add")
    assert not harness._partial_view(next(harness.samples(add, torch.float32)).input)


def test_random_samples_are_only_the_dropout_ones_and_must_be_finite():
    (mha,) = harness.find_ops("nn.functional.multi_head_attention_forward")
    name = harness.entry_id(mha)
    found = [harness.draws(name, s) for s in harness.samples(mha, torch.float32)]
    assert True in found and False in found  # deterministic samples are still compared by value
    (sdpa,) = harness.find_ops("nn.functional.scaled_dot_product_attention")
    for s in harness.samples(sdpa, torch.float32):
        assert harness.draws(harness.entry_id(sdpa), s) == (s.kwargs.get("dropout_p", 0.0) > 0)
    (dropout,) = harness.find_ops("nn.functional.dropout")
    for s in harness.samples(dropout, torch.float32):
        expected = s.kwargs.get("training", True) and 0 < s.kwargs.get("p", 0.5) < 1
        assert harness.draws("nn.functional.dropout", s) == expected
    assert {harness.draws("nn.functional.dropout", s) for s in harness.samples(dropout, torch.float32)} == {True, False}
    (add,) = harness.find_ops("add")
    assert not harness.draws("add", next(harness.samples(add, torch.float32)))
    support = harness.RANDOM.get(name, harness._finite)
    assert not support(torch.tensor([1.0, float("nan")]))
    assert not support(torch.tensor([float("inf")]))


def test_number_outputs_are_compared_by_value():
    # broadcast_shapes returns a torch.Size; under jit the bridge returns arrays.
    leaves = harness._number_leaves(torch.Size([5, 1]))
    assert [int(t) for t in leaves] == [5, 1]
    harness._assert_close(jnp.asarray(5), leaves[0], TOL, "out")
    with pytest.raises(AssertionError):
        harness._assert_close(jnp.asarray(4), leaves[0], TOL, "out")
    (op,) = harness.find_ops("broadcast_shapes")
    for sample in harness.samples(op, torch.float32):
        harness.check_sample(op, sample)


def test_data_dependent_errors_need_their_text():
    import test_opinfo

    class UnsupportedOpsError(Exception):
        pass

    assert test_opinfo._data_dependent(UnsupportedOpsError("aten._local_scalar_dense.default cannot be translated"))
    assert test_opinfo._data_dependent(UnsupportedOpsError("aten._unique2.default cannot be translated"))
    assert not test_opinfo._data_dependent(UnsupportedOpsError("aten.tensordot.default cannot be translated"))
    assert not test_opinfo._data_dependent(ValueError("_local_scalar_dense"))


def test_torchs_own_gradient_refusal_is_torchs_and_nothing_else():
    import test_opinfo

    (op,) = harness.find_ops("scatter")
    sample = next(s for s in harness.samples(op, torch.float32) if s.kwargs.get("reduce"))
    with pytest.raises(RuntimeError, match="derivative for aten::scatter is not implemented") as info:
        harness.check_sample(op, sample, grad=True)
    assert test_opinfo._origin(info.value) == "eager"
    with pytest.raises(AssertionError) as wrong:  # a wrong gradient is the bridge's, wherever it is found
        harness._assert_close(jnp.ones(3), torch.zeros(3), harness.GRAD_TOL, "grad of input 0")
    assert test_opinfo._origin(wrong.value) == "bridge"


def test_empty_eigenvectors_and_capture_errors():
    import test_opinfo

    from bridge.capture import CaptureError

    assert harness._gauge(torch.zeros(2, 0, 0)).shape == (2, 0, 0)
    assert test_opinfo._origin(CaptureError("torch.export cannot capture this code")) == "export"
    assert test_opinfo._origin(RuntimeError("torch.export cannot capture this code")) == "bridge"
