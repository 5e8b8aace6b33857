"""torch_xla interop: XLA-device tensors and JAX computations inside torch_xla graphs.

Two ways to run mixed torch/JAX code on TPU (see docs/tpu.md):

- JAX drives: `bridge.torch_to_jax` translates torch code into JAX, and JAX
  compiles and shards it (adapters/sharding.py places the parameters).
- torch_xla drives: `xla_call(jax_fn, *tensors)` runs a JAX function on
  XLA-device tensors *inside* the torch_xla lazy graph through
  `torch_xla.core.xla_builder.call_jax`: the JAX function is lowered to HLO and
  spliced into the graph, so nothing leaves the device. Its backward is the
  JAX VJP, spliced in the same way, with the forward's residuals kept as XLA
  tensors.

Exchanging buffers (`bridge.to_jax` / `bridge.to_torch` delegate here for
XLA-device tensors; `to_xla` is the explicit JAX -> XLA-device direction):

- torch_xla's DLPack only covers its CPU PJRT device (`PJRT_DEVICE=CPU`);
  there the buffer is shared without a copy. On TPU (or GPU PJRT) the value
  crosses through the host, which `copy=False` refuses with `SharingError`.
- A shared buffer is a snapshot: torch_xla tensors are functional, so an
  in-place torch op (`p.add_(1)`, an optimizer step) rebinds the tensor to a new
  device buffer and the JAX array keeps the old values (and vice versa). No
  write is ever seen through the other side, so `checked_writes` does not
  track these buffers.

Everything that differs between the supported versions (torch_xla 2.9 with
jax 0.7.1, and jax 0.10 without torch_xla) is in the "Compatibility" section.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import torch

from bridge import dlpack, dtypes
from bridge.dlpack import SharingError
from bridge.tree import STATIC, Partition, map_tree, partition

__all__ = [
    "available",
    "device_type",
    "is_xla_tensor",
    "sync",
    "to_xla",
    "xla_call",
    "xla_device",
]

# --------------------------------------------------------------------------
# Compatibility: the one place that knows torch_xla's and JAX's version quirks


def _torch_xla() -> Any:
    """The imported torch_xla module, importing it if it is installed."""
    module = sys.modules.get("torch_xla")
    if module is not None:
        return module
    try:
        import torch_xla
    except ImportError:
        return None
    return torch_xla


def available() -> bool:
    """True if torch_xla is installed and importable."""
    return _torch_xla() is not None


def _require() -> Any:
    torch_xla = _torch_xla()
    if torch_xla is None:
        raise ImportError(
            "this needs torch_xla (pip install torch_xla, or use the torch_xla environment: "
            "`make venv-xla`)."
        )
    return torch_xla


def is_xla_tensor(x: Any) -> bool:
    """True for a torch tensor on a torch_xla device."""
    return isinstance(x, torch.Tensor) and x.device.type == "xla"


def xla_device() -> torch.device:
    """torch_xla's default device (`torch_xla.device()`, `xm.xla_device()` before 2.5)."""
    torch_xla = _require()
    if hasattr(torch_xla, "device"):
        return torch_xla.device()
    import torch_xla.core.xla_model as xm

    return xm.xla_device()


def device_type() -> str:
    """The hardware behind torch_xla's devices: 'TPU', 'CPU', 'CUDA', ..."""
    _require()
    import torch_xla.runtime as xr

    return xr.device_type()


def sync() -> None:
    """Run torch_xla's pending graph (`torch_xla.sync()`, `xm.mark_step()` before 2.5)."""
    torch_xla = _require()
    if hasattr(torch_xla, "sync"):
        torch_xla.sync()
    else:
        import torch_xla.core.xla_model as xm

        xm.mark_step()


def _materialize(tensors: list[torch.Tensor]) -> None:
    # torch_xla's DLPack export aborts the process (a failed C++ CHECK, not an
    # exception) on a tensor whose value is still a pending lazy graph, so
    # every export first runs that graph and waits for the buffers.
    torch_xla = _require()
    torch_xla._XLAC._xla_sync_multi(list(tensors), devices=[], wait=True)


