"""jax_to_torch: JAX functions and Flax modules as torch modules and functions.

Values and gradients are checked against the same computation written in
torch (torch.autograd), sharing by data pointers, training against optax.
"""

from __future__ import annotations

import collections
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen, nnx
from numerics import enable_x64

import bridge

RTOL_OP = 1e-5
RTOL_MODEL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL_MODEL) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-2)


def make_params(seed: int = 0, sizes: tuple[int, ...] = (4, 8, 3)) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": {
            "w": jnp.asarray(rng.standard_normal((sizes[i], sizes[i + 1]), dtype=np.float32) * 0.5),
            "b": jnp.asarray(rng.standard_normal(sizes[i + 1], dtype=np.float32) * 0.1),
        }
        for i in range(len(sizes) - 1)
    }


def mlp(params: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["l0"]["w"] + params["l0"]["b"])
    return h @ params["l1"]["w"] + params["l1"]["b"]


def torch_mlp(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p["l0.w"] + p["l0.b"])
    return h @ p["l1.w"] + p["l1.b"]


def torch_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Independent leaf tensors with the module's values, for a torch reference."""
    return {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}


def jitted_fn(module: torch.nn.Module):
    """The one `JaxFunction` the module compiled so far (its call signature)."""
    (fn,) = module._spec._fns.values()
    return fn


# ------------------------------------------------------------ construction


def test_parameters_share_memory_with_the_jax_arrays():
    params = make_params()
    module = bridge.jax_to_torch(mlp, params)
    assert isinstance(module, torch.nn.Module)
    named = dict(module.named_parameters())
    assert set(named) == {"l0.w", "l0.b", "l1.w", "l1.b"}
    for layer in ("l0", "l1"):
        for leaf in ("w", "b"):
            p, a = named[f"{layer}.{leaf}"], params[layer][leaf]
            assert isinstance(p, torch.nn.Parameter) and p.requires_grad
            assert p.data_ptr() == a.unsafe_buffer_pointer()
            assert p.shape == a.shape and p.dtype == torch.float32


def test_state_dict_round_trips_through_load_state_dict():
    module = bridge.jax_to_torch(mlp, make_params(0))
    other = bridge.jax_to_torch(mlp, make_params(1))
    ptrs = [p.data_ptr() for p in module.parameters()]
    sd = other.state_dict()
    assert list(sd) == ["l0.b", "l0.w", "l1.b", "l1.w"]
    module.load_state_dict(sd)
    assert [p.data_ptr() for p in module.parameters()] == ptrs  # loaded in place
    x = torch.randn(5, 4)
    close(module(x), other(x), RTOL_OP)
    for k, v in module.state_dict().items():
        assert torch.equal(v, sd[k])


def test_flat_dotted_keys_keep_torch_names():
    # The layout bridge.torch_to_jax produces: keyed like named_parameters().
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in lin.state_dict().items()}
    module = bridge.jax_to_torch(lambda p, x: x @ p["0.weight"].T + p["0.bias"], params)
    assert set(module.state_dict()) == set(lin.state_dict())
    x = torch.randn(4, 3)
    close(module(x), lin(x), RTOL_OP)
    module.load_state_dict(lin.state_dict())


def test_items_and_attributes_reach_nested_parameters():
    module = bridge.jax_to_torch(lambda p, x: x, {"layers": [{"w": jnp.ones(2)}]})
    assert module.layers[0].w is module.get_parameter("layers.0.w")
    assert "w: float32[2]" in repr(module)


def test_tied_arrays_become_one_parameter():
    w = jnp.ones((3, 3))
    module = bridge.jax_to_torch(lambda p, x: x @ p["a"] @ p["b"], {"a": w, "b": w})
    assert len(list(module.parameters())) == 1
    x = torch.randn(2, 3)
    module(x).sum().backward()
    t = torch.ones(3, 3, requires_grad=True)
    (x @ t @ t).sum().backward()
    close(module.a.grad, t.grad, RTOL_OP)


