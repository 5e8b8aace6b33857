"""Callback mode and the per-op hybrid fallback through torch_to_jax.

Not marked `xla`: jax 0.7.1 (the torch_xla environment) aborts the process
when a host callback follows a matmul in one jitted CPU program, a jax bug
reproduced without the bridge; see docs/callback.md.
"""

from __future__ import annotations

import jax
import pytest
import torch
from test_torch_to_jax import GRAD, Unlowered, close
from torch import nn

import bridge


def test_hybrid_fallback_warns_once_and_matches_torch_in_one_program():
    m = Unlowered()
    apply, params = bridge.torch_to_jax(m)  # strict=False: unlowered ops run in torch
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match="bridge_test.enigma.default, bridge_test.mystery.default"):
        out = jax.jit(apply)(params, bridge.to_jax(x))
    close(out, m(x))
    # One compiled program: the linear is JAX, each unlowered op one callback.
    hlo = jax.jit(apply).lower(params, bridge.to_jax(x)).as_text()
    assert hlo.count("custom_call") == 2 or hlo.count("stablehlo.custom_call") == 2


def test_callback_mode_matches_torch_with_gradients():
    m = Unlowered()
    apply, params = bridge.torch_to_jax(m, mode="callback")
    x = torch.randn(2, 3)
    xj = bridge.to_jax(x)
    close(jax.jit(apply)(params, xj), m(x))
    m_lin = nn.Linear(3, 3)
    m_lin.load_state_dict(m.inner.state_dict())
    apply2, params2 = bridge.torch_to_jax(m_lin, mode="callback")
    g = jax.jit(jax.grad(lambda p: (apply2(p, xj) ** 2).sum()))(params2)
    (m_lin(x) ** 2).sum().backward()
    close(g["weight"], m_lin.weight.grad, **GRAD)