def _buffer_pointer(t: torch.Tensor) -> int:
    return _require()._XLAC._unsafe_buffer_pointer(t)


class _Capsule:
    """A DLPack capsule dressed as an array: newer JAX only imports `__dlpack__` objects."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, **_: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: torch_xla exports only its CPU device


class _Computation(NamedTuple):
    """A JAX function lowered into torch_xla's graph, and what its lowering found."""

    run: Callable[[list[torch.Tensor]], list[torch.Tensor]]  # flat tensors -> flat tensors
    out_info: Any  # the function's output pytree, with jax.ShapeDtypeStruct leaves


def _computation(fn: Callable, tensors: tuple, name: str) -> _Computation:
    """`fn` (flat arrays -> a pytree of arrays) as a torch_xla user computation.

    This is `torch_xla.core.xla_builder.call_jax` minus its torchax dependency
    (torchax 0.0.13 imports flax at import time, which the torch_xla
    environment does not have): `fn` is lowered with `jax.jit` to an HLO
    module, which torch_xla adds to its graph as a user computation. The
    result runs XLA tensors of `tensors`' signature inside the lazy graph and
    returns the flat leaves of `fn`'s output; it holds the HLO, not `fn`.
    """
    torch_xla = _require()
    # torch_xla must own the devices before JAX initialises (it would
    # otherwise lock the TPU), as torch_xla's own jax_import_guard does.
    torch_xla._XLAC._init_computation_client()
    avals = [jax.ShapeDtypeStruct(tuple(t.shape), dtypes.to_jax_dtype(t.dtype)) for t in tensors]
    with _gspmd_lowering():
        lowered = jax.jit(fn, keep_unused=True).lower(*avals)
    proto = lowered.compiler_ir("hlo").as_serialized_hlo_module_proto()
    computation = torch_xla._XLAC._xla_op_computation_from_module_proto(name, proto)

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(torch_xla._XLAC._xla_user_computation(name, inputs, computation))

    return _Computation(run, lowered.out_info)


def _gspmd_lowering() -> Any:
    # torch_xla reads GSPMD sharding annotations, not Shardy's (torch_xla's
    # call_jax flips the global flag; a context keeps the user's setting).
    from jax._src import config

    state = getattr(config, "use_shardy_partitioner", None)
    return state(False) if callable(state) else contextlib.nullcontext()


# --------------------------------------------------------------------------
# Buffers: XLA tensors <-> JAX arrays


def _shareable() -> bool:
    return device_type() == "CPU"


def why_not_shared(t: torch.Tensor) -> str | None:
    """Why XLA tensor `t` cannot be handed to JAX without a copy, or None if it can."""
    if not _shareable():
        return (
            f"torch_xla's DLPack covers only its CPU device, and this tensor lives on "
            f"{device_type()} (torch device '{t.device}'), so it crosses through the host; "
            "to stay on the device, run the JAX code inside the torch_xla graph with "
            "bridge.xla.xla_call"
        )
    return None


def tensor_to_jax(t: torch.Tensor, copy: bool | None) -> jax.Array:
    """`bridge.to_jax` for an XLA-device tensor (already checked and detached).

    Shares the device buffer when torch_xla runs on its CPU device; otherwise
    (TPU) copies through the host onto JAX's default device, unless
    `copy=False`, which raises `SharingError`. `bridge.to_jax` has narrowed
    64-bit values already (the x64 rule of `bridge.x64`).
    """
    why = why_not_shared(t)
    if why is not None or copy:
        if copy is False:
            raise SharingError(
                f"to_jax(copy=False) cannot share the xla tensor of shape {tuple(t.shape)} "
                f"and dtype {t.dtype}: {why}. Pass copy=None to allow the transfer."
            )
        # Through the host: a private CPU tensor, then JAX's default device.
        host = dlpack.to_jax(t.to("cpu"))
        return host if jax.default_backend() == "cpu" else jax.device_put(host)
    _materialize([t])
    from torch_xla.utils import dlpack as xla_dlpack

    out = jax.dlpack.from_dlpack(_Capsule(xla_dlpack.to_dlpack(t)))
    if t.numel() and out.unsafe_buffer_pointer() != _buffer_pointer(t):
        if copy is False:
            raise SharingError(
                f"to_jax(copy=False): JAX copied the xla tensor of shape {tuple(t.shape)} on "
                "import; it cannot be shared."
            )
    return out