def test_jax_params_returns_current_values_sharing_memory():
    params = make_params()
    module = bridge.jax_to_torch(mlp, params)
    with torch.no_grad():
        module.l0.w.mul_(2)
    back = module.jax_params()
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    assert back["l0"]["w"].unsafe_buffer_pointer() == module.l0.w.data_ptr()
    np.testing.assert_array_equal(np.asarray(back["l0"]["w"]), module.l0.w.detach().numpy())


# ------------------------------------------------------------ forward and backward


def test_forward_and_gradients_match_torch():
    module = bridge.jax_to_torch(mlp, make_params())
    ref = torch_copy(module)
    x = torch.randn(6, 4, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out = module(x)
    expected = torch_mlp(ref, xr)
    close(out, expected)
    assert out.dtype == torch.float32 and out.shape == (6, 3)
    (out**2).sum().backward()
    (expected**2).sum().backward()
    close(x.grad, xr.grad)
    for name, p in module.named_parameters():
        close(p.grad, ref[name].grad)


def test_outputs_and_gradients_arrive_without_copies(monkeypatch):
    from bridge.adapters import jax_boundary as impl

    made = []

    def spy(arrays):
        tensors = convert(arrays)
        made.append(
            [
                (t.data_ptr(), a.unsafe_buffer_pointer())
                for t, a in zip(tensors, arrays, strict=True)
            ]
        )
        return tensors

    convert = impl.torch_outputs
    monkeypatch.setattr(impl, "torch_outputs", spy)
    module = bridge.jax_to_torch(mlp, make_params())
    out = module(torch.randn(4, 4))
    out.sum().backward()
    forward, backward = made
    assert all(t == a for t, a in forward + backward)  # tensors view JAX's buffers
    assert forward[0][0] == out.data_ptr()
    # .grad holds JAX's gradient buffers themselves (autograd did not copy them).
    grads = {p.grad.data_ptr() for p in module.parameters()}
    assert grads == {t for t, _ in backward}


def test_backward_reuses_the_forward_residuals():
    module = bridge.jax_to_torch(mlp, make_params())
    x = torch.randn(6, 4)
    for _ in range(3):
        module(x).sum().backward()
    fn = jitted_fn(module)
    assert fn.fwd_vjp._cache_size() == 1  # compiled once for this signature
    assert not any(k[0] == "vjp" for k in fn._derived)  # no recomputing backward built
    assert fn.plain._cache_size() == 0


def _scalar_loss(params: dict, x: jax.Array) -> jax.Array:
    return jnp.mean(mlp(params, x) ** 2)


def _f64_params() -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64), make_params())


def test_scalar_loss_backward_takes_the_gradients_the_forward_computed():
    with enable_x64():
        params = _f64_params()
        module = bridge.jax_to_torch(_scalar_loss, params)
        x = torch.randn(6, 4, dtype=torch.float64)
        module(x).backward()
        fn = jitted_fn(module)
        # One fused program: no residual backward, no recomputing backward built.
        assert fn.apply_vjp._cache_size() == 0 and not fn._derived
        expected = jax.grad(_scalar_loss)(params, jnp.asarray(x.numpy()))
        for name, p in module.named_parameters():
            layer, leaf = name.split(".")
            assert p.grad.dtype == torch.float64
            np.testing.assert_allclose(p.grad.numpy(), expected[layer][leaf], rtol=1e-12)


@pytest.mark.parametrize("scale", [0.5, 3.0, 0.0])
def test_scalar_loss_with_another_cotangent_recomputes_exactly(scale):
    with enable_x64():
        params = _f64_params()
        module = bridge.jax_to_torch(_scalar_loss, params)
        x = torch.randn(6, 4, dtype=torch.float64)
        (module(x) * scale).backward()  # the cotangent is `scale`, not 1
        expected = jax.grad(lambda p: scale * _scalar_loss(p, jnp.asarray(x.numpy())))(params)
        for name, p in module.named_parameters():
            layer, leaf = name.split(".")
            np.testing.assert_allclose(p.grad.numpy(), expected[layer][leaf], rtol=1e-12)


