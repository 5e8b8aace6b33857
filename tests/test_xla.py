"""torch_xla smoke tests (run by `make test-xla` in .venv-xla with PJRT_DEVICE=CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bridge

pytestmark = pytest.mark.xla
torch_xla = pytest.importorskip("torch_xla")


def test_xla_tensor_computes_and_reads_back():
    device = torch_xla.device()
    x = torch.arange(6.0, device=device).reshape(2, 3)
    y = (x * 2 + 1).sum(dim=0)
    assert y.device.type == "xla"
    np.testing.assert_array_equal(y.cpu().numpy(), [7.0, 11.0, 15.0])


def test_to_jax_of_xla_tensor_transfers_unless_copy_false():
    x = torch.arange(4.0, device=torch_xla.device()) + 1
    a = bridge.to_jax(x)
    np.testing.assert_array_equal(np.asarray(a), [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(bridge.SharingError, match="xla"):
        bridge.to_jax(x, copy=False)