def array_to_xla(
    a: jax.Array, copy: bool | None, device: torch.device | None = None
) -> torch.Tensor:
    """A JAX array as a torch_xla tensor: shared on torch_xla's CPU device, else a transfer."""
    device = torch.device(device) if device is not None else xla_device()
    platform = next(iter(a.devices())).platform
    shareable = _shareable() and platform == "cpu" and len(a.sharding.device_set) == 1
    if shareable and not copy:
        from torch_xla.utils import dlpack as xla_dlpack

        out = xla_dlpack.from_dlpack(a)
        if out.device == device:
            return out
    if copy is False:
        raise SharingError(
            f"to_xla(copy=False) cannot share the JAX array of shape {a.shape} on "
            f"'{platform}' with torch_xla's {device_type()} device '{device}': torch_xla's "
            "DLPack covers only its CPU device. Pass copy=None to allow the transfer."
        )
    host = dlpack.to_torch(a) if platform == "cpu" else torch.from_numpy(np.array(a))
    return host.to(device)


def _lands_on_xla(a: jax.Array) -> bool:
    # torch_xla is in use: `to_torch` puts TPU arrays on its device.
    return "torch_xla" in sys.modules and next(iter(a.sharding.device_set)).platform == "tpu"


dlpack.register_device(
    "xla", to_jax=tensor_to_jax, to_torch=array_to_xla, takes_array=_lands_on_xla
)


def to_xla(tree: Any, *, copy: bool | None = None, device: torch.device | str | None = None) -> Any:
    """Move every JAX array and torch tensor in `tree` onto a torch_xla device.

    Args:
        tree: a JAX array, torch tensor or any pytree of them.
        copy: None shares JAX CPU buffers with torch_xla's CPU device and
            transfers otherwise; False shares or raises `SharingError`; True
            always transfers.
        device: the torch_xla device (default `torch_xla.device()`).

    Returns:
        The same structure with XLA-device tensors in place of arrays/tensors.
    """
    _require()
    dev = torch.device(device) if device is not None else xla_device()

    def leaf(x: Any) -> torch.Tensor:
        if isinstance(x, jax.Array):
            return array_to_xla(x, copy, dev)
        if x.device == dev and not copy:
            return x
        if copy is False:
            raise SharingError(
                f"to_xla(copy=False) got a torch tensor on '{x.device}'; moving it to '{dev}' "
                "is a transfer. Pass copy=None to allow it."
            )
        return x.to(dev)

    return map_tree(tree, leaf, lambda x: isinstance(x, (jax.Array, torch.Tensor)), "torch")


# --------------------------------------------------------------------------
# JAX inside the torch_xla graph


_keys = itertools.count()


def _inexact(dtype: Any) -> bool:
    return bool(np.issubdtype(np.dtype(dtype), np.inexact))


class _Lowered(NamedTuple):
    """What lowering an entry's forward found: the outputs and the residuals."""

    out_def: Any  # the structure of fn's output
    out_inexact: tuple[bool, ...]  # per output leaf: floating (has a gradient)
    vjp_def: Any  # the structure of the VJP's residuals (None when not differentiable)