def test_scalar_loss_gradients_are_handed_out_once():
    module = bridge.jax_to_torch(_scalar_loss, make_params())
    x = torch.randn(6, 4)
    loss = module(x)
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad.mul_(100.0)  # writes into the buffers the first backward handed out
    module.zero_grad(set_to_none=True)
    loss.backward()  # recomputes: the written buffers are not reused
    for n, p in module.named_parameters():
        close(p.grad, first[n], RTOL_OP)


def test_scalar_loss_detects_an_inplace_change_of_a_saved_input():
    module = bridge.jax_to_torch(_scalar_loss, make_params())
    loss = module(torch.randn(6, 4))
    with torch.no_grad():
        module.l0.w.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_scalar_loss_with_a_remat_policy_keeps_residuals():
    policy = jax.checkpoint_policies.dots_saveable
    module = bridge.jax_to_torch(_scalar_loss, make_params(), remat_policy=policy)
    module(torch.randn(6, 4)).backward()
    assert jitted_fn(module).apply_vjp._cache_size() == 1


def test_plain_tensor_arguments_take_the_same_cache_key_as_any_other():
    from bridge.adapters.jax_function import split_args

    t = torch.ones(2)
    fast = split_args((t, t), {})
    slow = split_args((torch.nn.Parameter(t), t), {})  # a subclass walks the pytree
    assert fast[1] == slow[1] and hash(fast[1]) == hash(slow[1])
    assert all(a is t for a in fast[0])


def test_inplace_change_of_a_saved_input_is_detected():
    module = bridge.jax_to_torch(mlp, make_params())
    x = torch.randn(6, 4, requires_grad=True)
    out = module(x)
    with torch.no_grad():
        module.l0.w.add_(1)  # the backward would use the changed weights
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_remat_policy_keeps_fewer_residuals_same_gradients():
    def deep(params, x):
        for _ in range(3):
            x = jnp.tanh(x @ params["w"]) * jax.nn.sigmoid(x)
        return x

    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 4), dtype=np.float32))}
    x = torch.randn(5, 4)
    grads, residuals = [], []
    for policy in (None, jax.checkpoint_policies.dots_saveable):
        module = bridge.jax_to_torch(deep, params, remat_policy=policy)
        module(x).pow(2).sum().backward()
        grads.append(module.w.grad)
        fn = jitted_fn(module)
        arrays = [module.w.detach().numpy(), x.numpy()]
        residuals.append(len(fn.fwd_vjp((True, False), *arrays)[2].leaves))
    close(grads[1], grads[0], RTOL_OP)
    assert residuals[1] < residuals[0]


def test_one_compilation_per_input_signature():
    module = bridge.jax_to_torch(mlp, make_params())
    for batch in (2, 3, 2, 3):
        module(torch.randn(batch, 4)).sum().backward()
    assert jitted_fn(module).fwd_vjp._cache_size() == 2


def test_no_grad_skips_the_backward():
    module = bridge.jax_to_torch(mlp, make_params())
    with torch.no_grad():
        out = module(torch.randn(2, 4))
    assert out.grad_fn is None and not out.requires_grad
    fn = jitted_fn(module)
    assert fn.fwd_vjp._cache_size() == 0 and fn.plain._cache_size() == 1


def test_inference_mode_runs_the_plain_function():
    module = bridge.jax_to_torch(mlp, make_params())
    ref = torch_copy(module)
    x = torch.randn(3, 4)
    with torch.inference_mode():
        out = module(x)
    assert not out.requires_grad
    close(out, torch_mlp(ref, x).detach())


def test_inputs_that_require_grad_get_gradients_only_when_asked():
    def f(x, y):
        return jnp.sin(x) * y

    tfn = bridge.jax_to_torch(f)
    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3)
    tfn(x, y).sum().backward()
    close(x.grad, torch.cos(x.detach()) * y, RTOL_OP)
    assert y.grad is None


