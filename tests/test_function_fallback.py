"""Plain functions that torch.export stops on a tensor's value: specialise, keep one op, or fall back.

Three outcomes, most exact first (docs/callback.md, "Capture fallback"):

- a guard on which one outcome makes torch raise (input validation, as in
  `F.gaussian_nll_loss`) is specialised: capture assumes the other outcome and
  the program checks it on every call, raising torch's own error when an input
  would take the raising branch (bridge/specialise.py);
- a composite ATen op whose decomposition tests values (`aten.cov`,
  `aten.corrcoef`) stays one node with its shapes from torch, and is lowered
  (or, without a lowering and outside strict mode, runs through a callback);
- a real branch on a value runs the whole function in torch through a callback
  (not in strict mode), with one warning.

Forward parity in float32 (1e-5 relative), gradients against torch.autograd in
float64 on both sides.
"""

from __future__ import annotations

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import enable_x64

import bridge
from bridge.fallback import FallbackError
from bridge.interpreter import UnsupportedOpsError
from bridge.ops import LOWERINGS
from bridge.ops.registry import DataDependentShapeError

FWD = dict(rtol=1e-5, atol=1e-6)
aten = torch.ops.aten


def _np(x) -> np.ndarray:
    return np.asarray(x)


def _float64_grads(fn, args, argnums=(0,), strict=True):
    """jax.grad (jit, x64) of a fixed random projection of fn's output, and torch.autograd's, in float64."""
    args64 = [a.double().clone().requires_grad_(i in argnums) if a.is_floating_point() else a
              for i, a in enumerate(args)]
    out = fn(*args64)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.autograd.grad((out * weight).sum(), [args64[i] for i in argnums])
    with enable_x64(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jfn = bridge.torch_to_jax(fn, strict=strict)
        jargs = [bridge.to_jax(a.detach()) for a in args64]

        def loss(*diff):
            full = list(jargs)
            for i, a in zip(argnums, diff, strict=True):
                full[i] = a
            return (jfn(*full) * bridge.to_jax(weight)).sum()

        got = jax.jit(jax.grad(loss, argnums=tuple(range(len(argnums)))))(*[jargs[i] for i in argnums])
        got = [np.asarray(g) for g in got]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-9, atol=1e-12)


def _captured(jfn):
    (captured,) = jfn.converted.captures.values()
    return captured


# -- specialising a validation guard


def gaussian_nll(x, target, var):
    return F.gaussian_nll_loss(x, target, var)


def checked_sqrt(x):
    """A user-level validation: torch raises on one side of the guard."""
    if (x < 0).any():
        raise ValueError("checked_sqrt needs non-negative inputs")
    return torch.sqrt(x) * 2


def nll_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.1


