"""Zero-copy exchange of tensors, arrays and pytrees between torch and JAX.

`to_jax(tree)` and `to_torch(tree)` walk any nesting of dicts, lists, tuples,
namedtuples, dataclasses (transformers' `ModelOutput` included) and types
registered with torch's or JAX's pytree registries, convert every tensor or
array leaf and pass everything else (None, Python scalars, strings) through.

Sharing rules (the `copy` keyword):

- `copy=None` (default): share the buffer through DLPack when the layout
  allows it, otherwise make exactly one copy.
- `copy=False`: share or raise `SharingError` saying why sharing failed.
- `copy=True`: always return a private copy.

A torch tensor is shared with JAX when it is strided, dense (a permutation of
a contiguous layout: transposes and permutes share, step slices `t[::2]`,
column slices `t[:, :8]` and expanded tensors do not), aligned as JAX needs
(64 bytes on the CPU), and carries no conjugate or negative bit. Tensors that
require grad are detached first (sharing the same memory).

64-bit values with JAX's x64 mode off (the default): JAX would silently turn
int64 into int32, so an int64/uint64 tensor whose values all fit in 32 bits is
narrowed by a copy, and one whose values do not fit raises `X64Error` naming
`jax_enable_x64`. float64 and complex128 always raise, since narrowing them
changes values. No value is ever changed silently.

Aliasing: a shared buffer is one memory seen from both sides. JAX treats its
arrays as immutable, so an in-place torch write (`t.add_(1)`) to a tensor that
shares memory with a JAX array changes that array, and a torch write to a
tensor after `to_jax` changes the JAX array made from it. Use `copy=True` for
tensors you will write into, or run the code under `checked_writes()`, which
records every buffer the bridge shares inside the block (and the trees passed
to it) and raises `AliasingError` naming those written when the block ends:
torch's version counter catches in-place ops, and a fingerprint of the bytes
(CPU memory) catches writes the counter misses (`.data`, fused optimizers).
Its docstring lists exactly what is and is not caught.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
import torch

from bridge import dtypes, x64
from bridge.tree import map_tree
from bridge.x64 import X64Error

__all__ = [
    "AliasingError",
    "DeviceExchange",
    "SharingError",
    "X64Error",
    "checked_writes",
    "jax_reads_strides",
    "register_device",
    "to_jax",
    "to_torch",
]

_JAX_CPU_ALIGNMENT = 64


class SharingError(ValueError):
    """`copy=False` was asked for, but the buffer cannot be shared."""


class AliasingError(RuntimeError):
    """A buffer shared between torch and JAX was written in place."""


# --------------------------------------------------------------------------
# Aliasing checks


def _fingerprint(x: torch.Tensor | jax.Array) -> bytes | None:
    """A digest of the memory behind `x`, or None where it cannot be read cheaply.

    CPU tensors and arrays are hashed in place (BLAKE2b over their raw bytes,
    no copy for the dense layouts the bridge shares). Memory on other devices
    is not fingerprinted: reading it would mean a device-to-host copy.
    """
    if isinstance(x, jax.Array):
        if len(x.sharding.device_set) != 1 or next(iter(x.devices())).platform != "cpu":
            return None
        if x.is_deleted():
            return None
        try:
            x = torch.from_dlpack(x)  # the array's own memory, not a cached host copy
        except (BufferError, RuntimeError, TypeError, ValueError):
            return None
    if x.device.type != "cpu" or x.layout != torch.strided or x.is_quantized:
        return None
    t = x.detach()
    if t.numel() == 0:
        return b""
    if t.is_conj() or t.is_neg() or not _is_dense(t):
        t = t.resolve_conj().resolve_neg().contiguous()  # a copy, still read from the memory
    else:  # a permuted dense layout covers numel elements from its storage offset
        t = t.as_strided((t.numel(),), (1,), t.storage_offset())
    raw = t.view(torch.uint8).numpy()
    return hashlib.blake2b(raw.data, digest_size=16).digest()


class _WriteLog:
    def __init__(self) -> None:
        # (weak reference, version counter or None, fingerprint or None, description)
        self.entries: list[tuple[weakref.ref, int | None, bytes | None, str]] = []

    def record(self, x: torch.Tensor | jax.Array, what: str) -> None:
        version = x._version if isinstance(x, torch.Tensor) else None
        self.entries.append((weakref.ref(x), version, _fingerprint(x), what))

    def written(self) -> list[str]:
        out = []
        for ref, version, fingerprint, what in self.entries:
            x = ref()
            if x is None:
                continue
            if version is not None and x._version != version:
                out.append(what)
            elif fingerprint is not None and _fingerprint(x) != fingerprint:
                out.append(
                    what + " (changed without torch's version counter moving: a write "
                    "through `.data`, a fused kernel or another alias)"
                )
        return out


_write_logs: list[_WriteLog] = []


@contextlib.contextmanager
def checked_writes(*watch: Any) -> Iterator[None]:
    """Raise `AliasingError` if memory shared between torch and JAX is written.

    What is watched: every tensor that `to_jax` shares or `to_torch` creates
    without a copy inside the block, and every tensor and JAX array in the
    pytrees `watch` (pass buffers shared before the block, such as
    `torch_to_jax`'s params or a `jax_to_torch` module's parameters, here).

    What is caught, at the end of the block: an in-place torch write to a
    watched tensor or any view of it (torch's version counter), and, for
    memory on the CPU, any change of its bytes at all (a BLAKE2b fingerprint
    taken when the buffer is recorded and compared at the end): writes
    through `.data`, fused optimizer kernels (`torch.optim.Adam(fused=True)`),
    and writes into a watched JAX array's memory through another alias.

    What is not caught: buffers shared before the block and not passed in
    `watch`; a tensor (or array) freed before the block ends; writes through
    `.data` or fused kernels into memory on other devices (GPU memory is not
    fingerprinted, as that would mean a copy to the host; the version
    counter still covers ordinary in-place ops there); a write that
    restores the bytes it found. torch_xla tensors are functional and never
    share writes (see `bridge.xla`). The fingerprint reads each watched CPU
    buffer twice; use the block to debug, not on every training step.

    Example:
        >>> with bridge.checked_writes():
        ...     t = bridge.to_torch(jnp.zeros(3))
        ...     t.add_(1)   # writes into a JAX array
        AliasingError: ...
        >>> apply, params = bridge.torch_to_jax(model)
        >>> with bridge.checked_writes(params):
        ...     optimizer.step()   # updates model's parameters, which params share
        AliasingError: ...
    """
    log = _WriteLog()
    for tree in watch:
        leaves = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, (torch.Tensor, jax.Array))
        )[0]
        for path, x in leaves:
            where = jax.tree_util.keystr(path) or "the watched value"
            if isinstance(x, torch.Tensor):
                log.record(x, f"watched torch tensor {where} {tuple(x.shape)} {x.dtype}")
            elif isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
                log.record(x, f"watched JAX array {where} {x.shape} {x.dtype}")
    _write_logs.append(log)
    try:
        yield
    finally:
        _write_logs.remove(log)
    written = log.written()
    if written:
        raise AliasingError(
            "memory shared between torch and JAX was written in place: "
            + "; ".join(written)
            + ". JAX arrays are immutable; pass copy=True to to_jax/to_torch for "
            "tensors you write into, or write into a clone."
        )


def _record(tensor: torch.Tensor, direction: str) -> None:
    if not _write_logs:  # the common case: no checked_writes() block is active
        return
    what = f"torch tensor {tuple(tensor.shape)} {tensor.dtype} {direction}"
    for log in _write_logs:
        log.record(tensor, what)


# --------------------------------------------------------------------------
# Devices other than the CPU and CUDA: their modules register the exchange


class DeviceExchange(NamedTuple):
    """How one torch device type exchanges buffers with JAX (see `register_device`)."""

    to_jax: Callable[[torch.Tensor, bool | None], jax.Array]
    to_torch: Callable[[jax.Array, bool | None], torch.Tensor] | None
    takes_array: Callable[[jax.Array], bool] | None


# torch device type -> its exchange. A table of device kinds (one entry per
# module that registers one, such as bridge.xla), not of user values.
_DEVICES: dict[str, DeviceExchange] = {}


def register_device(
    device_type: str,
    *,
    to_jax: Callable[[torch.Tensor, bool | None], jax.Array],
    to_torch: Callable[[jax.Array, bool | None], torch.Tensor] | None = None,
    takes_array: Callable[[jax.Array], bool] | None = None,
) -> None:
    """Let the module that knows a torch device type carry its exchange.

    `to_jax(t, copy)` converts a tensor on `device_type` for `to_jax`; it
    gets the tensor checked, detached and (with x64 off) already narrowed.
    `to_torch(a, copy)` converts, for `to_torch`, each JAX array for which
    `takes_array(a)` is true. `bridge.xla` registers torch_xla's 'xla' device
    when it is imported; registering a device type again replaces it.
    """
    if (to_torch is None) != (takes_array is None):
        raise TypeError("register_device: give both `to_torch` and `takes_array`, or neither.")
    _DEVICES[device_type] = DeviceExchange(to_jax, to_torch, takes_array)


# --------------------------------------------------------------------------
# torch -> JAX


def _check_convertible(t: torch.Tensor) -> None:
    if t.layout != torch.strided:
        raise TypeError(
            f"to_jax got a {t.layout} tensor; JAX holds only dense arrays. "
            "Call `.to_dense()` on it first."
        )
    if t.is_quantized:
        raise TypeError(
            f"to_jax got a quantized tensor ({t.dtype}); JAX has no quantized "
            "arrays. Call `.dequantize()` on it first."
        )
    if t.device.type == "meta":
        raise ValueError(
            "to_jax got a tensor on the 'meta' device, which has no data. "
            "Materialise it first (e.g. `module.to_empty(device='cpu')` and load weights)."
        )
    if getattr(t, "is_nested", False):
        raise TypeError("to_jax got a nested tensor; convert it with `.to_padded_tensor(0)`.")
    dtypes.to_jax_dtype(t.dtype)  # raises UnsupportedDtypeError with the fix


def _is_dense(t: torch.Tensor) -> bool:
    """True if `t` covers its memory exactly once: a permuted contiguous layout."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


@functools.cache
def jax_reads_strides() -> bool:
    """Whether this jax's from_dlpack honours strides (jax 0.7.1 reads a
    transposed tensor as if it were contiguous, silently)."""
    probe = torch.arange(6.0).reshape(2, 3).t()
    try:
        return bool((np.asarray(jax.dlpack.from_dlpack(probe)) == probe.numpy()).all())
    except Exception:
        return False


def _why_not_shared(t: torch.Tensor) -> str | None:
    """Why `t`'s memory cannot be handed to JAX as it is, or None if it can."""
    if t.is_conj():
        return "it carries torch's lazy conjugate bit (resolve with `.resolve_conj()`)"
    if t.is_neg():
        return "it carries torch's lazy negation bit (resolve with `.resolve_neg()`)"
    if t.numel() > 1 and not _is_dense(t):
        return (
            f"its strides {tuple(t.stride())} for shape {tuple(t.shape)} are not a dense "
            "layout (a step slice, a partial slice or an expanded tensor); "
            "use `.contiguous()` to make one"
        )
    if not t.is_contiguous() and not jax_reads_strides():
        return (
            f"this jax ({jax.__version__}) reads DLPack tensors as contiguous, so a transposed "
            "layout must be copied; use `.contiguous()` to make one"
        )
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % _JAX_CPU_ALIGNMENT:
        return (
            f"its data pointer is not {_JAX_CPU_ALIGNMENT}-byte aligned as JAX requires "
            "(an offset slice); use `.clone()` to make an aligned one"
        )
    if t.device.type not in ("cpu", "cuda"):
        return f"JAX cannot read memory on torch device '{t.device}'"
    if t.device.type == "cuda" and not _jax_has_gpu():
        return "JAX has no GPU backend in this process (install jax with CUDA support)"
    return None


def _jax_has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _narrow_x64(t: torch.Tensor, copy: bool | None) -> torch.Tensor:
    """With x64 off, turn a 64-bit tensor into its exact 32-bit form or raise."""
    what = f"the tensor of shape {tuple(t.shape)} given to to_jax"
    narrow_to = x64.jax_dtype(t.dtype, what)
    if copy is False:
        raise SharingError(
            f"to_jax(copy=False) got a {t.dtype} tensor, but JAX's x64 mode is off, so it "
            f"can only be held as {narrow_to} by a copy. Enable 64-bit JAX "
            "(`jax_enable_x64`), or allow the copy."
        )
    return x64.narrow(t, narrow_to, what)


def _tensor_to_jax(t: torch.Tensor, copy: bool | None) -> jax.Array:
    _check_convertible(t)
    if t.requires_grad:
        t = t.detach()
    narrowed = t.dtype in dtypes.WIDE_DTYPES and not dtypes.x64_enabled()
    if narrowed:
        t = _narrow_x64(t, copy)
    exchange = _DEVICES.get(t.device.type)
    if exchange is not None:
        return exchange.to_jax(t, copy)
    if narrowed:
        return _share_with_jax(t.contiguous())
    if copy:
        return _share_with_jax(_private_copy(t))
    why = _why_not_shared(t)
    if why is None:
        out = _share_with_jax(t)
        if t.numel() and out.unsafe_buffer_pointer() != t.data_ptr():
            # Never report sharing that did not happen.
            if copy is False:
                raise SharingError(
                    f"to_jax(copy=False): JAX copied the tensor of shape {tuple(t.shape)} "
                    "on import; it cannot be shared."
                )
        else:
            _record(t, "shared with to_jax")
        return out
    if copy is False:
        raise SharingError(
            f"to_jax(copy=False) cannot share the tensor of shape {tuple(t.shape)} and dtype "
            f"{t.dtype}: {why}. Pass copy=None to allow a copy."
        )
    return _share_with_jax(_private_copy(t))


def _private_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type not in ("cpu", "cuda") or (t.device.type == "cuda" and not _jax_has_gpu()):
        t = t.to("cpu")
    return t.resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)


