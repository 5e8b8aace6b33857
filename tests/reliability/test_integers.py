"""Integer semantics: what torch computes in int64 comes out exact or raises;
an out-of-range index or an integer division by zero raises as in torch.

With JAX's x64 mode off, JAX holds int64 as int32. Before, the translated graph
computed torch's int64 ops in int32 and wrapped silently ([2**30]*3 summed to
-1073741824); embedding ids out of range gave a NaN row and a clamped row, and
`a // 0` gave -1. Eager calls now raise torch's error type; calls under a JAX
transform stop the program with a JaxRuntimeError carrying the same message.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fn(f, **kw):
    return bridge.torch_to_jax(f, **kw)


# -- int64 computed exactly, narrowed with a check


def test_int64_sum_that_exceeds_int32_raises_instead_of_wrapping():
    x = torch.tensor([2**30] * 3)
    f = _fn(lambda t: t.sum())
    with pytest.raises(bridge.X64Error, match="jax_enable_x64"):
        f(bridge.to_jax(x))


def test_int64_sum_that_fits_is_exact():
    x = torch.tensor([2**30, 2**30, -(2**30) + 5])
    f = _fn(lambda t: t.sum())
    out = f(bridge.to_jax(x))
    assert out.dtype == jnp.int32 and int(out) == int(x.sum())


def test_int64_product_that_exceeds_int32_raises_and_one_that_fits_is_exact():
    f = _fn(lambda t: (t * 1000003) % 1000000007)
    big = torch.tensor([123456789, 2**30])
    with pytest.raises(bridge.X64Error, match="a product"):
        f(bridge.to_jax(big))
    small = torch.tensor([-2000, 5, 2000])
    np.testing.assert_array_equal(np.asarray(f(bridge.to_jax(small))), ((small * 1000003) % 1000000007).numpy())
    np.testing.assert_array_equal(
        np.asarray(jax.jit(f)(bridge.to_jax(small))), ((small * 1000003) % 1000000007).numpy()
    )


@pytest.mark.parametrize(
    "name, f, bad, good",
    [
        ("add", lambda t: t + (2**31 - 10), [10], [9, -5]),
        ("sub", lambda t: t - 10, [-(2**31) + 5], [-(2**31) + 10]),
        ("rsub_alpha", lambda t: torch.rsub(t, 1, alpha=3), [-(2**30)], [7]),
        ("neg", lambda t: -t, [-(2**31)], [2**31 - 1]),
        ("abs", lambda t: t.abs(), [-(2**31)], [-(2**31) + 1]),
        ("pow", lambda t: t**3, [1291], [1290, -1290]),
        ("lshift", lambda t: t << 4, [2**27], [2**27 - 1, -(2**27)]),
        ("cumsum", lambda t: t.cumsum(0), [2**30, 2**30], [2**30, 2**30 - 1, -(2**30)]),
        ("cumprod", lambda t: t.cumprod(0), [65536, 32768], [65536, 32767]),
        ("prod", lambda t: t.prod(), [-65536, 32769], [-65536, 32768]),
        ("floor_divide", lambda t: t // -1, [-(2**31)], [-(2**31) + 1]),
    ],
)
def test_int64_ops_are_exact_or_raise(name, f, bad, good):
    jf = _fn(f)
    with pytest.raises(bridge.X64Error):
        jf(jnp.array(bad, jnp.int32))
    expected = f(torch.tensor(good))
    got = jf(jnp.array(good, jnp.int32))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), expected.numpy())


def test_float_to_int64_cast_out_of_int32_range_raises():
    f = _fn(lambda t: t.long())
    with pytest.raises(bridge.X64Error):
        f(jnp.array([3e9], jnp.float32))
    np.testing.assert_array_equal(np.asarray(f(jnp.array([3.7, -2e9]))), [3, -2000000000])
    # -inf cast and then discarded (T5's relative-position buckets) is no overflow
    g = _fn(lambda t: torch.where(t > 0, t.long(), 0))
    np.testing.assert_array_equal(np.asarray(g(jnp.array([-jnp.inf, 2.5]))), [0, 2])


def test_int64_overflow_under_jit_stops_the_program():
    f = jax.jit(_fn(lambda t: t.sum()))
    with pytest.raises(Exception, match="does not fit in int32") as info:
        jax.block_until_ready(f(bridge.to_jax(torch.tensor([2**30] * 3))))
    assert "JaxRuntimeError" in type(info.value).__name__


def test_int64_is_exact_with_x64_enabled():
    with jax.enable_x64(True):
        x = torch.tensor([2**40, 3, 2**33])
        f = _fn(lambda t: (t * 1000003).sum())
        out = f(bridge.to_jax(x))
        assert out.dtype == jnp.int64 and int(out) == int((x * 1000003).sum())


def test_int64_buffer_update_is_checked():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.tensor(2**31 - 2))

        def forward(self, x):
            self.n.add_(x.shape[0])
            return x * 2

    apply, params, state = bridge.torch_to_jax_with_state(Counter())
    out, new_state = apply(params, state, jnp.ones(1))
    assert int(new_state["n"]) == 2**31 - 1
    with pytest.raises(bridge.X64Error, match="a sum"):
        apply(params, new_state, jnp.ones(1))


# -- indices


def test_embedding_ids_out_of_range_raise_index_error():
    emb = torch.nn.Embedding(10, 3)
    with pytest.raises(IndexError):
        emb(torch.tensor([12, -1]))
    apply, params = bridge.torch_to_jax(emb)
    for ids in ([12, 1], [1, -1], [10]):
        with pytest.raises(IndexError, match=r"\[0, 10\)"):
            apply(params, jnp.array(ids))
    np.testing.assert_allclose(
        np.asarray(apply(params, jnp.array([0, 9]))), emb(torch.tensor([0, 9])).detach().numpy()
    )


def test_embedding_ids_out_of_range_under_jit_and_vmap_stop_the_program():
    emb = torch.nn.Embedding(10, 3)
    apply, params = bridge.torch_to_jax(emb)
    with pytest.raises(Exception, match="index out of range"):
        jax.block_until_ready(jax.jit(apply)(params, jnp.array([12, 1])))
    # Only the second example is out of range: the batch fails.
    with pytest.raises(Exception, match="index out of range"):
        jax.block_until_ready(jax.vmap(lambda i: apply(params, i))(jnp.array([[1], [11]])))
    # Inside jit on closed-over concrete arrays the call is traced too.
    ids = jnp.array([12, 1])
    with pytest.raises(Exception, match="index out of range"):
        jax.block_until_ready(jax.jit(lambda: apply(params, ids))())
    ok = jax.vmap(lambda i: apply(params, i))(jnp.array([[1], [2]]))
    assert ok.shape == (2, 1, 3)


def test_gradient_through_a_checked_gather_matches_torch():
    emb = torch.nn.Embedding(10, 3)
    apply, params = bridge.torch_to_jax(emb)
    ids = torch.tensor([1, 1, 4])
    grad = jax.grad(lambda p: apply(p, bridge.to_jax(ids)).sum())(params)["weight"]
    emb(ids).sum().backward()
    np.testing.assert_allclose(np.asarray(grad), emb.weight.grad.numpy())


@pytest.mark.parametrize(
    "name, f, bad, good",
    [
        ("index", lambda x, i: x[i], [3], [-3, 2]),
        ("index_select", lambda x, i: x.index_select(0, i), [-1], [0, 2]),
        ("gather", lambda x, i: x.gather(0, i[:, None].expand(-1, 4)), [3], [0, 2]),
        ("take", lambda x, i: x.take(i), [12], [-12, 11]),
        ("index_put", lambda x, i: x.index_put((i,), torch.tensor(1.0)), [-4], [-3, 1]),
        ("scatter_add", lambda x, i: x.scatter_add(0, i[:, None].expand(-1, 4), torch.ones(len(i), 4)), [3], [0, 2]),
        ("index_add", lambda x, i: x.index_add(0, i, torch.ones(len(i), 4)), [-1], [0, 2]),
        ("index_copy", lambda x, i: x.index_copy(0, i, torch.ones(len(i), 4)), [5], [0, 2]),
        ("index_fill", lambda x, i: x.index_fill(0, i, 2.0), [-4], [-3, 2]),
    ],
)
def test_indexing_ops_raise_where_torch_raises(name, f, bad, good):
    x = torch.arange(12.0).reshape(3, 4)
    with pytest.raises((IndexError, RuntimeError)):
        f(x, torch.tensor(bad))
    jf = _fn(f)
    with pytest.raises(IndexError, match="index out of range"):
        jf(bridge.to_jax(x), jnp.array(bad))
    np.testing.assert_allclose(np.asarray(jf(bridge.to_jax(x), jnp.array(good))), f(x, torch.tensor(good)).numpy())


def test_checks_false_follows_jax_rules():
    emb = torch.nn.Embedding(10, 3)
    apply, params = bridge.torch_to_jax(emb, checks=False)
    out = apply(params, jnp.array([12]))  # JAX's gather: no error
    assert out.shape == (1, 3)


# -- integer division


@pytest.mark.parametrize(
    "f",
    [
        lambda a, b: a // b,
        lambda a, b: torch.div(a, b, rounding_mode="trunc"),
        lambda a, b: torch.div(a, b, rounding_mode="floor"),
        lambda a, b: a % b,
        lambda a, b: torch.fmod(a, b),
    ],
    ids=["floor_divide", "div_trunc", "div_floor", "remainder", "fmod"],
)
def test_integer_division_by_zero_raises(f):
    a, b = torch.tensor([5, -7]), torch.tensor([2, 0])
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        f(a, b)
    jf = _fn(f)
    with pytest.raises(ZeroDivisionError):
        jf(bridge.to_jax(a), bridge.to_jax(b))
    b = torch.tensor([2, -3])
    np.testing.assert_array_equal(np.asarray(jf(bridge.to_jax(a), bridge.to_jax(b))), f(a, b).numpy())


def test_float_division_by_zero_is_not_an_error():
    f = _fn(lambda a, b: a // b)
    out = np.asarray(f(jnp.array([1.0, -1.0]), jnp.array([0.0, 0.0])))
    np.testing.assert_array_equal(out, (torch.tensor([1.0, -1.0]) // torch.tensor([0.0, 0.0])).numpy())
