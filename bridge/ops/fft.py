"""fft ATen ops."""

from __future__ import annotations

import jax.numpy as jnp  # noqa: F401
import torch

from bridge.ops.registry import lowering  # noqa: F401

aten = torch.ops.aten