def _share_with_jax(t: torch.Tensor) -> jax.Array:
    return jax.dlpack.from_dlpack(t)


def to_jax(tree: Any, *, copy: bool | None = None) -> Any:
    """Convert every torch tensor in `tree` to a JAX array, sharing memory.

    Args:
        tree: a tensor or any pytree of tensors (dicts, lists, tuples,
            namedtuples, dataclasses such as transformers' `ModelOutput`);
            other leaves (None, scalars, strings, JAX arrays) pass through.
        copy: None shares when possible and copies otherwise; False shares
            or raises `SharingError`; True always copies.

    Returns:
        The same structure with JAX arrays in place of tensors. CPU tensors
        land on JAX's CPU device and CUDA tensors on the JAX GPU device with
        the same index (DLPack carries the device).

    Raises:
        SharingError: copy=False and a tensor cannot be shared.
        X64Error: a 64-bit value that JAX cannot hold exactly with x64 off.
        UnsupportedDtypeError, TypeError, ValueError: tensors JAX cannot hold
            (complex32, sparse, quantized, nested, meta), with the fix.
    """
    if isinstance(tree, torch.Tensor):
        return _tensor_to_jax(tree, copy)
    return map_tree(
        tree, lambda t: _tensor_to_jax(t, copy), lambda x: isinstance(x, torch.Tensor), "jax"
    )


