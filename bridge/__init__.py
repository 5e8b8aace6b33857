"""bridge: PyTorch and JAX as one.

Public API (see docs/ and README.md):

    to_jax, to_torch                 zero-copy exchange of tensors and pytrees
    torch_to_jax                     nn.Module -> (apply, params); torch fn -> JAX fn
    torch_to_jax_with_state          nn.Module -> (apply, params, state)
    jax_to_torch                     (apply, params) -> nn.Module; JAX fn -> torch fn
    export                           a port without torch: JAX source or StableHLO + weights
    shard_params, param_shardings    params over a device mesh
    xla_call                         a JAX function inside torch_xla's graph (bridge.xla)
    callback.wrap                    a torch function as a JAX primitive (bridge.callback)
"""

# `bridge.callback` and `bridge.xla` are public modules; importing xla also
# registers XLA-device tensors with to_jax / to_torch (torch_xla stays lazy).
from bridge import callback, xla
from bridge.adapters.jax_to_torch import jax_to_torch
from bridge.adapters.sharding import param_shardings, shard_params
from bridge.adapters.torch_to_jax import torch_to_jax, torch_to_jax_with_state
from bridge.capture import CaptureError
from bridge.dlpack import AliasingError, SharingError, checked_writes, to_jax, to_torch
from bridge.dtypes import UnsupportedDtypeError
from bridge.export import export
from bridge.fallback import FallbackError
from bridge.x64 import X64Error
from bridge.xla import xla_call

__all__ = [
    "AliasingError",
    "CaptureError",
    "FallbackError",
    "SharingError",
    "UnsupportedDtypeError",
    "X64Error",
    "callback",
    "checked_writes",
    "export",
    "jax_to_torch",
    "param_shardings",
    "shard_params",
    "to_jax",
    "to_torch",
    "torch_to_jax",
    "torch_to_jax_with_state",
    "xla",
    "xla_call",
]
__version__ = "0.1.0"
