"""The one torch <-> JAX dtype table.

Every dtype that both frameworks hold maps one to one. JAX dtypes are NumPy
dtypes (with `ml_dtypes` providing bfloat16 and the float8 family), so the
table is keyed by `numpy.dtype` on the JAX side.

torch dtypes with no JAX counterpart (complex32, the quantized and bit-packed
types) raise `UnsupportedDtypeError` naming the dtype and the fix.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import torch


class UnsupportedDtypeError(TypeError):
    """A dtype that one side of the bridge cannot hold."""


def _pairs() -> list[tuple[torch.dtype, np.dtype]]:
    pairs = [
        (torch.bool, np.bool_),
        (torch.uint8, np.uint8),
        (torch.int8, np.int8),
        (torch.int16, np.int16),
        (torch.int32, np.int32),
        (torch.int64, np.int64),
        (torch.uint16, np.uint16),
        (torch.uint32, np.uint32),
        (torch.uint64, np.uint64),
        (torch.float16, np.float16),
        (torch.bfloat16, ml_dtypes.bfloat16),
        (torch.float32, np.float32),
        (torch.float64, np.float64),
        (torch.complex64, np.complex64),
        (torch.complex128, np.complex128),
    ]
    # float8 (and newer) types exist only in recent releases of both sides.
    for name in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    ):
        if hasattr(torch, name) and hasattr(ml_dtypes, name):
            pairs.append((getattr(torch, name), getattr(ml_dtypes, name)))
    return [(t, np.dtype(n)) for t, n in pairs]


_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = dict(_pairs())
_NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {n: t for t, n in _TORCH_TO_NUMPY.items()}

#: 64-bit dtypes that JAX narrows to 32 bits unless `jax_enable_x64` is on.
WIDE_DTYPES = frozenset({torch.int64, torch.uint64, torch.float64, torch.complex128})


def to_jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The JAX (NumPy) dtype for a torch dtype; raises if JAX has none."""
    try:
        return _TORCH_TO_NUMPY[dtype]
    except KeyError:
        raise UnsupportedDtypeError(
            f"torch dtype {dtype} has no JAX equivalent. Convert the tensor first, "
            f"for example with `.to(torch.float32)` (complex32: `.to(torch.complex64)`)."
        ) from None


def to_torch_dtype(dtype) -> torch.dtype:
    """The torch dtype for a JAX/NumPy dtype; raises if torch has none."""
    np_dtype = np.dtype(dtype)
    try:
        return _NUMPY_TO_TORCH[np_dtype]
    except KeyError:
        raise UnsupportedDtypeError(
            f"JAX dtype {np_dtype} has no torch equivalent. Convert the array first, "
            f"for example with `.astype(jnp.float32)`."
        ) from None


def canonical_jax_dtype(dtype: torch.dtype) -> np.dtype:
    """The dtype JAX actually uses for `dtype` under the current x64 setting.

    With `jax_enable_x64` off (the default) 64-bit types become 32-bit inside
    JAX programs; traced computations follow that convention.
    """
    return np.dtype(jax.dtypes.canonicalize_dtype(to_jax_dtype(dtype)))


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def all_pairs() -> list[tuple[torch.dtype, np.dtype]]:
    """Every (torch, JAX) dtype pair in the table, for tests and docs."""
    return list(_TORCH_TO_NUMPY.items())