# --------------------------------------------------------------------------
# JAX -> torch


def _array_to_torch(a: jax.Array, copy: bool | None) -> torch.Tensor:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            "to_torch got a traced JAX value (inside jax.jit, grad or vmap), which has no "
            "data yet. Convert concrete arrays outside the transform, or wrap the torch "
            "code with bridge.torch_to_jax(fn, mode='callback')."
        )
    dtypes.to_torch_dtype(a.dtype)  # raises UnsupportedDtypeError with the fix
    if a.is_deleted():
        raise ValueError("to_torch got a JAX array whose buffer was deleted or donated.")
    for exchange in _DEVICES.values():
        if exchange.takes_array is not None and exchange.takes_array(a):
            return exchange.to_torch(a, copy)
    source, why = _single_buffer(a)
    if source is None:
        if copy is False:
            raise SharingError(f"to_torch(copy=False) cannot share the array: {why}.")
        return torch.from_numpy(np.array(a))
    t = torch.from_dlpack(source)
    if copy:
        return t.clone()
    _record(t, "made by to_torch from a JAX array")
    return t


def _single_buffer(a: jax.Array) -> tuple[jax.Array | None, str]:
    """The one device buffer that holds all of `a`, if there is one."""
    devices = a.sharding.device_set
    if len(devices) == 1:
        shard, device = a, next(iter(devices))
    elif a.is_fully_addressable and a.sharding.is_fully_replicated:
        shard = a.addressable_shards[0].data
        device = next(iter(shard.sharding.device_set))
    else:
        return None, (
            f"it is sharded over {len(a.sharding.device_set)} devices ({a.sharding}); "
            "gather it first (e.g. `jax.device_get`) or pass copy=None"
        )
    platform = device.platform
    if platform not in ("cpu", "gpu", "cuda", "rocm"):
        return None, f"torch cannot read memory on JAX platform '{platform}'"
    return shard, ""


def to_torch(tree: Any, *, copy: bool | None = None) -> Any:
    """Convert every JAX array in `tree` to a torch tensor, sharing memory.

    Args:
        tree: a JAX array or any pytree of them (dicts, lists, tuples,
            namedtuples, dataclasses, JAX-registered pytrees); other leaves
            pass through.
        copy: None shares when possible and copies otherwise; False shares
            or raises `SharingError`; True always copies.

    Returns:
        The same structure with torch tensors in place of arrays. A tensor
        that shares a JAX buffer must not be written in place (see the
        module docstring and `checked_writes`).
    """
    if isinstance(tree, jax.Array):
        return _array_to_torch(tree, copy)
    return map_tree(
        tree, lambda a: _array_to_torch(a, copy), lambda x: isinstance(x, jax.Array), "torch"
    )