def test_a_validation_guard_is_specialised_in_strict_mode_with_parity_and_float64_gradients():
    x, t, v = nll_inputs()
    jfn = bridge.torch_to_jax(gaussian_nll, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: nothing runs in torch
        out = jax.jit(jfn)(*bridge.to_jax([x, t, v]))
    np.testing.assert_allclose(_np(out), gaussian_nll(x, t, v).numpy(), **FWD)
    (assumption,) = _captured(jfn).assumptions
    assert assumption.value is False and assumption.error is ValueError
    assert "gaussian_nll_loss" in assumption.source and "torch.any(var < 0)" in assumption.source
    ops = {str(n.target) for n in _captured(jfn).program.graph.nodes}
    assert "bridge_fallback.call.default" not in ops
    _float64_grads(gaussian_nll, (x, t, v), argnums=(0, 2))


def test_a_violated_specialisation_raises_torchs_error_eagerly_and_under_jit():
    x, t, v = nll_inputs()
    jfn = bridge.torch_to_jax(gaussian_nll, strict=True)
    args = bridge.to_jax([x, t, v])
    jfn(*args)
    bad = bridge.to_jax([x, t, v.clone().index_fill_(0, torch.tensor([1]), -0.5)])
    with pytest.raises(ValueError, match="var has negative entry") as info:
        jfn(*bad)
    assert "assumed" in str(info.value) and "checks it on every call" in str(info.value)
    with pytest.raises(Exception, match="var has negative entry"):
        jax.block_until_ready(jax.jit(jfn)(*bad))
    # and the valid input still computes afterwards
    np.testing.assert_allclose(_np(jax.jit(jfn)(*args)), gaussian_nll(x, t, v).numpy(), **FWD)


def test_checks_false_leaves_the_assumption_out_like_every_check_and_export_writes_it(tmp_path):
    x, t, v = nll_inputs()
    jfn = bridge.torch_to_jax(gaussian_nll, strict=True, checks=False)
    np.testing.assert_allclose(_np(jfn(*bridge.to_jax([x, t, v]))), gaussian_nll(x, t, v).numpy(), **FWD)
    # an input torch refuses computes without the check (torch clamps var to eps after its test)
    unchecked = jax.block_until_ready(jax.jit(jfn)(*bridge.to_jax([x, t, -v])))
    np.testing.assert_allclose(_np(unchecked), gaussian_nll(x, t, torch.full_like(v, 1e-6)).numpy(), **FWD)
    # no host callback is left, so both export formats write it out and run it
    for fmt in ("source", "stablehlo"):
        folder = bridge.export(gaussian_nll, x, t, v, path=tmp_path / fmt, format=fmt)
        spec = importlib.util.spec_from_file_location(f"exported_nll_{fmt}", folder / "model.py")
        model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(model)
        params, _ = model.load()
        out = model.apply(params, *bridge.to_jax([x, t, v]))
        np.testing.assert_allclose(_np(out), gaussian_nll(x, t, v).numpy(), **FWD)
    jaxpr = str(jax.make_jaxpr(jfn)(*bridge.to_jax([x, t, v])))
    assert "callback" not in jaxpr


def asserts_positive_sum(x):
    torch._assert_async(x.sum() > 0, "sum must be positive")
    return x * 2


def test_an_assert_on_a_tensor_value_is_a_run_time_check_that_checks_false_leaves_out():
    jfn = bridge.torch_to_jax(asserts_positive_sum, strict=True)
    good, bad = jnp.ones(3), -jnp.ones(3)
    np.testing.assert_array_equal(_np(jax.jit(jfn)(good)), [2.0, 2.0, 2.0])
    with pytest.raises(AssertionError, match="sum must be positive"):
        jfn(bad)
    with pytest.raises(Exception, match="sum must be positive"):
        jax.block_until_ready(jax.jit(jfn)(bad))
    unchecked = bridge.torch_to_jax(asserts_positive_sum, strict=True, checks=False)
    np.testing.assert_array_equal(_np(jax.jit(unchecked)(bad)), [-2.0, -2.0, -2.0])
    assert "callback" not in str(jax.make_jaxpr(unchecked)(good))


def test_a_user_validation_is_specialised_and_works_under_grad_and_vmap():
    x = torch.rand(3, 4) + 0.5
    jfn = bridge.torch_to_jax(checked_sqrt, strict=True)
    X = bridge.to_jax(x)
    np.testing.assert_allclose(_np(jfn(X)), checked_sqrt(x).numpy(), **FWD)
    np.testing.assert_allclose(_np(jax.vmap(jfn)(X)), checked_sqrt(x).numpy(), **FWD)
    g = jax.grad(lambda a: jfn(a).sum())(X)
    np.testing.assert_allclose(_np(g), (1 / torch.sqrt(x)).numpy(), **FWD)
    with pytest.raises(ValueError, match="checked_sqrt needs non-negative inputs"):
        jfn(-X)
    with pytest.raises(Exception, match="checked_sqrt needs non-negative inputs"):
        jax.block_until_ready(jax.vmap(jfn)(X.at[2, 1].set(-1.0)))
    _float64_grads(checked_sqrt, (x,))


# -- a real branch: the whole function runs in torch


def branchy(x):
    if x.sum() > 0:
        return torch.tanh(x) * 2
    return -x


def test_a_real_branch_is_not_specialised_and_strict_mode_raises_the_capture_error():
    jfn = bridge.torch_to_jax(branchy, strict=True)
    with pytest.raises(bridge.CaptureError, match=r"if x.sum\(\) > 0"):
        jfn(jnp.ones((2, 3)))


def test_a_real_branch_falls_back_to_torch_with_one_warning_and_computes_both_branches():
    x = torch.randn(3, 4)
    x = x if x.sum() > 0 else -x
    jfn = bridge.torch_to_jax(branchy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(jfn)(bridge.to_jax(x))
    messages = [str(w.message) for w in caught if "cannot capture" in str(w.message)]
    assert len(messages) == 1 and "branchy" in messages[0] and "if x.sum() > 0" in messages[0]
    np.testing.assert_allclose(_np(out), branchy(x).numpy(), **FWD)
    np.testing.assert_allclose(_np(jax.jit(jfn)(bridge.to_jax(-x))), branchy(-x).numpy(), **FWD)
    _float64_grads(branchy, (x,), strict=False)
    _float64_grads(branchy, (-x,), strict=False)


def test_vmap_of_a_fallen_back_branch_on_a_batched_value_is_a_clear_error():
    jfn = bridge.torch_to_jax(branchy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(bridge.callback.CallbackError, match="data-dependent control flow"):
            jax.vmap(jfn)(jnp.ones((2, 3)))


# -- values that cannot come back, and shapes that depend on values


def equal(a, b):
    return torch.equal(a, b)


def sign_of_sum(x):
    return 1.0 if x.sum() > 0 else -1.0


@pytest.mark.parametrize("fn", [equal, sign_of_sum], ids=["equal", "branch"])
def test_a_python_number_computed_from_data_is_a_clear_error(fn):
    args = [jnp.ones((2, 3))] * (2 if fn is equal else 1)
    with pytest.raises(FallbackError, match="returns a Python (bool|float)"):
        bridge.torch_to_jax(fn)(*args)
    with pytest.raises(FallbackError, match="returns a Python"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jax.vmap(bridge.torch_to_jax(fn))(*[jnp.ones((4, 2, 3))] * len(args))


def test_an_output_shape_that_depends_on_values_keeps_its_clear_error():
    jfn = bridge.torch_to_jax(torch.nonzero)
    with pytest.raises(DataDependentShapeError, match="nonzero"):
        jax.jit(jfn)(jnp.ones((2, 3)))
    with pytest.raises(DataDependentShapeError, match="nonzero"):
        jfn(jnp.ones((2, 3)))


# -- one composite op kept whole: cov and corrcoef


def test_cov_and_corrcoef_translate_in_strict_mode_with_parity_grad_vmap_and_float64_gradients():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    for fn in (torch.cov, torch.corrcoef):
        jfn = bridge.torch_to_jax(fn, strict=True)
        X = bridge.to_jax(x)
        np.testing.assert_allclose(_np(jax.jit(jfn)(X)), fn(x).numpy(), **FWD)
        targets = {str(n.target) for n in _captured(jfn).program.graph.nodes}
        assert f"aten.{fn.__name__}.default" in targets
        batch = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(4))
        np.testing.assert_allclose(_np(jax.vmap(jfn)(bridge.to_jax(batch))),
                                   torch.stack([fn(b) for b in batch]).numpy(), **FWD)
        _float64_grads(fn, (x,))


def weighted_cov(x, fw, aw):
    return torch.cov(x, correction=2, fweights=fw, aweights=aw)


def test_weighted_cov_and_its_run_time_weight_checks():
    g = torch.Generator().manual_seed(5)
    x, fw, aw = torch.randn(2, 5, generator=g), torch.randint(1, 4, (5,), generator=g), torch.rand(5, generator=g)
    jfn = bridge.torch_to_jax(weighted_cov, strict=True)
    np.testing.assert_allclose(_np(jfn(*bridge.to_jax([x, fw, aw]))), weighted_cov(x, fw, aw).numpy(), **FWD)
    _float64_grads(weighted_cov, (x, fw, aw), argnums=(0, 2))
    with pytest.raises(RuntimeError, match="fweights cannot be negative"):
        jfn(*bridge.to_jax([x, -fw, aw]))
    with pytest.raises(RuntimeError, match="weights sum to zero"):
        jfn(*bridge.to_jax([x, fw, torch.zeros(5)]))


def test_cov_with_no_degrees_of_freedom_divides_by_zero_like_torch():
    x = torch.randn(2, 2)
    fn = lambda a: torch.cov(a, correction=3)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = fn(x)
    np.testing.assert_array_equal(_np(bridge.torch_to_jax(fn, strict=True)(bridge.to_jax(x))), expected.numpy())


def test_a_kept_op_without_lowering_runs_through_a_callback_or_is_a_strict_error(monkeypatch):
    monkeypatch.delitem(LOWERINGS, aten.cov.default)
    x = torch.randn(3, 5)
    with pytest.raises(UnsupportedOpsError, match=r"aten\.cov\.default"):
        bridge.torch_to_jax(torch.cov, strict=True)(bridge.to_jax(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(bridge.torch_to_jax(torch.cov))(bridge.to_jax(x))
    assert any("aten.cov.default" in str(w.message) for w in caught)
    np.testing.assert_allclose(_np(out), torch.cov(x).numpy(), **FWD)


def ctc(log_probs, targets, input_lengths, target_lengths):
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths)


def test_ctc_loss_is_kept_whole_and_runs_in_torch_outside_strict_mode():
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(6, 2, 5, generator=g).log_softmax(2)
    args = (log_probs, torch.randint(1, 5, (2, 3), generator=g), torch.tensor([6, 5]), torch.tensor([3, 2]))
    with pytest.raises(UnsupportedOpsError, match=r"aten\.ctc_loss"):
        bridge.torch_to_jax(ctc, strict=True)(*bridge.to_jax(list(args)))
    jfn = bridge.torch_to_jax(ctc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(jfn)(*bridge.to_jax(list(args)))
    assert any("aten.ctc_loss" in str(w.message) for w in caught)
    np.testing.assert_allclose(_np(out), ctc(*args).numpy(), **FWD)
    targets = {str(n.target) for n in _captured(jfn).program.graph.nodes}
    assert "aten.ctc_loss.Tensor" in targets and "bridge_fallback.call.default" not in targets
    _float64_grads(ctc, args, strict=False)


def narrow_at(x, start):
    return torch.narrow(x, 0, start, 2) * 3


def test_narrow_with_a_tensor_start_runs_in_torch_outside_strict_mode():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(bridge.CaptureError, match="as a Python number"):
        bridge.torch_to_jax(narrow_at, strict=True)(bridge.to_jax(x), jnp.asarray(1))
    jfn = bridge.torch_to_jax(narrow_at)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in (1, 3):
            out = jax.jit(jfn)(bridge.to_jax(x), jnp.asarray(start))
            np.testing.assert_allclose(_np(out), narrow_at(x, torch.tensor(start)).numpy(), **FWD)
    _float64_grads(narrow_at, (x, torch.tensor(2)), strict=False)


def reads_numpy_on_one_side(x):
    """One side of the guard fails only while tracing (a value read), not in torch: a real branch."""
    if (x > 0).all():
        return x * 2
    return x * float(x.detach().numpy().max())


def test_a_side_that_fails_only_while_tracing_is_not_taken_for_validation():
    x = torch.rand(2, 3) + 0.1
    jfn = bridge.torch_to_jax(reads_numpy_on_one_side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jfn(bridge.to_jax(x))
    assert any("cannot capture the function reads_numpy_on_one_side" in str(w.message) for w in caught)
    np.testing.assert_allclose(_np(out), reads_numpy_on_one_side(x).numpy(), **FWD)
    np.testing.assert_allclose(_np(jfn(bridge.to_jax(-x))), reads_numpy_on_one_side(-x).numpy(), **FWD)


def split_at(x, indices):
    return torch.tensor_split(x, indices)


def test_split_points_read_from_a_tensor_are_a_clear_data_dependent_shape_error():
    x, indices = jnp.ones((6, 2)), jnp.asarray([2, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataDependentShapeError, match="depends on tensor values"):
            jax.jit(bridge.torch_to_jax(split_at))(x, indices)