class _Entry:
    """One (function, argument signature, differentiability) of `xla_call`.

    Holds the forward and backward computations (traced and lowered once per
    entry) and what their lowering returned: the output structure and the
    structure of the VJP's residuals, which torch needs to rebuild outputs
    and run the backward. An entry lives in the cache of its function
    (`_CACHES`) and refers to the function only weakly, so nothing here
    keeps a dropped function alive.
    """

    def __init__(self, fn: Callable[[], Callable | None], part: Partition, diff: tuple) -> None:
        self.fn = fn  # () -> the function, or None once it was freed
        self.part = part
        self.diff = diff
        n = next(_keys)
        self._names = (f"xla::bridge_fwd_{n}", f"xla::bridge_bwd_{n}")
        self._computations: list[_Computation | None] = [None, None]
        self.lowered: _Lowered | None = None  # set when the forward is lowered

    def call(self, arrays: tuple) -> Any:
        fn = self.fn()
        if fn is None:  # pragma: no cover - the caller holds fn while it traces
            raise RuntimeError("bridge.xla.xla_call: the JAX function was deleted while in use.")
        args, kwargs = self.part.fill(arrays)
        return fn(*args, **kwargs)

    def run(self, which: int, tensors: tuple) -> list[torch.Tensor]:
        """Run the forward (`which=0`: `call_flat` or `forward`) or the backward (1).

        The forward is lowered first; its lowering returns the output and
        residual structures (`lowered`), which the backward is built from.
        """
        computation = self._computations[which]
        if computation is None:
            if which:
                traced = functools.partial(_backward, self.lowered.vjp_def)
            else:
                traced = self.forward if any(self.diff) else self.call_flat
            computation = _computation(traced, tensors, self._names[which])
            if not which:
                self.lowered = _lowered(computation.out_info, any(self.diff))
            self._computations[which] = computation
        return computation.run(list(tensors))

    # The JAX functions handed to torch_xla: flat arrays in, a pytree out.

    def call_flat(self, *arrays: Any) -> Any:
        return self.call(arrays)

    def forward(self, *arrays: Any) -> tuple[Any, Any]:
        """(fn's output, the VJP with respect to the differentiable inputs)."""
        idx = [i for i, d in enumerate(self.diff) if d]
        structure: list[tuple[Any, list[bool]]] = []  # g's output, seen as jax.vjp traces it

        def g(*d: Any) -> tuple[list[Any], list[Any]]:
            full = list(arrays)
            for i, v in zip(idx, d, strict=True):
                full[i] = v
            leaves, out_def = jax.tree_util.tree_flatten(self.call(tuple(full)))
            inexact = [_inexact(x.dtype) for x in leaves]
            structure.append((out_def, inexact))
            diff_out = [x for x, f in zip(leaves, inexact, strict=True) if f]
            other = [x for x, f in zip(leaves, inexact, strict=True) if not f]
            return diff_out, other

        diff_out, vjp, other = jax.vjp(g, *[arrays[i] for i in idx], has_aux=True)
        ((out_def, inexact),) = structure
        d_it, o_it = iter(diff_out), iter(other)
        outs = [next(d_it) if f else next(o_it) for f in inexact]
        return jax.tree_util.tree_unflatten(out_def, outs), vjp


def _lowered(out_info: Any, differentiable: bool) -> _Lowered:
    out, vjp = out_info if differentiable else (out_info, None)
    leaves, out_def = jax.tree_util.tree_flatten(out)
    vjp_def = None if vjp is None else jax.tree_util.tree_structure(vjp)
    return _Lowered(out_def, tuple(_inexact(x.dtype) for x in leaves), vjp_def)


def _backward(vjp_def: Any, *arrays: Any) -> list[Any]:
    """The backward handed to torch_xla: (residuals, output cotangents) -> input cotangents."""
    n_res = vjp_def.num_leaves
    vjp = jax.tree_util.tree_unflatten(vjp_def, arrays[:n_res])
    return list(vjp(list(arrays[n_res:])))


