"""Tests for bridge.callback: torch run behind a JAX primitive."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import os
import re
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.utils._pytree as torch_pytree
from jax import export as jax_export
from torch._subclasses.fake_tensor import FakeTensor

from bridge import X64Error, callback
from bridge.callback import graphs, primitive

RTOL = 1e-5


def close(a, b, rtol=RTOL, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class Recorder:
    """A torch function that records what it is called with (real calls only)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []  # one entry per real (non-fake) call: the input tensors

    def __call__(self, *args, **kwargs):
        leaves = [
            x for x in torch_pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)
        ]
        if not any(isinstance(x, FakeTensor) for x in leaves):
            self.calls.append(leaves)
        return self.fn(*args, **kwargs)


def mlp(x, w1, b1, w2):
    return torch.tanh(x @ w1 + b1) @ w2


def mlp_jax(x, w1, b1, w2):
    return jnp.tanh(x @ w1 + b1) @ w2


@pytest.fixture
def mlp_args():
    rng = np.random.default_rng(0)
    shapes = [(4, 5), (5, 7), (7,), (7, 3)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.fixture(autouse=True)
def no_graph_left_behind():
    """Every test must leave no torch autograd graph waiting for a backward."""
    yield
    if len(graphs.PENDING):
        gc.collect()  # graphs of eager vjps go when their token arrays are collected
    assert len(graphs.PENDING) == 0


# --------------------------------------------------------------------------
# Forward


def test_jit_and_eager_match_torch_eager(mlp_args):
    jfn = callback.wrap(mlp)
    expected = t2n(mlp(*map(torch.from_numpy, mlp_args)))
    arrays = [jnp.asarray(a) for a in mlp_args]
    close(jfn(*arrays), expected)
    close(jax.jit(jfn)(*arrays), expected)


def test_pytrees_and_static_arguments():
    Out = collections.namedtuple("Out", "total parts")

    def fn(inputs, scale, *, mode, extra=None):
        assert isinstance(scale, int) and isinstance(mode, str) and extra is None
        y = inputs["x"] * scale + inputs["pair"][0] - inputs["pair"][1]
        y = y.relu() if mode == "relu" else y.abs()
        return Out(total=y.sum(), parts=[y, y.argmax()])

    jfn = callback.wrap(fn)
    x = jnp.array([-3.0, 1.0, 2.0])
    inputs = {"x": x, "pair": (jnp.ones(3), 2 * jnp.ones(3))}
    out = jax.jit(lambda i: jfn(i, 2, mode="relu"))(inputs)
    assert isinstance(out, Out) and isinstance(out.parts, list)
    close(out.parts[0], [0.0, 1.0, 3.0])
    close(out.total, 4.0)
    assert out.parts[1].dtype == jnp.int32 and int(out.parts[1]) == 2  # int64 narrowed exactly
    out_abs = jfn(inputs, 2, mode="abs")  # another static value: another kernel
    close(out_abs.parts[0], [7.0, 1.0, 3.0])
    assert len(jfn._kernels) == 2
    jfn(inputs, 2, mode="abs")
    assert len(jfn._kernels) == 2  # cached per signature


def test_static_values_of_different_types_do_not_share_a_kernel():
    fn = callback.wrap(lambda x, k: x * 2 if isinstance(k, bool) else x * 3)
    close(fn(jnp.ones(2), True), [2.0, 2.0])
    close(fn(jnp.ones(2), 1), [3.0, 3.0])  # 1 == True, but a different static value


def test_wrap_is_cached_and_shape_inference_runs_once_per_signature():
    inferences = []

    def fn(x):
        if isinstance(x, FakeTensor):
            inferences.append(x.shape)
        return x + 1

    assert callback.wrap(fn) is callback.wrap(fn)
    jfn = callback.wrap(fn)
    for _ in range(3):
        jfn(jnp.ones(3))
        jax.jit(jfn)(jnp.ones(3))
    jfn(jnp.ones(4))
    assert inferences == [(3,), (4,)]


def test_wrapper_cache_does_not_keep_functions_alive():
    fn = lambda x: x + 1  # noqa: E731
    ref = weakref.ref(fn)
    jfn = callback.wrap(fn)
    jfn(jnp.ones(2))
    del fn, jfn
    gc.collect()
    assert ref() is None


def test_bound_methods_share_one_wrapper():
    module = torch.nn.Tanh()
    jfn = callback.wrap(module.forward)
    assert callback.wrap(module.forward) is jfn
    close(jfn(jnp.zeros(2)), [0.0, 0.0])


def test_eval_shape_uses_fake_tensors_and_runs_no_torch_compute():
    rec = Recorder(lambda x, y: (x @ y, (x.sum(0) > 0).long()))
    out = jax.eval_shape(callback.wrap(rec), jnp.ones((3, 4)), jnp.ones((4, 5)))
    assert (out[0].shape, out[0].dtype) == ((3, 5), jnp.float32)
    assert (out[1].shape, out[1].dtype) == ((4,), jnp.int32)
    assert rec.calls == []


def test_dataclass_outputs_become_jax_pytrees():
    @dataclasses.dataclass
    class Result:
        logits: torch.Tensor
        loss: torch.Tensor

    torch_pytree.register_dataclass(Result)
    out = jax.jit(callback.wrap(lambda x: Result(logits=x * 2, loss=x.sum())))(jnp.ones(3))
    assert isinstance(out, Result)
    close(out.logits, [2.0, 2.0, 2.0])
    close(out.loss, 3.0)


# --------------------------------------------------------------------------
# Zero copy


@pytest.mark.skipif(
    callback.TRANSPORT != "buffer_callback",
    reason="this jax takes the copying pure_callback transport (jax < 0.10, see bridge/callback/primitive.py)",
)
def test_torch_receives_the_buffers_jax_holds_under_jit():
    seen = []

    def fn(x, y):
        if not isinstance(x, FakeTensor):
            seen.append((x.data_ptr(), y.data_ptr()))
        return x.sum() + y.sum()

    x = jnp.arange(1024.0)
    y = jnp.ones((16, 16))
    close(jax.jit(callback.wrap(fn))(x, y), x.sum() + y.sum())
    assert seen == [(x.unsafe_buffer_pointer(), y.unsafe_buffer_pointer())]


def test_eager_calls_share_inputs_and_outputs():
    made = []

    def fn(x):
        if isinstance(x, FakeTensor):
            return x * 2
        out = x * 2
        made.append((x.data_ptr(), out.data_ptr()))
        return out

    x = jnp.arange(256.0)
    y = callback.wrap(fn)(x)
    close(y, 2 * np.arange(256.0))
    assert made == [(x.unsafe_buffer_pointer(), y.unsafe_buffer_pointer())]


def test_pure_callback_fallback_gives_the_same_values(monkeypatch, mlp_args):
    monkeypatch.setattr(primitive, "_buffer_callback", None)
    arrays = [jnp.asarray(a) for a in mlp_args]
    jfn = callback.wrap(mlp)
    f = jax.jit(lambda *a: jfn(*a) + 0.0)  # a fresh trace, lowered with pure_callback
    assert "buffer" not in f.lower(*arrays).as_text().lower()
    close(f(*arrays), t2n(mlp(*map(torch.from_numpy, mlp_args))))
    close(
        jax.jit(jax.grad(lambda *a: jfn(*a).sum()))(*arrays),
        jax.grad(lambda *a: mlp_jax(*a).sum())(*arrays),
    )


# --------------------------------------------------------------------------
# Reverse mode


def test_grad_matches_torch_autograd_and_runs_the_forward_once(mlp_args):
    rec = Recorder(mlp)
    jfn = callback.wrap(rec)
    arrays = [jnp.asarray(a) for a in mlp_args]
    tensors = [torch.from_numpy(a).requires_grad_(True) for a in mlp_args]
    expected = torch.autograd.grad((mlp(*tensors) ** 2).sum(), tensors)

    def loss(*a):
        return (jfn(*a) ** 2).sum()

    for grad_fn in (
        jax.grad(loss, argnums=(0, 1, 2, 3)),
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))),
    ):
        rec.calls.clear()
        grads = grad_fn(*arrays)
        for g, e in zip(grads, expected, strict=True):
            close(g, t2n(e))
        assert len(rec.calls) == 1  # the backward reused torch's graph


