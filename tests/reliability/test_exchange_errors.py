"""Errors that name the problem and the fix, at the call that caused it."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from bridge import callback

# --------------------------------------------------------------------------
# uint64 (torch has no min/max/comparison kernels for it)


def test_uint64_that_fits_narrows_exactly_with_x64_off():
    t = torch.tensor([0, 7, 2**32 - 1], dtype=torch.uint64)
    a = bridge.to_jax(t)
    assert a.dtype == jnp.uint32
    assert np.asarray(a).tolist() == [0, 7, 2**32 - 1]
    assert bridge.to_jax(torch.zeros(0, dtype=torch.uint64)).dtype == jnp.uint32


def test_uint64_that_does_not_fit_raises_x64_error():
    t = torch.tensor([1, 2**32, 2**63 + 5], dtype=torch.uint64)
    with pytest.raises(bridge.X64Error, match=r"2 values such as 4294967296.*jax_enable_x64"):
        bridge.to_jax(t)
    with pytest.raises(bridge.SharingError, match="x64"):
        bridge.to_jax(torch.ones(2, dtype=torch.uint64), copy=False)


@contextlib.contextmanager
def _x64():
    # jax.enable_x64 is new (jax 0.7 has jax.experimental.enable_x64): set the flag itself.
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def test_uint64_with_x64_on_keeps_every_value():
    with _x64():
        t = torch.tensor([1, 2**63 + 5], dtype=torch.uint64)
        a = bridge.to_jax(t)
        assert a.dtype == jnp.uint64
        assert np.asarray(a).tolist() == [1, 2**63 + 5]
        back = bridge.to_torch(a)
        assert back.dtype == torch.uint64 and back.tolist() == [1, 2**63 + 5]


def test_callback_uint64_output_narrows_or_raises():
    small = callback.wrap(lambda x: torch.full_like(x, 3, dtype=torch.uint64))
    out = small(jnp.ones(2))
    assert out.dtype == jnp.uint32 and out.tolist() == [3, 3]
    assert jax.jit(small)(jnp.ones(2)).tolist() == [3, 3]
    big = callback.wrap(lambda x: torch.full_like(x, 2**40, dtype=torch.uint64))
    with pytest.raises(bridge.X64Error, match=r"values such as 1099511627776"):
        big(jnp.ones(2))


# --------------------------------------------------------------------------
# sets cannot be pytrees


def test_to_jax_rejects_a_set_holding_tensors():
    with pytest.raises(
        TypeError, match=r"to_jax got a set holding a torch tensor.*list or a tuple"
    ):
        bridge.to_jax({torch.ones(1)})
    with pytest.raises(TypeError, match=r"to_jax got a frozenset holding a torch tensor"):
        bridge.to_jax({"x": frozenset({(torch.ones(1), 2)})})


@dataclasses.dataclass(frozen=True, eq=False)
class _Box:  # hashable by identity, so it can sit in a set while holding an array
    value: Any


def test_to_torch_rejects_a_set_holding_arrays():
    with pytest.raises(TypeError, match=r"to_torch got a set holding a JAX array"):
        bridge.to_torch({_Box(jnp.ones(1))})


def test_sets_without_tensors_pass_through():
    tags = frozenset({"a", "b"})
    out = bridge.to_jax({"tags": tags, "x": torch.ones(2)})
    assert out["tags"] is tags and isinstance(out["x"], jax.Array)
    assert bridge.to_torch([{1, 2}])[0] == {1, 2}


# --------------------------------------------------------------------------
# callback.wrap


@pytest.mark.parametrize("bad", [42, "torch.sin", None])
def test_callback_wrap_rejects_non_callables_at_wrap_time(bad):
    with pytest.raises(TypeError, match="expects a torch function"):
        callback.wrap(bad)


@torch.library.custom_op("bridge_test::no_autograd", mutates_args=())
def _no_autograd(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@_no_autograd.register_fake
def _(x):
    return torch.empty_like(x)


_NO_FORMULA = (
    r"bridge_test.no_autograd.default, which has no autograd formula.*"
    r"register_autograd\('bridge_test::no_autograd'.*stop_gradient"
)


@pytest.mark.parametrize("how", ["grad", "jit_grad", "vjp", "jit_vjp"])
def test_gradient_through_op_without_autograd_formula_names_op_and_fix(how):
    f = callback.wrap(lambda x: _no_autograd(x) * 2)
    x = jnp.ones(3)
    np.testing.assert_allclose(f(x), 2 * np.sin(1.0) * np.ones(3), rtol=1e-6)
    loss = lambda x: f(x).sum()  # noqa: E731
    run = {
        "grad": lambda: jax.grad(loss)(x),
        "jit_grad": lambda: jax.jit(jax.grad(loss))(x),
        "vjp": lambda: jax.vjp(f, x)[1](jnp.ones(3)),
        "jit_vjp": lambda: jax.jit(lambda x, c: jax.vjp(f, x)[1](c))(x, jnp.ones(3)),
    }[how]
    with pytest.raises(callback.CallbackError, match=_NO_FORMULA) as info:
        run()
    assert len(str(info.value)) < 600  # a sentence, not an XLA traceback


def test_op_without_autograd_formula_is_fine_where_no_gradient_flows():
    f = callback.wrap(lambda x, y: _no_autograd(x) + y)
    x, y = jnp.ones(2), jnp.zeros(2)
    g = jax.jit(jax.grad(lambda y: f(x, y).sum()))(y)  # x is not differentiated
    assert g.tolist() == [1.0, 1.0]
    g = jax.grad(lambda x: f(jax.lax.stop_gradient(x), y).sum())(x)
    assert g.tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------
# jax_to_torch takes NumPy arrays as documented


def test_jax_to_torch_accepts_numpy_inputs():
    f = bridge.jax_to_torch(lambda x, y: x * y)
    a = np.arange(4.0, dtype=np.float32)
    out = f(torch.ones(4), a)
    assert isinstance(out, torch.Tensor) and out.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert f(torch.ones(4), a[::-1]).tolist() == [3.0, 2.0, 1.0, 0.0]  # negative strides
    ro = a.copy()
    ro.flags.writeable = False
    assert f(torch.ones(4), ro).tolist() == [0.0, 1.0, 2.0, 3.0]
    x = torch.ones(4, requires_grad=True)
    f(x, a).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_jax_to_torch_numpy_input_errors():
    f = bridge.jax_to_torch(lambda x, y: x * y)
    with pytest.raises(TypeError, match="NumPy array of dtype <U1"):
        f(torch.ones(2), np.array(["a", "b"]))
    with pytest.raises(bridge.X64Error, match="jax_enable_x64"):
        f(torch.ones(2), np.ones(2))  # float64 with x64 off, as for tensors
