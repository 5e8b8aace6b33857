"""64-bit values with JAX's x64 mode off: the one narrowing rule and its errors.

With `jax_enable_x64` off (JAX's default) JAX holds no 64-bit values: it
would silently turn int64 into int32. The bridge never lets that happen
quietly. An int64/uint64 value crosses as int32/uint32 when every element
fits (checked on the values), and raises `X64Error` otherwise; a
float64/complex128 value always raises, since narrowing it changes values.
Every crossing applies this rule through this module: `to_jax`, the outputs
of a torch callback (eager and under `jit`), and torch_xla tensors.
"""

from __future__ import annotations

import torch

from bridge import dtypes

__all__ = ["X64Error", "jax_dtype", "narrow", "narrows"]


class X64Error(ValueError):
    """A 64-bit value that JAX cannot hold exactly with x64 disabled."""


# Each 64-bit dtype and the 32-bit one JAX would turn it into.
_NARROW = {
    torch.int64: torch.int32,
    torch.uint64: torch.uint32,
    torch.float64: torch.float32,
    torch.complex128: torch.complex64,
}
# ... of which these narrow exactly when the values fit.
_EXACT = frozenset({torch.int64, torch.uint64})

_FIX = (
    "Enable 64-bit JAX with `jax.config.update('jax_enable_x64', True)` "
    "(or JAX_ENABLE_X64=1) before creating arrays"
)


def jax_dtype(dtype: torch.dtype, what: str) -> torch.dtype:
    """The torch dtype of the values JAX holds for a `dtype` value (`what`).

    `dtype` itself, except with x64 off: int64/uint64 become int32/uint32
    (narrowed by `narrow`, which checks the values), and float64/complex128
    raise `X64Error`, naming `what`.
    """
    if dtype not in dtypes.WIDE_DTYPES or dtypes.x64_enabled():
        return dtype
    narrow_to = _NARROW[dtype]
    if dtype not in _EXACT:
        raise X64Error(
            f"{what} is {dtype}, but JAX's x64 mode is off and narrowing it to {narrow_to} "
            f"would change its values. {_FIX}, or convert it explicitly with "
            f"`.to({narrow_to})`."
        )
    return narrow_to


def narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """True if `dst` is the 32-bit dtype that 64-bit integer `src` narrows to exactly."""
    return src in _EXACT and _NARROW[src] == dst


def narrow(t: torch.Tensor, dst: torch.dtype, what: str) -> torch.Tensor:
    """64-bit integer `t` (`what`) cast to `dst`, its 32-bit form; `X64Error`
    naming the values if any of them does not fit."""
    out = t.to(dst)
    bad = _values_outside(t, out)
    if bad is not None:
        raise X64Error(
            f"{what} holds {bad}, outside the range of {dst}, and JAX's x64 mode is off, "
            f"so JAX cannot hold them. {_FIX}."
        )
    return out


def _values_outside(t: torch.Tensor, narrowed: torch.Tensor) -> str | None:
    """Describe the values of 64-bit integer `t` that `narrowed` (its 32-bit cast) lost.

    Returns None when the cast is exact. Compares by round trip, since torch
    has no min/max/comparison kernels for uint64.
    """
    if not t.numel():
        return None
    lost = narrowed.to(t.dtype) != t
    if not bool(lost.any()):
        return None
    if t.dtype == torch.int64:
        return f"values in [{t.min().item()}, {t.max().item()}]"
    n = int(lost.sum())
    # uint64 has no indexing kernel in older torch: pick the value through its int64 view
    example = t.view(torch.int64)[lost][0].item() % 2**64
    return f"{n} value{'s' if n > 1 else ''} such as {example}"