# function (or a bound method's object) -> {signature: _Entry}: each function's
# own cache, held weakly (the key is the function, and its entries refer to it
# weakly), so a cache lives exactly as long as its function and keeps it from
# nothing; it holds no entry for a function that is gone.
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _entry(fn: Callable, part: Partition, tensors: list, diff: tuple) -> _Entry:
    """The cached entry of `fn` for this signature (a fresh one if `fn` cannot be cached)."""
    if inspect.ismethod(fn):  # `module.method` is a new object at every access
        owner, func, ref = fn.__self__, fn.__func__, weakref.WeakMethod(fn)
    else:
        owner, func = fn, None
        try:
            ref = weakref.ref(fn)
        except TypeError:
            ref = None
    try:
        table = None if ref is None else _CACHES.get(owner)
        if table is None and ref is not None:
            table = _CACHES[owner] = {}
    except TypeError:  # unhashable, or no weak references
        table = None
    if table is None:
        # Not weakly referable: traced on every call rather than kept forever.
        return _Entry(lambda: fn, part, diff)
    sig = (func, part, tuple((t.shape, t.dtype) for t in tensors), diff)
    entry = table.get(sig)
    if entry is None:
        entry = table[sig] = _Entry(ref, part, diff)
    return entry


class _XlaJaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, entry: _Entry, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = entry.run(0, tensors)
        inexact = entry.lowered.out_inexact
        outs, residuals = flat[: len(inexact)], flat[len(inexact) :]
        ctx.entry = entry
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in outs]
        ctx.save_for_backward(*residuals)
        ctx.mark_non_differentiable(*[o for o, f in zip(outs, inexact, strict=True) if not f])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        entry: _Entry = ctx.entry
        cts = [
            g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
            for g, (shape, dtype, device), f in zip(
                grads, ctx.out_meta, entry.lowered.out_inexact, strict=True
            )
            if f
        ]
        in_grads = iter(entry.run(1, (*ctx.saved_tensors, *cts)))
        return (None, *[next(in_grads) if d else None for d in entry.diff])


def xla_call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run the JAX function `fn` on XLA-device tensors inside the torch_xla graph.

    `fn(*args, **kwargs)` is traced with `jax.jit` once per argument signature,
    lowered to HLO and added to torch_xla's lazy graph (through
    `torch_xla.core.xla_builder.call_jax`), so it runs on the device with the
    surrounding torch code, with no transfer to the host. If any floating
    tensor requires grad, the call is differentiable: the forward also returns
    the residuals of `jax.vjp(fn)` as XLA tensors, and the backward runs the
    VJP in the graph the same way.

    Args:
        fn: a pure, `jax.jit`-traceable function of JAX arrays; keep the same
            function object across calls so its compilation is cached. The
            cache belongs to `fn` (held weakly, dropped with it); a callable
            that takes no weak references is traced again on every call.
        *args, **kwargs: a pytree of XLA-device tensors (they become JAX
            arrays) and hashable Python values (passed to `fn` as constants).

    Returns:
        `fn`'s output structure with XLA-device tensors in place of arrays.
        Integer and boolean outputs carry no gradient.

    Raises:
        TypeError: a tensor not on an XLA device, or an unhashable
            non-tensor argument.
    """
    _require()

    def take(leaf: Any, i: int) -> Any:
        if isinstance(leaf, torch.Tensor):
            if leaf.device.type != "xla":
                raise TypeError(
                    f"xla_call: argument leaf #{i} is a tensor on '{leaf.device}', not on an "
                    "XLA device. Move it with `.to(torch_xla.device())` (JAX runs inside the "
                    "torch_xla graph, so every tensor must be there)."
                )
            return leaf
        if isinstance(leaf, jax.Array):
            raise TypeError(
                f"xla_call: argument leaf #{i} is a JAX array; pass XLA tensors "
                "(bridge.xla.to_xla(array)) or close over constants in `fn`."
            )
        return STATIC

    part, tensors = partition((args, kwargs), take, "xla_call", array="an XLA tensor")
    grad = torch.is_grad_enabled()
    diff = tuple(
        grad and t.requires_grad and (t.is_floating_point() or t.is_complex()) for t in tensors
    )
    entry = _entry(fn, part, tensors, diff)
    if any(diff):
        outs = _XlaJaxFunction.apply(entry, *tensors)
    else:
        outs = entry.run(0, tuple(tensors))
    return jax.tree_util.tree_unflatten(entry.lowered.out_def, list(outs))