def test_jaxpr_of_grad_has_one_forward_and_one_backward_call():
    jfn = callback.wrap(torch.sin)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jfn(x).sum()))(jnp.ones(3))
    kernels = [str(e.params["kernel"]) for e in jaxpr.eqns if e.primitive is callback.torch_call_p]
    assert kernels == ["forward_saving_graph(torch.sin)", "vjp(torch.sin)"]


def test_vjp_function_can_be_called_twice_and_frees_its_graph():
    jfn = callback.wrap(lambda x: torch.exp(x) * x)
    x = jnp.linspace(-1.0, 1.0, 5)
    out, vjp_fn = jax.vjp(jfn, x)
    assert len(graphs.PENDING) == 1
    expected = np.exp(x) * (1 + x) * 3
    close(vjp_fn(3 * jnp.ones(5))[0], expected)
    close(vjp_fn(3 * jnp.ones(5))[0], expected)
    del vjp_fn
    gc.collect()
    assert len(graphs.PENDING) == 0


def test_backward_recomputes_when_the_saved_graph_is_gone(monkeypatch):
    monkeypatch.setattr(callback, "MAX_PENDING_GRAPHS", 0)
    rec = Recorder(lambda x: torch.sin(x) * x)
    x = jnp.linspace(0.0, 1.0, 4)
    g = jax.jit(jax.grad(lambda x: callback.wrap(rec)(x).sum()))(x)
    close(g, np.sin(x) + x * np.cos(x))
    assert len(rec.calls) == 2  # forward, then the backward's recomputation


