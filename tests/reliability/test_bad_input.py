"""Bad input to torch_to_jax / torch_to_jax_with_state: a clear error at the call
that caused it, naming the problem and the fix; what torch refuses is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from bridge.interpreter import UnsupportedOpsError
from bridge.ops.registry import RefusedByTorchError


def test_a_module_class_instead_of_an_instance_is_refused_at_conversion():
    with pytest.raises(TypeError, match=r"class .*Linear, not an instance.*Linear\(\.\.\.\)"):
        bridge.torch_to_jax(torch.nn.Linear)
    with pytest.raises(TypeError, match="not an instance"):
        bridge.torch_to_jax_with_state(torch.nn.BatchNorm1d)
    with pytest.raises(TypeError, match="bridge.to_jax"):
        bridge.torch_to_jax(torch.ones(2))


class _Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_a_branch_on_a_tensor_value_names_the_line_and_the_fixes():
    # strict: no module-level fallback to torch (tests/test_module_fallback.py)
    apply, params = bridge.torch_to_jax(_Branchy(), strict=True)
    with pytest.raises(bridge.CaptureError) as info:
        apply(params, jnp.ones(3))
    message = str(info.value)
    assert "if x.sum() > 0" in message and "test_bad_input.py" in message
    assert "mode='callback'" in message and "torch.where" in message
    # the callback mode it points to runs the module
    apply, params = bridge.torch_to_jax(_Branchy(), mode="callback")
    np.testing.assert_allclose(np.asarray(apply(params, jnp.ones(3))), [2.0, 2.0, 2.0])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.int32])
def test_inputs_of_a_dtype_torch_refuses_are_refused(dtype):
    layer = torch.nn.Linear(4, 2)
    torch_dtype = bridge.dtypes.to_torch_dtype(dtype)
    with pytest.raises(RuntimeError, match="same dtype"):
        layer(torch.ones(3, 4, dtype=torch_dtype if torch_dtype != torch.int32 else torch.int64))
    apply, params = bridge.torch_to_jax(layer)
    with pytest.raises(RefusedByTorchError, match="same.*module.to"):
        apply(params, jnp.ones((3, 4), dtype))


def test_tensordot_of_mixed_dtypes_is_refused_like_torch():
    a, b = torch.ones(2, 3), torch.ones(3, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.tensordot(a, b, dims=1)
    f = bridge.torch_to_jax(lambda x, y: torch.tensordot(x, y, dims=1))
    # torch's meta function refuses it at capture, as its kernel does at run time
    with pytest.raises((RefusedByTorchError, RuntimeError), match="same"):
        f(bridge.to_jax(a), bridge.to_jax(b))


def test_a_module_converted_to_bfloat16_computes_in_bfloat16_like_torch():
    layer = torch.nn.Linear(4, 2).to(torch.bfloat16)
    apply, params = bridge.torch_to_jax(layer)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = apply(params, bridge.to_jax(x))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32), layer(x).detach().float().numpy(), rtol=1e-2, atol=1e-2
    )


def test_params_of_the_wrong_dtype_are_refused():
    apply, params = bridge.torch_to_jax(torch.nn.Linear(4, 2))
    for dtype in (jnp.bfloat16, jnp.int32):
        bad = {**params, "weight": params["weight"].astype(dtype)}
        with pytest.raises(ValueError, match=rf"'weight' has dtype {np.dtype(dtype).name}, expected float32"):
            apply(bad, jnp.ones((1, 4)))


def test_params_missing_extra_and_misshaped_are_all_named():
    apply, params = bridge.torch_to_jax(torch.nn.Linear(4, 2))
    bad = {"weight": jnp.ones((4, 2)), "extra": jnp.ones(1)}
    with pytest.raises(ValueError, match=r"missing \['bias'\].*unexpected \['extra'\].*'weight' has shape \(4, 2\)"):
        apply(bad, jnp.ones((1, 4)))


def test_state_of_the_wrong_shape_or_dtype_is_refused():
    bn = torch.nn.BatchNorm1d(4)
    apply, params, state = bridge.torch_to_jax_with_state(bn)
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"'running_var' has shape \(1,\), expected \(4,\)"):
        apply(params, {**state, "running_var": jnp.ones(1)}, x)
    with pytest.raises(ValueError, match="'running_mean' has dtype bfloat16"):
        apply(params, {**state, "running_mean": state["running_mean"].astype(jnp.bfloat16)}, x)
    with pytest.raises(ValueError, match=r"missing \['num_batches_tracked'\]"):
        apply(params, {k: v for k, v in state.items() if k != "num_batches_tracked"}, x)
    out, new_state = apply(params, state, x)  # the state it returns is accepted again
    apply(params, new_state, x)


class _LU(torch.nn.Module):
    def forward(self, a):
        return torch.linalg.lu(a, pivot=False)


def test_a_lowering_that_refuses_its_arguments_says_where_and_how_to_fix():
    apply, params = bridge.torch_to_jax(_LU(), strict=True)
    with pytest.raises(UnsupportedOpsError) as info:
        apply(params, jnp.eye(3))
    message = str(info.value)
    assert "aten.linalg_lu.default" in message and "pivot" in message
    assert "test_bad_input.py" in message and "torch.linalg.lu(a, pivot=False)" in message
    assert "mode='callback'" in message


def test_without_strict_a_refused_lowering_runs_in_torch(monkeypatch):
    # A lowering that refuses its arguments (NotImplementedError) hands the op
    # to torch through a callback, with a warning; strict=True makes it an error.
    aten = torch.ops.aten

    def refusing(ctx, x):
        raise NotImplementedError("this form is not translated")

    monkeypatch.setitem(bridge.ops.LOWERINGS, aten.cosh.default, refusing)
    x = torch.linspace(-2, 2, 5)
    with pytest.warns(UserWarning, match="this form is not translated.*runs through a torch callback"):
        out = bridge.torch_to_jax(lambda t: torch.cosh(t) * 2)(bridge.to_jax(x))
    np.testing.assert_allclose(np.asarray(out), (torch.cosh(x) * 2).numpy(), rtol=1e-6)
    with pytest.raises(UnsupportedOpsError, match="aten.cosh.default cannot be translated"):
        bridge.torch_to_jax(lambda t: torch.cosh(t) * 2, strict=True)(bridge.to_jax(x))


def test_apply_refuses_torch_tensors_and_unhashable_static_arguments():
    apply, params = bridge.torch_to_jax(torch.nn.Linear(4, 2))
    with pytest.raises(TypeError, match="bridge.to_jax"):
        apply(params, torch.ones(1, 4))
    with pytest.raises(TypeError, match="hashable"):
        apply(params, jnp.ones((1, 4)), {1, 2})


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be"):
        bridge.torch_to_jax(torch.nn.Linear(1, 1), mode="fast")


def test_random_module_without_key_says_how_to_pass_one():
    apply, params = bridge.torch_to_jax(torch.nn.Dropout(0.5).train())
    with pytest.raises(ValueError, match=r"rng=jax.random.key"):
        apply(params, jnp.ones(4))
    assert apply(params, jnp.ones(4), rng=jax.random.key(0)).shape == (4,)
