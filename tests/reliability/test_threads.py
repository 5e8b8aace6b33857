"""Capture and calls from many threads: results equal torch's, the module stays intact.

torch.export is not re-entrant; before capture was serialised, four threads
calling one converted module with new shapes raised from inside torch.export
and, in most runs, left FakeTensors in the module's parameters.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
import torch

import bridge

THREADS = 8


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).eval()


def _run_threads(target, count: int = THREADS) -> list:
    results: list = [None] * count
    errors: list = []
    barrier = threading.Barrier(count)

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - reported below with its thread
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return results


def _assert_real_module(module: torch.nn.Module, before: dict) -> None:
    for name, p in module.named_parameters():
        assert type(p) is torch.nn.Parameter and not isinstance(p.data, torch._subclasses.FakeTensor), name
        assert p is before[name], f"parameter {name} was replaced"


def test_first_calls_with_new_shapes_from_many_threads_match_torch():
    model = _mlp()
    before = dict(model.named_parameters())
    apply, params = bridge.torch_to_jax(model)
    inputs = [torch.randn(i + 1, 6, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]

    outs = _run_threads(lambda i: np.asarray(apply(params, bridge.to_jax(inputs[i]))))

    _assert_real_module(model, before)
    with torch.no_grad():
        for i, out in enumerate(outs):
            np.testing.assert_allclose(out, model(inputs[i]).numpy(), rtol=1e-5, atol=1e-6)


def test_threads_converting_their_own_modules_match_torch():
    models = [_mlp(seed) for seed in range(THREADS)]
    befores = [dict(m.named_parameters()) for m in models]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))

    def convert_and_run(i: int) -> np.ndarray:
        apply, params = bridge.torch_to_jax(models[i])
        return np.asarray(jax.jit(apply)(params, bridge.to_jax(x)))

    outs = _run_threads(convert_and_run)
    with torch.no_grad():
        for model, before, out in zip(models, befores, outs, strict=True):
            _assert_real_module(model, before)
            np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_steady_state_calls_from_many_threads_match_torch():
    model = _mlp()
    apply, params = bridge.torch_to_jax(model)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    jx = bridge.to_jax(x)
    apply(params, jx)  # captured once, before the threads start
    with torch.no_grad():
        expected = model(x).numpy()

    outs = _run_threads(lambda i: [np.asarray(apply(params, jx)) for _ in range(20)])
    for per_thread in outs:
        for out in per_thread:
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        if x.sum() > 0:  # a Python decision on a tensor value: torch.export refuses it
            return self.lin(x) * self.scale
        return x


def test_failed_capture_leaves_the_module_unchanged_in_every_thread():
    model = _Branchy().eval()
    params_before = dict(model.named_parameters())
    buffers_before = dict(model.named_buffers())
    # strict: no module-level fallback to torch, so every capture fails
    apply, params = bridge.torch_to_jax(model, strict=True)

    def call(i: int) -> str:
        with pytest.raises(bridge.CaptureError) as info:
            apply(params, jax.numpy.ones((i + 1, 3)))
        return str(info.value)

    messages = _run_threads(call)
    assert all("if x.sum() > 0" in m for m in messages), messages[0]
    _assert_real_module(model, params_before)
    assert all(b is buffers_before[n] for n, b in model.named_buffers())
    x = torch.ones(2, 3)
    with torch.no_grad():
        out = model(x)
    assert type(out) is torch.Tensor and not isinstance(out, torch._subclasses.FakeTensor)
    np.testing.assert_allclose(out.numpy(), (model.lin(x) * model.scale).detach().numpy())