def test_unused_token_is_removed_by_dce():
    rec = Recorder(torch.cos)
    jfn = callback.wrap(rec)
    out = jax.jit(lambda x: jax.vjp(jfn, x)[0])(jnp.ones(3))
    close(out, np.cos(np.ones(3)))
    # the no_graph_left_behind fixture checks that no graph was kept


def test_grad_through_scan_cond_and_checkpoint():
    jfn = callback.wrap(lambda h, w: torch.tanh(h @ w))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)) / 2
    h0 = jnp.ones(4)

    def run(layer, w):
        def body(h, _):
            return layer(h, w), None

        return jax.lax.scan(body, h0, None, length=5)[0].sum()

    expected = jax.grad(run, argnums=1)(lambda h, w: jnp.tanh(h @ w), w)
    close(jax.jit(jax.grad(run, argnums=1), static_argnums=0)(jfn, w), expected, rtol=1e-5)
    close(jax.grad(run, argnums=1)(jax.checkpoint(jfn), w), expected, rtol=1e-5)

    def branch(w, p):
        return jax.lax.cond(p, lambda w: jfn(h0, w).sum(), lambda w: jnp.tanh(h0 @ w).sum(), w)

    for p in (True, False):
        close(jax.jit(jax.grad(branch))(w, p), jax.grad(lambda w: jnp.tanh(h0 @ w).sum())(w))


def test_grad_of_a_module_through_functional_call():
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 2)
    )
    params = {k: jnp.asarray(t2n(v)) for k, v in module.named_parameters()}
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)

    jfn = callback.wrap(lambda p, a, k: torch.func.functional_call(module, p, a, k))

    def loss(p, x):
        return (jfn(p, (x,), {}) ** 2).mean()

    grads = jax.jit(jax.grad(loss))(params, jnp.asarray(x))
    out = (module(torch.from_numpy(x)) ** 2).mean()
    expected = dict(zip(params, torch.autograd.grad(out, list(module.parameters())), strict=True))
    assert grads.keys() == expected.keys()
    for k in grads:
        close(grads[k], t2n(expected[k]), rtol=1e-5, atol=1e-6)


def test_complex_gradients_follow_jax_convention():
    def f_jax(z, w):
        return jnp.abs(z * w + jnp.conj(z) ** 2).sum()

    jfn = callback.wrap(lambda z, w: torch.abs(z * w + torch.conj(z) ** 2).sum())
    z = jnp.array([1 + 2j, -0.5 + 0.3j], dtype=jnp.complex64)
    w = jnp.array([0.3 - 1j, 2 + 0.1j], dtype=jnp.complex64)
    expected = jax.grad(f_jax, argnums=(0, 1))(z, w)
    saved = jax.grad(jfn, argnums=(0, 1))(z, w)  # through torch's saved graph
    recomputed = jax.jit(jax.vmap(jax.grad(jfn, argnums=(0, 1))))(
        z[None], w[None]
    )  # torch.func.vjp
    for g, r, e in zip(saved, recomputed, expected, strict=True):
        close(g, e, rtol=1e-5)
        close(r[0], e, rtol=1e-5)
    t = jnp.array([0.1 + 0.2j, 1.0 - 1j], dtype=jnp.complex64)
    close(
        jax.jvp(lambda z: jfn(z, w), (z,), (t,))[1], jax.jvp(lambda z: f_jax(z, w), (z,), (t,))[1]
    )


