"""`checked_writes`: what it catches, and what it documents as not caught.

torch's version counter misses writes through `.data` and fused optimizer
kernels; a fingerprint of the bytes of each watched CPU buffer (taken when
it is recorded, compared when the block ends) catches them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge


def _aligned(shape, dtype=torch.float32):
    # JAX shares only 64-byte aligned CPU memory; fresh allocations of this size are.
    t = torch.zeros(shape, dtype=dtype)
    assert t.data_ptr() % 64 == 0
    return t


# --------------------------------------------------------------------------
# caught


def test_write_through_data_into_shared_parameter_is_caught():
    m = torch.nn.Linear(4, 4)
    with pytest.raises(bridge.AliasingError, match=r"\(4, 4\).*`\.data`, a fused kernel"):
        with bridge.checked_writes():
            _, params = bridge.torch_to_jax(m)
            m.weight.data.add_(1)
    # the write did happen, in the JAX array too: that is what the error is about
    np.testing.assert_array_equal(np.asarray(params["weight"]), m.weight.detach().numpy())


def test_fused_adam_step_into_shared_parameters_is_caught():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
    m(torch.randn(2, 4)).sum().backward()
    with pytest.raises(bridge.AliasingError, match="written in place"):
        with bridge.checked_writes():
            _, params = bridge.torch_to_jax(m)  # kept: freed arrays are not checked
            opt.step()


def test_data_write_into_memory_from_to_torch_is_caught():
    x = jnp.zeros((3, 5))
    with pytest.raises(bridge.AliasingError, match=r"made by to_torch"):
        with bridge.checked_writes():
            t = bridge.to_torch(x)
            t.data[0, 0] = 7.0
    assert float(x[0, 0]) == 7.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.bool, torch.int8, torch.complex64])
def test_fingerprint_covers_every_dtype(dtype):
    t = _aligned((4, 4), dtype)
    with pytest.raises(bridge.AliasingError):
        with bridge.checked_writes():
            bridge.to_jax(t)
            t.data[1, 2] = 1
    with bridge.checked_writes():  # and is quiet when nothing changes
        bridge.to_jax(t)
        _ = t.sum()


@pytest.mark.skipif(
    not bridge.dlpack.jax_reads_strides(), reason="this jax copies transposed tensors"
)
def test_data_write_into_a_shared_transposed_tensor_is_caught():
    t = _aligned((4, 6)).t()  # dense but permuted: still shared
    with pytest.raises(bridge.AliasingError):
        with bridge.checked_writes():
            a = bridge.to_jax(t)
            t.data[5, 3] = 2.0
    assert float(a[5, 3]) == 2.0


def test_watch_catches_buffers_shared_before_the_block():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    _, params = bridge.torch_to_jax(m)  # shared before the block
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(2, 4)).sum().backward()
    with pytest.raises(bridge.AliasingError, match=r"watched JAX array \['weight'\]"):
        with bridge.checked_writes(params):
            opt.step()


def test_watch_catches_optimizer_updates_of_a_jax_to_torch_module():
    module = bridge.jax_to_torch(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 4))})
    opt = torch.optim.Adam(module.parameters(), lr=0.1, fused=True)
    module(torch.ones(1, 4)).sum().backward()
    with pytest.raises(bridge.AliasingError, match=r"\['w'\]"):
        with bridge.checked_writes(module.jax_params()):
            opt.step()


def test_watch_of_torch_tensors_uses_version_and_fingerprint():
    t = torch.zeros(3)
    with pytest.raises(bridge.AliasingError, match=r"watched torch tensor \['t'\]"):
        with bridge.checked_writes({"t": t}):
            t.data.add_(1)
    with pytest.raises(bridge.AliasingError, match=r"watched torch tensor"):
        with bridge.checked_writes(t):
            t.add_(1)


def test_quiet_for_reads_copies_and_functional_updates():
    m = torch.nn.Linear(4, 4)
    with bridge.checked_writes():
        apply, params = bridge.torch_to_jax(m)
        out = apply(params, jnp.ones((1, 4)))
        t = bridge.to_torch(out, copy=True)
        t.data.add_(1)  # a private copy
        new = {k: v - 0.1 for k, v in params.items()}  # JAX-style update: new arrays
    assert new["weight"].shape == (4, 4)


# --------------------------------------------------------------------------
# documented as not caught


def test_not_caught_buffer_shared_before_the_block_and_not_watched():
    t = _aligned((8,))
    a = bridge.to_jax(t)
    with bridge.checked_writes():  # no error: t was shared outside the block
        t.add_(1)
    assert float(a[0]) == 1.0  # ... although the JAX array changed


def test_not_caught_tensor_and_array_freed_before_the_block_ends():
    with bridge.checked_writes():
        t = _aligned((8,))
        a = bridge.to_jax(t)
        t.data.add_(1)
        del t, a  # nothing left to compare against
    # (a leak check is not the point; the block simply has nothing to report)


def test_not_caught_write_that_restores_the_bytes():
    t = _aligned((8,))
    with bridge.checked_writes():
        bridge.to_jax(t)
        t.data.add_(1)
        t.data.sub_(1)  # the JAX array holds its original values again
