"""Sharded training of a translated torch model over 8 simulated JAX CPU devices.

JAX fixes its device count at import, so the training runs in one subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (`_worker`, which
prints its results as JSON); the tests assert on those results. Runs in both
environments (optax when installed, else the same SGD with momentum by hand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xla  # also verified in the torch_xla environment (jax 0.7.1)

N_DEVICES = 8
STEPS = 4


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 4),
    )


def _optimizer():
    try:
        import optax
    except ImportError:
        optax = None
    import jax
    import jax.numpy as jnp

    if optax is not None:
        return optax.sgd(0.1, momentum=0.9)

    class _Sgd:  # optax.sgd(0.1, momentum=0.9), for environments without optax
        def init(self, params):
            return jax.tree.map(jnp.zeros_like, params)

        def update(self, grads, state, params=None):
            state = jax.tree.map(lambda m, g: 0.9 * m + g, state, grads)
            return jax.tree.map(lambda m: -0.1 * m, state), state

    return _Sgd()


def _worker() -> None:
    import jax
    import jax.numpy as jnp
    from bridge.adapters.sharding import param_shardings, shard_params
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import bridge

    assert len(jax.devices()) == N_DEVICES, jax.devices()
    apply, params0 = bridge.torch_to_jax(_model())
    opt = _optimizer()
    x = jax.random.normal(jax.random.key(1), (32, 16))
    y = jax.random.normal(jax.random.key(2), (32, 4))

    def loss_fn(params, x, y):
        return jnp.mean((apply(params, x) - y) ** 2)

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state, loss

    def train(params, x, y, mesh=None):
        state = opt.init(params)
        if mesh is None:
            fn = jax.jit(step)
        else:
            replicated = NamedSharding(mesh, P())
            state = jax.tree.map(
                lambda s: s if len(s.sharding.device_set) > 1 else jax.device_put(s, replicated),
                state,
            )
            shardings = jax.tree.map(lambda a: a.sharding, (params, state))
            fn = jax.jit(step, out_shardings=(*shardings, replicated))
        losses = []
        for _ in range(STEPS):
            params, state, loss = fn(params, state, x, y)
            losses.append(float(loss))
        return params, losses

    def report(params, losses, ref=None):
        out = {
            "losses": losses,
            "specs": {k: str(getattr(v.sharding, "spec", None)) for k, v in params.items()},
            "n_devices": {k: len(v.sharding.device_set) for k, v in params.items()},
            "shard_shapes": {
                k: list(v.addressable_shards[0].data.shape) for k, v in params.items()
            },
        }
        if ref is not None:
            out["max_param_err"] = max(
                float(np.max(np.abs(np.asarray(params[k]) - np.asarray(ref[k])))) for k in ref
            )
        return out

    single, single_losses = train(params0, x, y)
    results = {"single": report(single, single_losses)}

    mesh = Mesh(np.array(jax.devices()), ("data",))
    data = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, data), jax.device_put(y, data)

    dp = shard_params(params0, mesh, [])  # every parameter replicated
    results["data_parallel"] = report(*train(dp, xs, ys, mesh), ref=single)

    fsdp_rules = [
        (r"^[02]\.weight$", P("data", None)),
        (r"^[02]\.bias$", P("data")),
        (r"^4\.weight$", P(None, "data")),
        (r"^4\.bias$", P()),
    ]
    fsdp = shard_params(params0, mesh, fsdp_rules, default=None)
    results["fsdp"] = report(*train(fsdp, xs, ys, mesh), ref=single)

    mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    tp_rules = [(r"^[02]\.weight$", P("model", "data")), (r"^4\.weight$", P(None, "model"))]
    tp = shard_params(params0, mesh2, tp_rules)
    data2 = NamedSharding(mesh2, P("data"))
    results["fsdp_tp"] = report(
        *train(tp, jax.device_put(x, data2), jax.device_put(y, data2), mesh2), ref=single
    )

    errors = {}
    for key, rules, default in [
        ("not_divisible", [(r"weight", P("data", None))], P()),
        ("unmatched", [(r"weight", P())], None),
        ("too_many_dims", [(r"bias", P("data", None))], P()),
        ("unknown_axis", [(r"bias", P("batch"))], P()),
    ]:
        try:
            param_shardings(params0, mesh, rules, default=default)
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    results["errors"] = errors
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}"}
    env["JAX_PLATFORMS"] = "cpu"
    tests_dir = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-c", "import test_sharding; test_sharding._worker()"],
        cwd=tests_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS ") :])


def test_single_device_training_reduces_loss(results):
    losses = results["single"]["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert set(results["single"]["n_devices"].values()) == {1}


@pytest.mark.parametrize("style", ["data_parallel", "fsdp", "fsdp_tp"])
def test_sharded_training_matches_single_device(results, style):
    np.testing.assert_allclose(
        results[style]["losses"], results["single"]["losses"], rtol=1e-5, atol=1e-7
    )
    assert results[style]["max_param_err"] < 1e-5


def test_data_parallel_replicates_every_parameter(results):
    r = results["data_parallel"]
    assert set(r["n_devices"].values()) == {N_DEVICES}
    assert r["shard_shapes"]["2.weight"] == [32, 32]


def test_fsdp_parameters_stay_sharded_through_training(results):
    r = results["fsdp"]
    assert r["shard_shapes"] == {
        "0.weight": [4, 16],
        "0.bias": [4],
        "2.weight": [4, 32],
        "2.bias": [4],
        "4.weight": [4, 4],
        "4.bias": [4],
    }
    assert "'data'" in r["specs"]["0.weight"]


def test_two_axis_mesh_shards_both_ways(results):
    r = results["fsdp_tp"]
    assert r["shard_shapes"]["0.weight"] == [16, 4]  # (32/2, 16/4)
    assert r["shard_shapes"]["4.weight"] == [4, 16]
    assert r["shard_shapes"]["0.bias"] == [32]  # default: replicated


def test_sharding_rule_errors_are_clear(results):
    e = results["errors"]
    assert (
        "'4.weight'" in e["not_divisible"]
        and "not divisible by mesh axis data (size 8)" in e["not_divisible"]
    )
    assert "no sharding rule matches" in e["unmatched"] and "'0.bias'" in e["unmatched"]
    assert "2 entries" in e["too_many_dims"]
    assert "mesh axis 'batch'" in e["unknown_axis"]


def test_shard_params_rejects_malformed_rules():
    import jax
    from bridge.adapters.sharding import shard_params
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(TypeError, match=r"\(regex, PartitionSpec\) pair"):
        shard_params({"w": np.ones((2, 2), np.float32)}, mesh, [(r"w", ("data",))])
