"""to_jax / to_torch: sharing proven by data pointers, copies where sharing
cannot be exact, errors for what JAX cannot hold, pytrees kept intact."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bridge
from bridge import dtypes


def ptr(a: jax.Array) -> int:
    return a.unsafe_buffer_pointer()


def aligned(shape, dtype=torch.float32) -> torch.Tensor:
    # torch's CPU allocator aligns to 64 bytes, as JAX requires.
    t = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape).to(dtype)
    assert t.data_ptr() % 64 == 0
    return t


# ----------------------------------------------------------------- sharing


@pytest.mark.parametrize(
    "make",
    [
        lambda: aligned((8, 8)),
        lambda: aligned((8, 8)).t(),
        lambda: aligned((2, 3, 4)).permute(2, 0, 1),
        lambda: aligned((32, 16))[16:],  # offset slice that stays 64-byte aligned
        lambda: aligned(()),
        lambda: aligned((8, 8), torch.bfloat16),
        lambda: aligned((8, 8)) > 3,
        lambda: torch.nn.Parameter(aligned((4, 4))),  # requires grad: detached, shared
    ],
    ids=["contiguous", "transposed", "permuted", "aligned-offset", "0-d", "bf16", "bool", "param"],
)
def test_to_jax_shares_memory(make):
    t = make()
    a = bridge.to_jax(t, copy=False)
    assert ptr(a) == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a, dtype=np.float32), t.detach().float().numpy())
    assert a.shape == tuple(t.shape)
    assert a.dtype == dtypes.to_jax_dtype(t.dtype)


def test_shared_memory_sees_torch_writes():
    t = aligned((4,))
    a = bridge.to_jax(t)
    t.add_(1)
    np.testing.assert_array_equal(np.asarray(a), [1, 2, 3, 4])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: aligned((8, 8))[::2], "dense"),
        (lambda: aligned((8, 8))[:, :4], "dense"),
        (lambda: torch.ones(1, 4).expand(3, 4), "dense"),
        (lambda: aligned((64,))[1:], "aligned"),
        (lambda: torch._neg_view(aligned((3,))), "negation"),
        (lambda: torch.randn(3, dtype=torch.complex64).conj(), "conjugate"),
    ],
    ids=["step-slice", "column-slice", "expanded", "misaligned-offset", "neg-bit", "conj-bit"],
)
def test_to_jax_copies_what_cannot_be_shared(make, reason):
    t = make()
    expected = t.resolve_conj().resolve_neg().numpy().copy()
    a = bridge.to_jax(t)
    assert ptr(a) != t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a), expected)
    assert a.shape == tuple(t.shape)
    with pytest.raises(bridge.SharingError, match=reason):
        bridge.to_jax(t, copy=False)


def test_copy_true_always_copies_both_ways():
    t = aligned((4, 4))
    a = bridge.to_jax(t, copy=True)
    assert ptr(a) != t.data_ptr()
    t.add_(1)
    assert float(a[0, 0]) == 0.0
    x = jnp.arange(4.0)
    u = bridge.to_torch(x, copy=True)
    assert u.data_ptr() != ptr(x)
    u.add_(1)
    assert float(x[0]) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint32, jnp.bool_, jnp.complex64])
def test_to_torch_shares_memory(dtype):
    x = jnp.ones((5, 3), dtype)
    t = bridge.to_torch(x, copy=False)
    assert t.data_ptr() == ptr(x)
    assert t.dtype == dtypes.to_torch_dtype(dtype)
    assert tuple(t.shape) == x.shape


def test_zero_size_and_scalar_round_trip():
    for t in (torch.empty(0, 3), torch.tensor(2.5), torch.empty(2, 0, dtype=torch.int32)):
        a = bridge.to_jax(t)
        assert a.shape == tuple(t.shape) and a.dtype == dtypes.to_jax_dtype(t.dtype)
        back = bridge.to_torch(a)
        assert back.shape == t.shape and back.dtype == t.dtype
        torch.testing.assert_close(back, t)


# ------------------------------------------------------------ 64-bit rule


def test_int64_that_fits_is_narrowed_exactly():
    t = torch.tensor([1, -5, 2**31 - 1])
    a = bridge.to_jax(t)
    assert a.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(a), [1, -5, 2**31 - 1])


def test_int64_that_does_not_fit_raises_naming_x64():
    with pytest.raises(bridge.X64Error, match="jax_enable_x64"):
        bridge.to_jax(torch.tensor([1, 2**40]))


def test_int64_with_copy_false_raises():
    with pytest.raises(bridge.SharingError, match="x64"):
        bridge.to_jax(torch.tensor([1, 2]), copy=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_wide_floats_raise_instead_of_losing_precision(dtype):
    with pytest.raises(bridge.X64Error, match="jax_enable_x64"):
        bridge.to_jax(torch.ones(3, dtype=dtype))


def test_x64_enabled_shares_64_bit(tmp_path):
    # x64 is process-global: check it in a fresh interpreter.
    import subprocess
    import sys

    code = (
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "import torch, bridge\n"
        "t = torch.tensor([1, 2**40]); a = bridge.to_jax(t, copy=False)\n"
        "assert a.dtype == 'int64' and a.unsafe_buffer_pointer() == t.data_ptr(), a\n"
        "assert int(a[1]) == 2**40\n"
        "d = torch.ones(4, dtype=torch.float64); b = bridge.to_jax(d, copy=False)\n"
        "assert b.unsafe_buffer_pointer() == d.data_ptr()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------ errors


def test_clear_errors_for_what_jax_cannot_hold():
    with pytest.raises(TypeError, match="to_dense"):
        bridge.to_jax(torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="meta"):
        bridge.to_jax(torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match="dequantize"):
        bridge.to_jax(torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8))
    with pytest.raises(bridge.UnsupportedDtypeError, match="complex64"):
        bridge.to_jax(torch.ones(3, dtype=torch.complex32))


def test_to_torch_inside_jit_says_what_to_do():
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda x: bridge.to_torch(x))(jnp.ones(2))


# ----------------------------------------------------------------- pytrees


Point = collections.namedtuple("Point", "x y")


@dataclasses.dataclass
class Out:
    logits: object
    extra: object = None


def test_pytrees_keep_structure_and_share():
    t1, t2, t3 = aligned((2,)), aligned((3,)), aligned((4,))
    tree = {"a": [t1, (t2, None, 3)], "p": Point(t3, "s"), "o": Out(t1)}
    j = bridge.to_jax(tree)
    assert isinstance(j["a"], list) and isinstance(j["a"][1], tuple)
    assert j["a"][1][1:] == (None, 3)
    assert isinstance(j["p"], Point) and j["p"].y == "s"
    assert isinstance(j["o"], Out) and j["o"].extra is None
    assert ptr(j["a"][0]) == t1.data_ptr() and ptr(j["p"].x) == t3.data_ptr()
    back = bridge.to_torch(j)
    assert isinstance(back["p"], Point) and isinstance(back["o"], Out)
    assert back["a"][1][0].data_ptr() == t2.data_ptr()


def test_transformers_model_output_round_trips_and_is_a_jax_pytree():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    logits, hidden = aligned((2, 3)), aligned((2, 4))
    out = CausalLMOutputWithPast(logits=logits, hidden_states=(hidden,))
    j = bridge.to_jax(out)
    assert isinstance(j, CausalLMOutputWithPast)
    assert ptr(j.logits) == logits.data_ptr() and ptr(j["hidden_states"][0]) == hidden.data_ptr()
    assert j.loss is None
    # Returned from jit, it keeps its type (it is registered as a JAX pytree).
    y = jax.jit(lambda o: jax.tree_util.tree_map(lambda v: v * 2, o))(j)
    assert isinstance(y, CausalLMOutputWithPast)
    np.testing.assert_array_equal(np.asarray(y.logits), 2 * logits.numpy())
    back = bridge.to_torch(j)
    assert isinstance(back, CausalLMOutputWithPast) and back.logits.data_ptr() == logits.data_ptr()


# ---------------------------------------------------------------- aliasing


def test_checked_writes_catches_torch_writing_into_jax_memory():
    x = jnp.zeros(3)
    with pytest.raises(bridge.AliasingError, match=r"\(3,\)"):
        with bridge.checked_writes():
            t = bridge.to_torch(x)
            t[1:].add_(1)  # through a view
    np.testing.assert_array_equal(np.asarray(x), [0, 1, 1])  # the write did happen


def test_checked_writes_catches_writes_after_to_jax():
    t = aligned((2, 2))
    with pytest.raises(bridge.AliasingError):
        with bridge.checked_writes():
            bridge.to_jax(t)
            t.mul_(2)


def test_checked_writes_is_quiet_for_copies_and_reads():
    x = jnp.zeros(3)
    with bridge.checked_writes():
        t = bridge.to_torch(x, copy=True)
        t.add_(1)
        u = bridge.to_torch(x)
        _ = (u * 2).sum()


# ------------------------------------------------------------------ dtypes


def test_dtype_table_covers_every_common_dtype():
    table = dict(dtypes.all_pairs())
    for name in [
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    ]:
        assert getattr(torch, name) in table, name
    for t, n in table.items():
        assert dtypes.to_torch_dtype(n) == t


@pytest.mark.parametrize("dtype", [t for t, _ in dtypes.all_pairs() if t not in dtypes.WIDE_DTYPES])
def test_every_32_bit_dtype_shares_both_ways(dtype):
    t = torch.zeros(16, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(4, dtype=dtype)
    a = bridge.to_jax(t, copy=False)
    assert ptr(a) == t.data_ptr() and a.dtype == dtypes.to_jax_dtype(dtype)
    back = bridge.to_torch(a, copy=False)
    assert back.data_ptr() == t.data_ptr() and back.dtype == dtype


# -------------------------------------------------------------- properties

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]


@st.composite
def strided_tensors(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    steps = [draw(st.integers(1, 3)) for _ in shape]
    big = [s * k + draw(st.integers(0, 2)) for s, k in zip(shape, steps, strict=True)]
    base = torch.randn(big) * 100 if dtype != torch.bool else torch.randn(big) > 0
    base = base.to(dtype)
    t = base[tuple(slice(0, s * k, k) for s, k in zip(shape, steps, strict=True))]
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, -1)
    return t


@settings(max_examples=150, deadline=None)
@given(strided_tensors())
def test_round_trip_preserves_values_dtype_shape(t):
    a = bridge.to_jax(t)
    expected_dtype = torch.int32 if t.dtype == torch.int64 else t.dtype
    assert a.shape == tuple(t.shape)
    back = bridge.to_torch(a)
    assert back.dtype == expected_dtype and back.shape == t.shape
    assert torch.equal(back, t.to(expected_dtype))
    if t.numel() > 1 and torch._prims_common.is_non_overlapping_and_dense_or_false(t) and t.data_ptr() % 64 == 0 and t.dtype != torch.int64:
        assert ptr(a) == t.data_ptr()