def test_pytree_inputs_kwargs_and_structured_outputs():
    Out = collections.namedtuple("Out", ["total", "parts"])

    def f(params, batch, *, scale, shift=0.0):
        z = batch["x"] @ params["w"] * scale + shift
        return Out(total=z.sum(), parts={"z": z, "pair": (z * 2, batch["y"] + 1)})

    w = jnp.asarray(np.arange(6, dtype=np.float32).reshape(3, 2))
    module = bridge.jax_to_torch(f, {"w": w})
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(2)
    out = module({"x": x, "y": y}, scale=2.0, shift=1.0)
    assert isinstance(out, Out) and set(out.parts) == {"z", "pair"}
    wt = torch.tensor(np.asarray(w))
    close(out.parts["z"], x.detach() @ wt * 2 + 1, RTOL_OP)
    close(out.parts["pair"][1], y + 1, RTOL_OP)
    assert isinstance(out.parts["pair"], tuple)
    out.total.backward()
    close(x.grad, (torch.ones(4, 2) * 2) @ wt.T, RTOL_OP)
    # A different static value is a different compilation, same structure.
    out2 = module({"x": x, "y": y}, scale=3.0)
    close(out2.parts["z"], x.detach() @ wt * 3, RTOL_OP)


def test_integer_and_boolean_values_pass_through():
    def f(params, x, mask, ids):
        y = jnp.where(mask, x @ params["w"], 0.0) + params["w"][ids].sum()
        return y, jnp.argmax(y, axis=-1), mask.sum()

    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3), dtype=np.float32))
    module = bridge.jax_to_torch(f, {"w": w})
    x = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([True, False, True])
    ids = torch.tensor([0, 2], dtype=torch.int32)
    y, idx, count = module(x, mask, ids)
    assert idx.dtype == torch.int32 and not idx.requires_grad
    assert count.item() == 2 and not count.requires_grad
    wr = torch.tensor(np.asarray(w), requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    yr = torch.where(mask, xr @ wr, 0.0) + wr[ids.long()].sum()
    close(y, yr, RTOL_OP)
    assert torch.equal(idx.long(), yr.argmax(-1))
    (y**2).sum().backward()
    (yr**2).sum().backward()
    close(x.grad, xr.grad, RTOL_OP)
    close(module.w.grad, wr.grad, RTOL_OP)


def test_int64_inputs_arrive_as_exact_int32():
    tfn = bridge.jax_to_torch(lambda ids, x: x[ids])
    out = tfn(torch.tensor([2, 0]), torch.arange(3.0))
    assert torch.equal(out, torch.tensor([2.0, 0.0]))


def test_complex_gradients_follow_torch_convention():
    def f(z, w):
        return jnp.abs(z * w + jnp.conj(z)) ** 2

    tfn = bridge.jax_to_torch(f)
    z = torch.randn(5, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(5, dtype=torch.complex64, requires_grad=True)
    zr, wr = (t.detach().clone().requires_grad_() for t in (z, w))
    tfn(z, w).sum().backward()
    (torch.abs(zr * wr + torch.conj(zr)) ** 2).sum().backward()
    close(z.grad, zr.grad, RTOL_OP)
    close(w.grad, wr.grad, RTOL_OP)


# ------------------------------------------------------------ higher order and torch.func


def test_gradient_penalty_and_create_graph_match_torch():
    module = bridge.jax_to_torch(mlp, make_params())
    ref = torch_copy(module)
    x = torch.randn(5, 4, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
    (gr,) = torch.autograd.grad(torch_mlp(ref, xr).pow(2).sum(), xr, create_graph=True)
    close(g, gr)
    (g.norm() ** 2).backward()
    (gr.norm() ** 2).backward()
    for name, p in module.named_parameters():
        close(p.grad, ref[name].grad)
    close(x.grad, xr.grad)


def test_hessian_matches_torch():
    module = bridge.jax_to_torch(mlp, make_params())
    ref = torch_copy(module)
    x = torch.randn(2, 4)
    h = torch.autograd.functional.hessian(lambda x: module(x).pow(3).sum(), x)
    hr = torch.autograd.functional.hessian(lambda x: torch_mlp(ref, x).pow(3).sum(), x)
    assert h.shape == (2, 4, 2, 4)
    close(h, hr)


def test_torch_func_transforms_match_torch():
    module = bridge.jax_to_torch(mlp, make_params())
    ref = torch_copy(module)
    x = torch.randn(6, 4)

    def loss(x):
        return module(x).pow(2).sum()

    def loss_ref(x):
        return torch_mlp(ref, x).pow(2).sum()

    close(torch.func.grad(loss)(x), torch.func.grad(loss_ref)(x))
    close(torch.func.vmap(module)(x.reshape(3, 2, 4)), torch_mlp(ref, x).reshape(3, 2, 3))
    close(torch.func.vmap(torch.func.grad(loss))(x), torch.func.vmap(torch.func.grad(loss_ref))(x))
    close(torch.func.jacfwd(module)(x[0]), torch.func.jacfwd(lambda x: torch_mlp(ref, x))(x[0]))
    close(torch.func.jacrev(module)(x[0]), torch.func.jacrev(lambda x: torch_mlp(ref, x))(x[0]))
    close(torch.func.hessian(loss)(x[:2]), torch.func.hessian(loss_ref)(x[:2]))


# ------------------------------------------------------------ training


def test_torch_optimizers_match_optax_step_by_step():
    x = torch.randn(16, 4)
    target = torch.randn(16, 3)

    def loss_fn(params, x, target):
        return jnp.mean((mlp(params, x) - target) ** 2)

    for make_torch, make_optax in (
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda: optax.sgd(0.1, momentum=0.9)),
        (lambda p: torch.optim.Adam(p, lr=0.01), lambda: optax.adam(0.01)),
    ):
        params = make_params()
        jparams = jax.tree.map(jnp.copy, params)  # the module writes into `params`
        module = bridge.jax_to_torch(loss_fn, params)
        opt = make_torch(module.parameters())
        tx = make_optax()
        state = tx.init(jparams)
        step = jax.jit(jax.value_and_grad(loss_fn))
        xj, tj = jnp.asarray(x.numpy()), jnp.asarray(target.numpy())
        for _ in range(5):
            opt.zero_grad()
            loss = module(x, target)
            loss.backward()
            opt.step()
            jloss, grads = step(jparams, xj, tj)
            updates, state = tx.update(grads, state, jparams)
            jparams = optax.apply_updates(jparams, updates)
            np.testing.assert_allclose(loss.item(), float(jloss), rtol=RTOL_OP)
        for leaf, p in zip(
            jax.tree_util.tree_leaves(jparams),
            jax.tree_util.tree_leaves(module.jax_params()),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(p), np.asarray(leaf), rtol=RTOL_MODEL, atol=1e-6)


class Mixed(torch.nn.Module):
    """torch layers around a JAX block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.block = bridge.jax_to_torch(mlp, make_params(sizes=(4, 8, 4)))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(self.embed(x))))


def test_mixed_model_trains():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(32, 3)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.block.parameters())


# ------------------------------------------------------------ torch.compile and torch.export


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = Mixed()
    x = torch.randn(5, 3)
    expected = model(x)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    close(out, expected, RTOL_OP)
    for n, p in model.named_parameters():
        close(p.grad, grads[n], RTOL_OP)
    (fn,) = model.block._spec._fns.values()
    # The compiled backward used the residuals the forward op returned.
    assert any(k[0] == "resvjp" for k in fn._derived)
    assert not any(k[0] == "vjp" for k in fn._derived)


def test_torch_export_records_the_jax_call():
    model = Mixed()
    x = torch.randn(5, 3)
    ep = torch.export.export(model, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.bridge.jax_call.default in targets
    close(ep.module()(x), model(x), RTOL_OP)


# ------------------------------------------------------------ modes and state


def test_train_flag_follows_module_training():
    def f(params, x, train):
        return x * params["s"] * (2.0 if train else 1.0)

    module = bridge.jax_to_torch(f, {"s": jnp.ones(())})
    x = torch.ones(2)
    assert torch.equal(module(x), torch.full((2,), 2.0))
    module.eval()
    assert torch.equal(module(x), torch.ones(2))
    assert torch.equal(module(x, train=True), torch.full((2,), 2.0))  # explicit wins


def test_deterministic_flag_is_inverted():
    module = bridge.jax_to_torch(
        lambda p, x, deterministic: x + (0.0 if deterministic else 1.0), {}
    )
    assert module(torch.zeros(1)).item() == 1.0
    assert module.eval()(torch.zeros(1)).item() == 0.0


def dropout_apply(params, x, rng):
    keep = jax.random.bernoulli(rng, 0.5, x.shape)
    return jnp.where(keep, x * params["s"] * 2, 0.0)


def test_module_manages_a_seeded_key():
    params = {"s": jnp.ones(())}
    a = bridge.jax_to_torch(dropout_apply, params, seed=1)
    b = bridge.jax_to_torch(dropout_apply, params, seed=1)
    c = bridge.jax_to_torch(dropout_apply, params, seed=2)
    x = torch.ones(64)
    a1, a2 = a(x), a(x)
    assert not torch.equal(a1, a2)  # a fresh key on every call
    assert torch.equal(a1, b(x)) and torch.equal(a2, b(x))  # same seed, same stream
    assert not torch.equal(a1, c(x))
    # The key is state: saved and restored with state_dict.
    assert a.rng_key.dtype == torch.uint32 and "rng_key" in a.state_dict()
    c.load_state_dict(a.state_dict())
    assert torch.equal(a(x), c(x))
    # The documented scheme: split the module's key, use the second half.
    key = jax.random.key(1)
    _, use = jax.random.split(key)
    expected = dropout_apply(params, jnp.ones(64), use)
    np.testing.assert_array_equal(np.asarray(expected), a1.detach().numpy())


def test_state_becomes_buffers_replaced_after_each_call():
    def apply(params, state, x):
        mean = 0.9 * state["mean"] + 0.1 * x.mean(0)
        return (x - mean) * params["scale"], {"mean": mean, "steps": state["steps"] + 1}

    state = {"mean": jnp.zeros(3), "steps": jnp.zeros((), jnp.int32)}
    module = bridge.jax_to_torch(apply, {"scale": jnp.ones(3)}, state=state)
    assert dict(module.named_buffers()).keys() == {"mean", "steps"}
    assert module.mean.data_ptr() == state["mean"].unsafe_buffer_pointer()
    x = torch.randn(4, 3, requires_grad=True)
    out = module(x)
    module(x)  # a second update before the first backward
    out.sum().backward()
    expected_mean = 0.1 * x.detach().mean(0)
    close(out, x.detach() - expected_mean, RTOL_OP)
    close(module.mean, 0.9 * expected_mean + 0.1 * x.detach().mean(0), RTOL_OP)
    assert module.steps.item() == 2 and module.steps.dtype == torch.int32
    np.testing.assert_array_equal(np.asarray(state["mean"]), np.zeros(3))  # not written
    xr = x.detach().clone().requires_grad_()
    (xr - 0.1 * xr.mean(0)).sum().backward()
    close(x.grad, xr.grad, RTOL_OP)
    assert module.state_dict()["steps"].item() == 2


def test_state_under_torch_compile_updates_buffers_in_place():
    torch._dynamo.reset()

    def apply(params, state, x):
        return x * params["w"] + state["c"], {"c": state["c"] + 1}

    module = bridge.jax_to_torch(apply, {"w": jnp.ones(2)}, state={"c": jnp.zeros(2)})
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.ones(2, requires_grad=True)
    for step in range(3):
        out = compiled(x)
        out.sum().backward()
        close(out, torch.full((2,), 1.0 + step), RTOL_OP)
    close(module.c, torch.full((2,), 3.0), RTOL_OP)
    close(module.w.grad, torch.full((2,), 3.0), RTOL_OP)


# ------------------------------------------------------------ Flax


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.drop(nnx.relu(self.bn(self.linear(x)))))


def independent_copy(model: nnx.Module) -> nnx.Module:
    """A clone with its own memory: the torch module writes into `model`'s arrays."""
    copy = nnx.clone(model)
    nnx.update(copy, jax.tree.map(jnp.copy, nnx.state(copy)))
    return copy


def test_nnx_module_matches_nnx_in_both_modes():
    model = NnxNet(nnx.Rngs(0))
    reference = independent_copy(model)
    module = bridge.jax_to_torch(model)
    names = set(module.state_dict())
    assert {"linear.kernel", "linear.bias", "bn.mean", "bn.var"} <= names
    assert {n for n, _ in module.named_parameters()} == {
        "linear.kernel",
        "linear.bias",
        "bn.scale",
        "bn.bias",
        "out.kernel",
        "out.bias",
    }
    assert module.linear.kernel.data_ptr() == model.linear.kernel[...].unsafe_buffer_pointer()
    x = np.random.default_rng(0).standard_normal((8, 3), dtype=np.float32)
    reference.train()
    for _ in range(2):  # dropout streams and batch statistics advance alike
        out = module(torch.from_numpy(x))
        close(out, torch.from_numpy(np.asarray(reference(jnp.asarray(x)))), RTOL_OP)
    close(module.bn.mean, torch.from_numpy(np.asarray(reference.bn.mean[...])), RTOL_OP)
    module.eval()
    reference.eval()
    close(module(torch.from_numpy(x)), torch.from_numpy(np.asarray(reference(jnp.asarray(x)))))


def test_nnx_gradients_match_nnx_grad():
    model = NnxNet(nnx.Rngs(1))
    reference = independent_copy(model)
    module = bridge.jax_to_torch(model).eval()
    reference.eval()
    x = np.random.default_rng(1).standard_normal((8, 3), dtype=np.float32)
    module(torch.from_numpy(x)).pow(2).sum().backward()
    grads = nnx.grad(lambda m: (m(jnp.asarray(x)) ** 2).sum())(reference)
    close(module.linear.kernel.grad, torch.from_numpy(np.asarray(grads.linear.kernel[...])))
    close(module.bn.scale.grad, torch.from_numpy(np.asarray(grads.bn.scale[...])))


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = linen.Dense(4)(x)
        x = linen.BatchNorm(use_running_average=not train)(x)
        x = linen.Dropout(0.5, deterministic=not train)(x)
        return linen.Dense(2)(x)


def test_linen_module_with_variables():
    net = LinenNet()
    x = np.random.default_rng(0).standard_normal((8, 3), dtype=np.float32)
    variables = net.init(jax.random.key(0), jnp.asarray(x), train=False)
    jvars = jax.tree.map(jnp.copy, variables)
    module = bridge.jax_to_torch(net, variables, seed=3)
    assert {n for n, _ in module.named_parameters()} == {
        "Dense_0.kernel",
        "Dense_0.bias",
        "BatchNorm_0.scale",
        "BatchNorm_0.bias",
        "Dense_1.kernel",
        "Dense_1.bias",
    }
    assert {"batch_stats.BatchNorm_0.mean", "rng_key"} <= set(module.state_dict())
    out = module(torch.from_numpy(x))
    # Train mode: the documented key scheme, batch statistics updated.
    _, use = jax.random.split(jax.random.key(3))
    expected, updates = net.apply(
        jvars,
        jnp.asarray(x),
        train=True,
        rngs={"dropout": jax.random.fold_in(use, 0)},
        mutable=["batch_stats"],
    )
    close(out, torch.from_numpy(np.asarray(expected)), RTOL_OP)
    close(
        module.batch_stats.BatchNorm_0.mean,
        torch.from_numpy(np.asarray(updates["batch_stats"]["BatchNorm_0"]["mean"])),
        RTOL_OP,
    )
    module.eval()
    a, b = module(torch.from_numpy(x)), module(torch.from_numpy(x))
    assert torch.equal(a, b)
    out.sum().backward()
    assert module.Dense_0.kernel.grad.shape == (3, 4)


# ------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bridge.jax_to_torch(torch.nn.Linear(2, 2)), "bridge.torch_to_jax"),
        (lambda: bridge.jax_to_torch(3), "expects a JAX function"),
        (lambda: bridge.jax_to_torch(NnxNet(nnx.Rngs(0)), {}), "carries its own"),
        (lambda: bridge.jax_to_torch(LinenNet()), r"module.init\(key"),
        (lambda: bridge.jax_to_torch(LinenNet(), {"x": 1}), "'params' collection"),
        (lambda: bridge.jax_to_torch(mlp, {"w": 1.0}), r"at w is a float.*jnp.asarray"),
        (
            lambda: bridge.jax_to_torch(mlp, make_params(), train_arg="mode"),
            "no keyword argument 'mode'",
        ),
        (
            lambda: bridge.jax_to_torch(mlp, {"a.b": jnp.ones(1), "a": {"b": jnp.ones(1)}}),
            "both named 'a.b'",
        ),
        (lambda: bridge.jax_to_torch(jnp.sin, state={}), "needs params too"),
    ],
    ids=[
        "torch-module",
        "not-callable",
        "nnx-with-params",
        "linen-no-vars",
        "linen-bad-vars",
        "scalar-leaf",
        "train-arg",
        "name-clash",
        "state-without-params",
    ],
)
def test_bad_construction_says_what_to_do(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_unhashable_static_argument_is_named():
    tfn = bridge.jax_to_torch(lambda x, opts: x)
    match = "leaf #1 is a bytearray, which is neither an array nor a hashable constant"
    with pytest.raises(TypeError, match=match):
        tfn(torch.ones(1), bytearray(b"options"))


def test_float64_input_with_x64_off_is_an_error():
    tfn = bridge.jax_to_torch(jnp.sin)
    with pytest.raises(bridge.X64Error, match="jax_enable_x64"):
        tfn(torch.ones(2, dtype=torch.float64))


def test_state_structure_change_is_an_error():
    module = bridge.jax_to_torch(
        lambda p, s, x: (x, {"other": x}), {}, state={"count": jnp.zeros(())}
    )
    with pytest.raises(ValueError, match="structure of the state passed in"):
        module(torch.ones(()))


def test_jax_errors_name_the_function_and_shapes():
    def bad(params, x):
        return x @ params["w"]

    module = bridge.jax_to_torch(bad, {"w": jnp.ones((3, 2))})
    with pytest.raises(TypeError) as info:
        module(torch.ones(4, 5))
    assert "bad" in "".join(getattr(info.value, "__notes__", []))


def test_docs_example_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "jax_to_torch.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/jax_to_torch.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    assert all(p.grad is not None for p in model.parameters())


def test_graph_calling_a_freed_module_raises_naming_the_cause():
    # The op's function registry is weak: it does not keep a dropped module's
    # JAX function alive, and a graph that still calls it gets a clear error.
    import gc

    module = bridge.jax_to_torch(lambda p, x: x * p["w"], {"w": jnp.full(2, 3.0)})
    x = torch.ones(2)
    assert module(x).tolist() == [3.0, 3.0]
    (key_fn,) = module._spec._fns.values()
    w = module.w.detach()
    assert torch.ops.bridge.jax_call([w, x], key_fn.key, [False, False])[0].tolist() == [3.0, 3.0]
    key = key_fn.key
    del module, key_fn
    gc.collect()
    with pytest.raises(RuntimeError, match=r"no longer exists.*Keep the module alive"):
        torch.ops.bridge.jax_call([w, x], key, [False, False])