# --------------------------------------------------------------------------
# Forward mode and higher order


def test_jvp_matches_torch_func_jvp(mlp_args):
    tensors = [torch.from_numpy(a) for a in mlp_args]
    tangents = [torch.ones_like(t) * 0.1 for t in tensors]
    _, expected = torch.func.jvp(mlp, tuple(tensors), tuple(tangents))
    jfn = callback.wrap(mlp)
    arrays = tuple(jnp.asarray(a) for a in mlp_args)
    jtangents = tuple(jnp.asarray(t2n(t)) for t in tangents)
    for jvp in (jax.jvp, jax.jit(jax.jvp, static_argnums=0)):
        out, tangent = jvp(jfn, arrays, jtangents)
        close(out, t2n(mlp(*tensors)))
        close(tangent, t2n(expected))


def test_linearize_and_jacfwd_jacrev():
    jfn = callback.wrap(lambda x: torch.sin(x) * x.sum())
    fj = lambda x: jnp.sin(x) * x.sum()  # noqa: E731
    x = jnp.array([0.1, 0.5, -0.7])
    out, lin = jax.linearize(jfn, x)
    close(lin(jnp.ones(3)), jax.jvp(fj, (x,), (jnp.ones(3),))[1])
    expected = torch.func.jacrev(lambda t: torch.sin(t) * t.sum())(torch.from_numpy(np.asarray(x)))
    close(jax.jacfwd(jfn)(x), t2n(expected))
    close(jax.jacrev(jfn)(x), t2n(expected))
    close(jax.jit(jax.jacrev(jfn))(x), t2n(expected))


def test_hessian_and_grad_of_grad_match_torch():
    def f(x):
        return (torch.tanh(x) ** 3).sum() * x[0]

    jfn = callback.wrap(f)
    x = np.array([0.3, -0.2, 0.9], dtype=np.float32)
    expected = t2n(torch.func.hessian(f)(torch.from_numpy(x)))
    close(jax.hessian(jfn)(jnp.asarray(x)), expected, rtol=1e-5)
    close(jax.jit(jax.jacrev(jax.jacrev(jfn)))(jnp.asarray(x)), expected, rtol=1e-5)
    scalar = callback.wrap(lambda s: torch.sin(s) * s)
    close(jax.grad(jax.grad(jax.grad(scalar)))(0.4), -3 * np.sin(0.4) - 0.4 * np.cos(0.4))


def test_second_order_through_a_once_differentiable_function_raises():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    jfn = callback.wrap(lambda x: Square.apply(x).sum())
    x = jnp.array([1.0, 2.0])
    close(jax.grad(jfn)(x), [2.0, 4.0])

    def g(s):
        return jfn(s * x)

    # torch.func.grad(torch.func.grad(...)) returns 0.0 here; the bridge refuses.
    with pytest.raises(callback.CallbackError, match="differentiates only once"):
        jax.grad(jax.grad(g))(1.0)
    with pytest.raises(Exception, match="differentiates only once"):
        jax.jit(jax.grad(jax.grad(g)))(1.0).block_until_ready()
    with pytest.raises(Exception, match="jvp"):
        jax.hessian(jfn)(x)


def test_detached_outputs_have_zero_derivatives_of_every_order():
    jfn = callback.wrap(lambda x: (x.detach() * x).sum())  # like x * stop_gradient(x)
    x = jnp.array([1.0, 3.0])
    close(jax.grad(jfn)(x), [1.0, 3.0])
    close(jax.hessian(jfn)(x), np.zeros((2, 2)))
    close(jax.grad(jax.grad(lambda s: jfn(s * x)))(1.0), 0.0)


