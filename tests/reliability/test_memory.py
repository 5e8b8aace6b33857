"""Memory stays bounded: no cache keeps a user's function, module or graphs alive.

The RSS tests run their loop in a fresh subprocess (so other tests' caches do
not blur the numbers), warm up first, and bound the growth of the measured
part. Each states what the leak it guards against used to cost.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from bridge import callback
from bridge.callback import graphs

_RSS = """
import ctypes, gc, json, psutil

def rss():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back
    return psutil.Process().memory_info().rss / 2**20
"""


def _growth_mib(body: str) -> float:
    """Run `body` (which sets `base = rss()` after its warm-up) and return RSS growth."""
    code = _RSS + textwrap.dedent(body) + "\nprint(json.dumps(rss() - base))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# jax_to_torch


@pytest.mark.slow
def test_jax_to_torch_wraps_do_not_accumulate():
    # Before the fix every wrap kept ~3.2 MiB (a module-level registry of every
    # JAX function and one jit shared by all backwards): 50 wraps grew ~160 MiB.
    # After it, the growth is a few MiB of allocator noise, whatever the count.
    growth = _growth_mib(
        """
        import jax, jax.numpy as jnp, torch, bridge

        def apply(p, x):
            return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

        def params():
            k = jax.random.key(0)
            return {"w1": jax.random.normal(k, (64, 128)), "b1": jnp.zeros(128),
                    "w2": jax.random.normal(k, (128, 10))}

        x = torch.randn(8, 64)
        for i in range(60):
            if i == 10:
                base = rss()
            m = bridge.jax_to_torch(apply, params())
            m(x).sum().backward()
            del m
        """
    )
    assert growth < 40, f"RSS grew {growth:.1f} MiB over 50 jax_to_torch wraps"


class _Payload:
    """Something a wrapped JAX function closes over; we watch whether it is freed."""

    def __init__(self) -> None:
        self.scale = 2.0


def _collected(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def _apply_closing_over(payload: _Payload):
    def apply(p, x):
        return (x * p["w"] * payload.scale).sum()

    return apply


def _fn_closing_over(payload: _Payload):
    def fn(x):
        return jnp.sin(x) * payload.scale

    return fn


def test_dropped_jax_to_torch_module_is_collected():
    payload = _Payload()
    ref = weakref.ref(payload)
    apply = _apply_closing_over(payload)
    m = bridge.jax_to_torch(apply, {"w": jnp.ones(3)})
    x = torch.ones(3, requires_grad=True)
    out = m(x)
    out.backward()
    assert out.item() == 6.0
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    del apply, payload, m, out
    assert _collected(ref), "the module's JAX function is still alive after the module was dropped"


def test_dropped_jax_to_torch_function_is_collected():
    payload = _Payload()
    ref = weakref.ref(payload)
    fn = _fn_closing_over(payload)
    tfn = bridge.jax_to_torch(fn)
    x = torch.zeros(2, requires_grad=True)
    tfn(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0]
    del fn, payload, tfn
    assert _collected(ref), (
        "the wrapped function is still alive after the torch function was dropped"
    )


def test_dropped_compiled_jax_to_torch_module_is_collected():
    # torch.compile keeps a compiled graph (with its constants) in the globals
    # of the module that defines the compiled forward, past the module it was
    # compiled for: the graph must hold the JAX function only weakly.
    payload = _Payload()
    ref = weakref.ref(payload)
    m = bridge.jax_to_torch(_apply_closing_over(payload), {"w": jnp.ones(3)})
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.ones(3, requires_grad=True)
    compiled(x).backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    del payload, m, compiled
    assert _collected(ref), "a compiled graph kept the dropped module's JAX function alive"


def test_dropped_module_buffers_are_freed():
    # A module built from torch tensors keeps JAX views of them; the views must
    # die with the module (a module-level table of views used to keep integer
    # buffers, which share memory with their view, alive forever).
    state = {"count": torch.zeros(4, dtype=torch.int32)}

    def apply(p, s, x):
        return x * p["w"], {"count": s["count"] + 1}

    m = bridge.jax_to_torch(apply, {"w": torch.ones(4)}, state=state)
    t_ref = weakref.ref(m.count)  # the buffer the module holds (it shares memory with its view)
    m(torch.ones(4))
    assert m.count.tolist() == [1, 1, 1, 1]
    del m, state
    assert _collected(t_ref)


# --------------------------------------------------------------------------
# callback


@pytest.mark.slow
def test_callback_eager_grad_does_not_accumulate():
    # Before the fix each un-jitted jax.grad kept its torch graph (a reference
    # cycle through torch's saved-tensor hooks): ~1 MiB per step here, so
    # 100 steps on a 1 MiB input grew ~100 MiB. After it: flat.
    growth = _growth_mib(
        """
        import jax, jax.numpy as jnp, torch
        from bridge import callback

        f = callback.wrap(lambda x: (torch.tanh(x) * x).sum())  # tanh saves its output
        g = jax.grad(f)
        x = jnp.ones((512, 512))  # 1 MiB
        for i in range(110):
            if i == 10:
                base = rss()
            g(x).block_until_ready()
        """
    )
    assert growth < 16, f"RSS grew {growth:.1f} MiB over 100 eager callback grads"


@pytest.mark.slow
def test_callback_dropped_vjp_under_jit_is_bounded():
    # A jitted jax.vjp whose vjp_fn is dropped leaves its torch graph pending;
    # past MAX_PENDING_GRAPHS the oldest are dropped. Before the fix a dropped
    # graph was never freed (~2 MiB per call past the cap: ~200 MiB here).
    growth = _growth_mib(
        """
        import jax, jax.numpy as jnp, torch
        from bridge import callback

        callback.MAX_PENDING_GRAPHS = 4
        f = callback.wrap(lambda x: (torch.sin(x) * x).sum())
        fv = jax.jit(lambda x: jax.vjp(f, x))
        x = jnp.ones((512, 512))  # 1 MiB
        for i in range(110):
            if i == 10:
                base = rss()
            y, vjp_fn = fv(x)
            y.block_until_ready()
            del y, vjp_fn
        assert len(callback.graphs.PENDING) == 4
        """
    )
    assert growth < 16, f"RSS grew {growth:.1f} MiB over 100 jitted vjps with dropped vjp_fn"


def test_pending_graphs_are_bounded_in_bytes(monkeypatch):
    # Graphs waiting for a backward under jit are capped in number and in the
    # bytes of activations they keep; a trimmed graph's backward recomputes.
    f = callback.wrap(lambda x: (torch.tanh(x) * x).sum())  # keeps tanh(x): 256 KiB
    fv = jax.jit(lambda x: jax.vjp(f, x))
    x = jnp.linspace(-1.0, 1.0, 256 * 256).reshape(256, 256)
    fv(x)[1](jnp.ones(()))  # compile; its backward consumes its graph
    assert len(graphs.PENDING) == 0
    monkeypatch.setattr(callback, "MAX_PENDING_BYTES", 600_000)
    pending = [fv(x)[1] for _ in range(5)]
    assert len(graphs.PENDING) == 2 and graphs.PENDING.nbytes == 2 * 256 * 256 * 4
    expected = jnp.tanh(x) + x * (1 - jnp.tanh(x) ** 2)
    for vjp_fn in pending:  # three recompute, two use their graph
        np.testing.assert_allclose(vjp_fn(jnp.ones(()))[0], expected, rtol=1e-5, atol=1e-6)
    assert len(graphs.PENDING) == 0 and graphs.PENDING.nbytes == 0


def _live_graphs() -> int:
    gc.collect()
    return sum(isinstance(o, graphs.Graph) for o in gc.get_objects())


def test_callback_eager_grad_frees_its_graph():
    before = _live_graphs()
    f = callback.wrap(lambda x: (torch.sin(x) * x).sum())
    x = jnp.linspace(0.0, 1.0, 5)
    for _ in range(3):
        g = jax.grad(f)(x)
    expected = jnp.sin(x) + x * jnp.cos(x)
    assert jnp.allclose(g, expected)
    del g
    assert _live_graphs() == before


def _live_tensors() -> int:
    gc.collect()
    return sum(type(o) is torch.Tensor for o in gc.get_objects())


def test_callback_eager_grad_frees_saved_outputs():
    # tanh saves its own output for the backward; kept as it is (with its
    # grad_fn) by the saved-tensor hook, it formed a cycle through C++ that
    # kept every step's graph: 6 tensors per step here.
    f = callback.wrap(lambda w, b, x: torch.tanh(x @ w + b))
    w, b, x = jnp.eye(3), jnp.zeros(3), jnp.ones((2, 3))
    grad = jax.grad(lambda w, b: f(w, b, x).sum(), argnums=(0, 1))
    for _ in range(3):  # warm up: first calls fill caches (shape inference, probes)
        grad(w, b)
    before = _live_tensors()
    for _ in range(5):
        gw, gb = grad(w, b)
    d = 1 - np.tanh(1.0) ** 2
    np.testing.assert_allclose(gb, [2 * d] * 3, rtol=1e-6)
    np.testing.assert_allclose(gw, np.full((3, 3), 2 * d), rtol=1e-6)
    del gw, gb  # they share memory with torch's gradient tensors
    assert _live_tensors() == before


def test_callback_vjp_graph_lives_with_vjp_fn():
    # Eager jax.vjp keeps the graph as long as vjp_fn (it may be called twice).
    f = callback.wrap(lambda x: torch.sin(x) * 3)
    x = jnp.linspace(0.0, 1.0, 4)
    before = _live_graphs()
    _, vjp_fn = jax.vjp(f, x)
    assert _live_graphs() == before + 1
    (g1,) = vjp_fn(jnp.ones(4))
    (g2,) = vjp_fn(jnp.ones(4))
    assert jnp.allclose(g1, 3 * jnp.cos(x)) and jnp.allclose(g2, g1)
    del vjp_fn
    assert _live_graphs() == before


def test_dropped_callback_module_is_collected():
    lin = torch.nn.Linear(3, 2)
    ref = weakref.ref(lin)
    f = callback.wrap(lin)
    x = jnp.ones((1, 3))
    g = jax.grad(lambda x, f=f: f(x).sum())(x)
    assert jnp.allclose(g, jnp.asarray(lin.weight.detach().sum(0).numpy()))
    del lin, f, g
    assert _collected(ref)


# --------------------------------------------------------------------------
# torch_to_jax


@pytest.mark.slow
def test_torch_to_jax_conversions_do_not_accumulate():
    # Each conversion captures once (about 0.3-0.6 s here, which is why this
    # runs 100 of them rather than thousands): graphs, jits and check tables
    # belong to the converted function, so dropping it frees them. Measured:
    # +4.8 MiB over 200 conversions with a jax.grad each (allocator noise);
    # a leak of the captured program (~0.5 MiB each) would exceed the bound.
    growth = _growth_mib(
        """
        import jax, jax.numpy as jnp, torch, bridge
        x = jnp.ones((4, 8))
        def once():
            m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
            apply, params = bridge.torch_to_jax(m)
            jax.block_until_ready(jax.grad(lambda p: apply(p, x).sum())(params))
        for _ in range(10):
            once()
        base = rss()
        for _ in range(100):
            once()
        """
    )
    assert growth < 30, f"RSS grew {growth:.1f} MiB over 100 torch_to_jax conversions"


def test_dropped_torch_to_jax_module_and_apply_are_collected():
    def convert_and_use() -> list[weakref.ref]:
        module = torch.nn.Linear(3, 2)
        apply, params = bridge.torch_to_jax(module)
        jax.grad(lambda p: apply(p, jnp.ones((1, 3))).sum())(params)
        jax.jit(apply)(params, jnp.ones((2, 3)))
        return [weakref.ref(module), weakref.ref(apply)]

    refs = convert_and_use()
    gc.collect()
    assert all(r() is None for r in refs)
