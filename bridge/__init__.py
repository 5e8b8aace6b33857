"""bridge: PyTorch and JAX as one.

Public API (see docs/ and README.md):

    to_jax, to_torch                 zero-copy exchange of tensors and pytrees
    torch_to_jax                     nn.Module -> (apply, params); torch fn -> JAX fn
    torch_to_jax_with_state          nn.Module -> (apply, params, state)
    jax_to_torch                     (apply, params) -> nn.Module; JAX fn -> torch fn
    export                           a port without torch: JAX source or StableHLO + weights
"""

from bridge.adapters.jax_to_torch import jax_to_torch
from bridge.adapters.torch_to_jax import torch_to_jax, torch_to_jax_with_state
from bridge.capture import CaptureError
from bridge.dlpack import (
    AliasingError,
    SharingError,
    X64Error,
    checked_writes,
    to_jax,
    to_torch,
)
from bridge.dtypes import UnsupportedDtypeError
from bridge.export import export

__all__ = [
    "AliasingError",
    "CaptureError",
    "SharingError",
    "UnsupportedDtypeError",
    "X64Error",
    "checked_writes",
    "export",
    "jax_to_torch",
    "to_jax",
    "to_torch",
    "torch_to_jax",
    "torch_to_jax_with_state",
]
__version__ = "0.1.0"