def test_forward_mode_through_an_op_without_a_formula_raises():
    @torch.library.custom_op("bridge_test::cube_no_jvp", mutates_args=())
    def cube(x: torch.Tensor) -> torch.Tensor:
        return x.pow(3)

    cube.register_autograd(
        lambda ctx, g: 3 * g * ctx.x**2,
        setup_context=lambda ctx, inputs, output: setattr(ctx, "x", inputs[0]),
    )
    jfn = callback.wrap(lambda x: (cube(x), x * 2))
    x = jnp.array([1.0, 2.0])
    close(jax.grad(lambda x: jfn(x)[0].sum())(x), [3.0, 12.0])
    with pytest.raises(callback.CallbackError, match="no forward-mode derivative"):
        jax.jvp(jfn, (x,), (jnp.ones(2),))
    # an output that does not depend on the input has a zero tangent, not an error
    const = callback.wrap(lambda x: (x * 2, torch.ones(2)))
    _, (t1, t2) = jax.jvp(const, (x,), (jnp.ones(2),))
    close(t1, [2.0, 2.0])
    close(t2, [0.0, 0.0])


# --------------------------------------------------------------------------
# vmap


def test_vmap_calls_torch_once_with_a_batched_tensor():
    rec = Recorder(lambda x, w: torch.tanh(x @ w))
    jfn = callback.wrap(rec)
    xs = jnp.asarray(np.random.default_rng(3).standard_normal((7, 4)).astype(np.float32))
    w = jnp.eye(4) * 0.5
    out = jax.jit(jax.vmap(jfn, in_axes=(0, None)))(xs, w)
    close(out, np.tanh(np.asarray(xs) @ np.asarray(w)))
    assert len(rec.calls) == 1
    batched_input = rec.calls[0][0]
    assert torch._C._functorch.is_batchedtensor(batched_input)
    assert tuple(batched_input.shape) == (4,)  # torch.func.vmap's per-example view


def test_vmap_along_other_axes_and_nested():
    jfn = callback.wrap(lambda x, y: x * y.sum())
    x = jnp.arange(12.0).reshape(3, 4)
    y = jnp.arange(8.0).reshape(4, 2)
    close(
        jax.vmap(jfn, in_axes=(1, 0))(x, y),
        jax.vmap(lambda a, b: a * b.sum(), in_axes=(1, 0))(x, y),
    )
    nested = jax.vmap(jax.vmap(jfn, in_axes=(0, None)), in_axes=(0, None))
    close(
        nested(x.reshape(3, 2, 2), y),
        jax.vmap(jax.vmap(lambda a, b: a * b.sum(), (0, None)), (0, None))(x.reshape(3, 2, 2), y),
    )


def test_per_example_gradients_match_torch_func():
    def loss(w, x):
        return torch.tanh(x @ w).pow(2).sum()

    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2)).astype(np.float32)
    xs = rng.standard_normal((6, 3)).astype(np.float32)
    expected = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(
        torch.from_numpy(w), torch.from_numpy(xs)
    )
    jfn = callback.wrap(loss)
    got = jax.jit(jax.vmap(jax.grad(jfn), in_axes=(None, 0)))(jnp.asarray(w), jnp.asarray(xs))
    close(got, t2n(expected), rtol=1e-5)
    # and the gradient of a vmapped function (sums over the batch)
    got_sum = jax.grad(lambda w: jax.vmap(jfn, in_axes=(None, 0))(w, jnp.asarray(xs)).sum())(
        jnp.asarray(w)
    )
    close(got_sum, t2n(expected.sum(0)), rtol=1e-5)


def test_transpose_of_a_vmapped_linear_call():
    jfn = callback.wrap(lambda x: torch.sin(x) * 2)
    x = jnp.array([0.1, 0.2, 0.3])
    ts = jnp.arange(6.0).reshape(2, 3)

    def pushforward(ts):
        return jax.vmap(lambda t: jax.jvp(jfn, (x,), (t,))[1])(ts)

    cts = jnp.ones((2, 3))
    (got,) = jax.linear_transpose(pushforward, ts)(cts)
    close(got, 2 * np.cos(np.asarray(x)) * np.ones((2, 3)))


def test_vmap_of_data_dependent_control_flow_raises_a_clear_error():
    jfn = callback.wrap(lambda x: x * 2 if x.sum() > 0 else x)
    with pytest.raises(Exception, match="torch.func.vmap could not batch"):
        jax.vmap(jfn)(jnp.ones((3, 2)))


# --------------------------------------------------------------------------
# Code with no JAX lowering, or that torch.export refuses


def test_custom_op_without_fake_kernel_or_lowering():
    @torch.library.custom_op("bridge_test::softclip_np", mutates_args=())
    def softclip_np(x: torch.Tensor, limit: float) -> torch.Tensor:
        # numpy inside: opaque to fake tensors and to torch.export
        return torch.from_numpy(limit * np.tanh(x.numpy() / limit))

    softclip_np.register_autograd(
        lambda ctx, g: (g * (1 - torch.tanh(ctx.x / ctx.limit) ** 2), None),
        setup_context=lambda ctx, inputs, output: (
            setattr(ctx, "x", inputs[0]),
            setattr(ctx, "limit", inputs[1]),
        ),
    )
    rec = Recorder(lambda x, limit: softclip_np(x, limit) * 2)
    jfn = callback.wrap(rec)
    x = jnp.array([-4.0, 0.5, 3.0])
    expected = 2 * 2.0 * np.tanh(np.asarray(x) / 2.0)
    assert jax.eval_shape(jfn, x, 2.0).shape == (3,)
    close(jax.jit(jfn, static_argnums=1)(x, 2.0), expected)
    dfdx = 2 * (1 - np.tanh(np.asarray(x) / 2.0) ** 2)
    close(jax.grad(lambda x: jfn(x, 2.0).sum())(x), dfdx)
    close(jax.jit(jax.jacrev(lambda x: jfn(x, 2.0)))(x), np.diag(dfdx))
    # torch.func refuses the op's autograd formula; first-order recomputation uses plain autograd
    with _no_saved_graphs():
        close(jax.jit(jax.grad(lambda x: jfn(x, 2.0).sum()))(x), dfdx)
    # second order through the op's (differentiable) backward, as torch autograd does it
    s = torch.tensor(1.0, requires_grad=True)
    (d1,) = torch.autograd.grad(
        rec.fn(s * torch.from_numpy(np.asarray(x)), 2.0).sum(), s, create_graph=True
    )
    (d2,) = torch.autograd.grad(d1, s)
    close(jax.grad(jax.grad(lambda s: jfn(s * x, 2.0).sum()))(1.0), d2.item())
    with pytest.raises(Exception, match="forward-mode|functorch transforms"):
        jax.jvp(lambda x: jfn(x, 2.0), (x,), (x,))
    with pytest.raises(Exception):  # noqa: B017 - torch.export cannot trace it
        torch.export.export(_AsModule(lambda x: softclip_np(x, 2.0)), (torch.ones(3),))


@contextlib.contextmanager
def _no_saved_graphs():
    before = callback.MAX_PENDING_GRAPHS
    callback.MAX_PENDING_GRAPHS = 0
    try:
        yield
    finally:
        callback.MAX_PENDING_GRAPHS = before


class _AsModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_data_dependent_control_flow_that_torch_export_refuses():
    def fn(x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x - 1

    with pytest.raises(Exception):  # noqa: B017
        torch.export.export(_AsModule(fn), (torch.ones(3),))
    jfn = jax.jit(callback.wrap(fn))
    close(jfn(jnp.array([1.0, 2.0])), [2.0, 4.0])
    close(jfn(jnp.array([-1.0, -2.0])), [-2.0, -3.0])
    close(jax.grad(lambda x: callback.wrap(fn)(x).sum())(jnp.array([-1.0, -2.0])), [1.0, 1.0])


def test_value_dependent_output_shape_is_an_error_not_a_guess():
    with pytest.raises(callback.CallbackError, match="depends on the values"):
        jax.jit(callback.wrap(lambda x: x[x > 0]))(jnp.array([1.0, -1.0, 2.0]))

    def hidden(x):  # a shape that fake tensors cannot see: found by a run on zeros
        n = int((x > 0).sum())
        return x[:n]

    with pytest.raises(Exception, match="shape inference predicted"):
        jax.jit(callback.wrap(hidden))(jnp.array([1.0, 2.0, -1.0])).block_until_ready()


# --------------------------------------------------------------------------
# dtypes and errors


def test_int64_outputs_are_narrowed_only_when_exact():
    big = callback.wrap(lambda x: x.long() + 2**40)
    with pytest.raises(X64Error, match="outside the range"):
        big(jnp.ones(2))
    with pytest.raises(Exception, match="outside the range"):
        jax.jit(big)(jnp.ones(2)).block_until_ready()


def test_float64_output_with_x64_off_raises_at_trace_time():
    jfn = callback.wrap(lambda x: x.double() * 2)
    with pytest.raises(X64Error, match="jax_enable_x64"):
        jax.eval_shape(jfn, jnp.ones(2))


def test_float64_and_int64_with_x64_on():
    jax.config.update("jax_enable_x64", True)
    try:
        jfn = jax.jit(callback.wrap(lambda x: (x.double() / 3, x.long() + 2**40)))
        a, b = jfn(jnp.ones(2, jnp.float32))
        assert a.dtype == jnp.float64 and float(a[0]) == 1 / 3
        assert b.dtype == jnp.int64 and int(b[0]) == 2**40 + 1
        cube = callback.wrap(lambda t: (t**3).sum())
        g = jax.grad(cube)(jnp.ones(2, jnp.float64))
        assert g.dtype == jnp.float64 and float(g[0]) == 3.0
    finally:
        jax.config.update("jax_enable_x64", False)


def test_in_place_write_into_an_input_raises():
    with pytest.raises(Exception, match="wrote in place"):
        jax.jit(callback.wrap(lambda x: x.add_(1)))(jnp.ones(3)).block_until_ready()


def test_in_place_write_into_a_later_input_raises_with_several_outputs():
    def f(x, y):
        y.mul_(2)
        return x + 1, x * y

    with pytest.raises(Exception, match="wrote in place into its input 1"):
        jax.block_until_ready(jax.jit(callback.wrap(f))(jnp.ones(3), jnp.ones(3)))


def test_bad_arguments_get_clear_errors():
    jfn = callback.wrap(lambda x, s: x)
    with pytest.raises(TypeError, match="bridge.to_jax"):
        jfn(torch.ones(2), None)
    with pytest.raises(TypeError, match="hashable"):
        jfn(jnp.ones(2), {1, 2})


def test_jax_export_and_tpu_lowering_errors():
    jfn = jax.jit(callback.wrap(torch.sin))
    with pytest.raises(NotImplementedError, match="serialization of host_callbacks"):
        jax_export.export(jfn)(jnp.ones(3))
    with pytest.raises(NotImplementedError, match="'tpu' devices"):
        jax_export.export(jfn, platforms=["tpu"])(jnp.ones(3))


def test_one_callback_inside_an_otherwise_jax_program():
    # The trace-mode interpreter's per-op fallback: one opaque op among lowerings.
    op = torch.ops.aten.special_i1.default
    jop = callback.wrap(lambda *tensors: op(*tensors))

    def program(x):
        y = jnp.sin(x) * 2
        z = jop(y)
        return jnp.cos(z).sum()

    x = jnp.linspace(0.1, 1.0, 8)
    jitted = jax.jit(program)
    hlo = jitted.lower(x).as_text()
    assert hlo.count("custom_call") == 1
    expected = np.cos(t2n(op(torch.from_numpy(2 * np.sin(np.asarray(x)))))).sum()
    close(jitted(x), expected, rtol=1e-5)


def test_docs_example_runs():
    text = (Path(__file__).resolve().parent.parent / "docs" / "callback.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "docs/callback.md", "exec"), {})


# --------------------------------------------------------------------------
# Sharding (several CPU devices, in a subprocess)


def _run_python(script: str, env: dict | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sharded_inputs_run_replicated_and_shard_map_runs_per_shard():
    script = """
        import jax, jax.numpy as jnp, numpy as np, torch
        from jax.sharding import NamedSharding, PartitionSpec as P
        from torch._subclasses.fake_tensor import FakeTensor
        from bridge import callback
        shapes = []
        def fn(x):
            if not isinstance(x, FakeTensor):
                shapes.append(tuple(x.shape))
            return x * 2
        jfn = callback.wrap(fn)
        mesh = jax.make_mesh((8,), ("d",))
        x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("d")))
        y = jax.jit(jfn)(x).block_until_ready()
        assert np.array_equal(np.asarray(y), 2 * np.asarray(x))
        assert y.sharding.is_fully_replicated, y.sharding
        assert set(shapes) == {(8, 8)}, shapes  # gathered: torch sees the whole array
        shapes.clear()
        z = jax.jit(jax.shard_map(jfn, mesh=mesh, in_specs=P("d"), out_specs=P("d")))(x)
        assert np.array_equal(np.asarray(z), 2 * np.asarray(x))
        assert shapes == [(1, 8)] * 8, shapes
        print("ok")
    """
    out = _run_python(script, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert out.strip().endswith("ok")
