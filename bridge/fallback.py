"""Module-level fallback: the submodules torch.export cannot capture run in torch.

torch.export stops at a Python decision on a tensor's value (`if x.sum() > 0:`,
`.item()` or `.tolist()` feeding control flow, torch's own
`_detect_is_causal_mask` in `nn.Transformer`) or at Python code reading a
tensor's values (`.numpy()`), although running torch would not. `capture` then finds the innermost submodule whose forward made that
decision (`locate`, from the error's traceback), makes it *opaque* and
captures again, until the rest of the module captures. An opaque submodule
appears in the graph as one call of the custom op `bridge_fallback::call`,
whose fake implementation returns the output shapes and dtypes torch
produced for that call on the example inputs (`record`, one eager run of the
whole module at capture time, on the examples, with the module's buffers
cloned and torch's random state restored). The interpreter runs the call
through `bridge.callback` (`lowering`): torch runs the submodule with its
parameters and buffers passed as inputs, so gradients reach them, and a
buffer the submodule updates (BatchNorm in train mode) comes back as a graph
output, which `torch_to_jax_with_state` returns as new state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import linecache
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from bridge.ops.registry import DataDependentShapeError

__all__ = [
    "KEPT_WHOLE", "OPAQUE_OP", "FallbackError", "Opaque", "Site", "describe", "eager_shapes", "failing_op", "locate",
    "lowering", "opaque_forwards", "record",
]


class FallbackError(RuntimeError):
    """A submodule that torch.export cannot capture cannot run through a callback either."""


# Live opaque submodules by key: the graph's op calls name them by key. Weak:
# an Opaque lives as long as the conversion whose graph calls it.
_LIVE: weakref.WeakValueDictionary[int, Opaque] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


class _Slot:
    """A tensor's slot among a call's static leaves."""

    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _Slot()
_MISSING = object()


@torch.library.custom_op("bridge_fallback::call", mutates_args=())
def _call(key: int, site: int, args: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = _LIVE[key].run(site, args, state)
    inputs = {t.untyped_storage().data_ptr() for t in [*args, *state] if t.numel()}
    # A custom op's outputs may not alias its inputs.
    return [o.clone() if o.numel() and o.untyped_storage().data_ptr() in inputs else o for o in outs]


@_call.register_fake
def _(key: int, site: int, args: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
    return _LIVE[key].fake_outputs(site, state)


OPAQUE_OP = torch.ops.bridge_fallback.call.default


@dataclasses.dataclass(frozen=True)
class Site:
    """One call signature of a submodule and what torch returned for it."""

    spec: Any  # torch pytree spec of (args, kwargs)
    statics: tuple  # per leaf: _TENSOR or the static value
    types: tuple  # per leaf: the static value's type (2, 2.0 and True are equal, not alike)
    inputs: tuple  # (shape, dtype) per tensor leaf
    out_spec: Any  # torch pytree spec of the output
    outputs: tuple  # (shape, dtype, device) per output leaf; None for a None leaf

    @staticmethod
    def signature(args: tuple, kwargs: dict) -> tuple[Any, tuple, tuple, tuple, list[torch.Tensor]]:
        leaves, spec = torch_pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        statics = tuple(_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves)
        types = tuple(type(x) for x in statics)
        inputs = tuple((tuple(int(s) for s in t.shape), t.dtype) for t in tensors)
        return spec, statics, types, inputs, tensors

    def matches(self, spec: Any, statics: tuple, types: tuple, inputs: tuple) -> bool:
        # Values first: a SymInt computed from data raises here (its caller falls back).
        return (self.spec == spec and self.statics == statics and self.types == types
                and self.inputs == inputs)


@dataclasses.dataclass
class Recording:
    """What one eager run of the module found, per submodule path."""

    sites: dict[str, list[Site]]
    updated: dict[str, tuple[str, ...]]  # buffers (relative names) each submodule's forward writes
    errors: dict[str, str]  # submodules that cannot run through a callback, and why


def record(module: torch.nn.Module, run: Callable[[], Any]) -> Recording:
    """Run `run()` (a call of `module` on the example inputs) once, eagerly, recording
    every submodule's call signatures, outputs and buffer writes.

    The module's buffers are replaced by clones for the run, gradients are off and
    torch's random state is restored afterwards, so the module is left as it was.
    A buffer counts as written if the run bumped its version, changed its value or
    replaced it; and a module that writes one of its own buffers is taken to write
    them all (BatchNorm's running statistics change without a version bump, and
    stay zero on zero inputs, but its `num_batches_tracked` always counts).
    """
    paths = {id(m): p for p, m in module.named_modules()}
    rec = Recording(sites={}, updated={}, errors={})

    def post(m: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        path = paths[id(m)]
        spec, statics, types, inputs, _ = Site.signature(args, kwargs)
        out_leaves, out_spec = torch_pytree.tree_flatten(out)
        outputs = []
        for x in out_leaves:
            if isinstance(x, torch.Tensor):
                outputs.append((tuple(x.shape), x.dtype, x.device))
            elif x is None:
                outputs.append(None)
            else:
                rec.errors.setdefault(
                    path, f"its forward returns a Python {type(x).__name__} computed in torch, which a "
                    "callback cannot return (only tensors and None)")
        sites = rec.sites.setdefault(path, [])
        if not any(s.matches(spec, statics, types, inputs) for s in sites):
            sites.append(Site(spec, statics, types, inputs, out_spec, tuple(outputs)))

    handles = [m.register_forward_hook(post, with_kwargs=True, prepend=True) for m in module.modules()]
    originals = dict(module.named_buffers())
    clones = {n: b.clone() for n, b in originals.items()}
    versions = {n: b._version for n, b in clones.items()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _swapped_buffers(module, clones):
            run()
            after = dict(module.named_buffers())
    finally:
        for h in handles:
            h.remove()
    written = {
        n for n, b in clones.items()
        if after.get(n) is not b or b._version != versions[n] or not torch.equal(b, originals[n])
    }
    owners = {n.rpartition(".")[0] for n in written}
    written |= {n for n in clones if n.rpartition(".")[0] in owners}
    for path in rec.sites:
        prefix = f"{path}." if path else ""
        mine = tuple(sorted(n[len(prefix):] for n in written if n.startswith(prefix)))
        if mine:
            rec.updated[path] = mine
    return rec


@contextlib.contextmanager
def _swapped_buffers(module: torch.nn.Module, buffers: dict[str, torch.Tensor]):
    owners = []
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        m = module.get_submodule(owner)
        owners.append((m, leaf, m._buffers[leaf]))
        m._buffers[leaf] = value
    try:
        yield
    finally:
        for m, leaf, value in owners:
            m._buffers[leaf] = value


class _ForwardOnly(torch.nn.Module):
    """Calls the submodule's forward without its hooks (they run around the opaque call)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return self.m.forward(*args, **kwargs)


class Opaque:
    """One submodule run in torch: its recorded call sites, its state, its JAX callback."""

    def __init__(self, path: str, module: torch.nn.Module, reason: str, rec: Recording) -> None:
        if path in rec.errors:
            raise FallbackError(
                f"submodule '{path}' ({type(module).__name__}) cannot be captured by torch.export "
                f"({reason}) and cannot fall back to a torch callback: {rec.errors[path]}."
            )
        if path not in rec.sites:
            raise FallbackError(
                f"submodule '{path}' ({type(module).__name__}) cannot be captured by torch.export "
                f"({reason}), and it did not run when the module ran eagerly on the example inputs, "
                "so its output shapes are unknown."
            )
        self.key = next(_KEYS)
        _LIVE[self.key] = self
        self.path = path
        self.module = module
        self.reason = reason
        self.sites = rec.sites[path]
        self.params = [n for n, _ in module.named_parameters()]
        self.buffers = [n for n, _ in module.named_buffers()]
        self.updated = [n for n in self.buffers if n in rec.updated.get(path, ())]
        self._forward_only = _ForwardOnly(module)
        self._jax: Callable | None = None

    def __repr__(self) -> str:
        return f"<opaque '{self.path}' ({type(self.module).__name__})>"

    # -- while torch.export traces the parent

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The submodule's forward during capture: one `bridge_fallback::call` node."""
        spec, statics, types, inputs, tensors = Site.signature(args, kwargs)
        try:
            site = next(i for i, s in enumerate(self.sites) if s.matches(spec, statics, types, inputs))
        except StopIteration:
            raise FallbackError(
                f"submodule '{self.path}' falls back to torch, but torch.export called it with "
                f"arguments {statics} of shapes {inputs}, which the eager run on the example inputs "
                "never passed it; its output shapes are unknown. Convert with mode='callback'."
            ) from None
        except TypeError as e:  # a SymInt among the static arguments: a value computed from data
            raise FallbackError(
                f"submodule '{self.path}' falls back to torch, but its caller passes it a Python "
                f"number computed from a tensor's value ({e}). Convert with mode='callback'."
            ) from e
        m = self.module
        state = [m.get_parameter(n) for n in self.params] + [m.get_buffer(n) for n in self.buffers]
        outs = OPAQUE_OP(self.key, site, tensors, state)
        n_out = sum(o is not None for o in self.sites[site].outputs)
        for name, new in zip(self.updated, outs[n_out:], strict=True):
            m.get_buffer(name).copy_(new)
        it = iter(outs[:n_out])
        leaves = [None if o is None else next(it) for o in self.sites[site].outputs]
        return torch_pytree.tree_unflatten(leaves, self.sites[site].out_spec)

    def fake_outputs(self, site: int, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = [torch.empty(o[0], dtype=o[1], device=o[2]) for o in self.sites[site].outputs if o is not None]
        buffers = dict(zip(self.buffers, state[len(self.params):], strict=True))
        return outs + [torch.empty_like(buffers[n]) for n in self.updated]

    # -- at run time, in torch

    def run(self, site: int, args: Sequence[torch.Tensor], state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the submodule on `args` with `state` as its parameters and buffers."""
        s = self.sites[site]
        n = len(self.params)
        params = dict(zip(self.params, state[:n], strict=True))
        # Clones: a write must never reach JAX's buffers (some, like BatchNorm's
        # running statistics, are written without a version bump).
        buffers = {name: b.clone() for name, b in zip(self.buffers, state[n:], strict=True)}
        versions = {name: _version(b) for name, b in buffers.items()}
        it = iter(args)
        leaves = [next(it) if x is _TENSOR else x for x in s.statics]
        call_args, call_kwargs = torch_pytree.tree_unflatten(leaves, s.spec)
        named = {f"m.{k}": v for k, v in {**params, **buffers}.items()}
        out = torch.func.functional_call(self._forward_only, named, (call_args, call_kwargs))
        outs = [x for x in torch_pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        for name, b in buffers.items():
            if name not in self.updated and _version(b) != versions[name]:
                raise FallbackError(
                    f"submodule '{self.path}' wrote into its buffer '{name}', which it did not write "
                    "on the example inputs at capture time; the update cannot be returned. Convert "
                    "with mode='callback', or make the write unconditional."
                )
        return outs + [buffers[name] for name in self.updated]

    # -- in the interpreter

    def lower(self, ctx: Any, key: int, site: int, args: Sequence[Any], state: Sequence[Any]) -> list[Any]:
        if self._jax is None:
            from bridge.callback import wrap

            def run(site: int, args: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
                return self.run(site, args, state)

            run.__qualname__ = f"submodule '{self.path}' ({type(self.module).__name__})"
            self._jax = wrap(run)
        outs = list(self._jax(site, list(args), list(state)))
        recorded = [tuple(v.shape) for v in ctx.out]
        if [tuple(o.shape) for o in outs] != recorded:
            raise DataDependentShapeError(
                f"the output shapes of submodule '{self.path}' ({type(self.module).__name__}) depend "
                f"on the values of its inputs: torch gave {recorded} on the example inputs at capture "
                f"and {[tuple(o.shape) for o in outs]} on zeros. A JAX program needs output shapes "
                "known from input shapes; pad to a fixed size, or convert with mode='callback' and "
                "call it outside jax.jit."
            )
        return outs


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:  # a tensor subclass without one
        return None


def lowering(node: torch.fx.Node) -> Callable | None:
    """The lowering of an opaque call node or of an op kept whole (None for any other node)."""
    if node.target is OPAQUE_OP:
        return _LIVE[node.args[0]].lower
    if node.meta.get(KEPT_WHOLE):
        return _kept_lowering(node)
    return None


def _kept_lowering(node: torch.fx.Node) -> Callable:
    """Run an op kept whole (`eager_shapes`) in torch through a callback.

    Its output shapes depend only on input shapes, but torch's fake kernel may
    not know them (`aten._ctc_loss`): the callback then finds them by running
    the op on zeros, and checks every run's shapes against them.
    """
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    from bridge.callback import wrap

    op = node.target

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return op(*args, **kwargs)
        except DynamicOutputShapeException as e:  # fake tensors: let the callback run it on zeros
            raise FallbackError(f"{op}: torch's fake kernel cannot give its output shapes") from e

    run.__qualname__ = str(op)
    jax_fn = wrap(run)

    def lower(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        return jax_fn(*args, **kwargs)

    return lower


@contextlib.contextmanager
def opaque_forwards(opaques: Iterable[Opaque]):
    """Install each opaque submodule's capture-time forward; put the real ones back after."""
    saved = []
    try:
        for o in opaques:
            saved.append((o.module, o.module.__dict__.get("forward", _MISSING)))
            o.module.forward = o.forward
        yield
    finally:
        for m, forward in reversed(saved):
            if forward is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_MODULE_PY = os.path.join(_TORCH_DIR, "nn", "modules", "module.py")
_OWN_DIRS = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + d + os.sep
                  for d in ("bridge", "adapters"))


def locate(error: BaseException, root: torch.nn.Module) -> tuple[str | None, str | None]:
    """Where the Python decision that stopped torch.export was made.

    Returns the dotted path of the innermost submodule of `root` whose call the
    error's traceback passes through ('' for `root` itself, None if none), and
    `file.py:123 in f: code` of the innermost frame outside torch's internals
    below it (the user's line, or torch's own nn code such as transformer.py).
    """
    paths = {id(m): p for p, m in root.named_modules()}  # a shared module: its first path
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    path, start = None, 0
    for i, (frame, _) in enumerate(frames):
        if frame.f_code.co_name == "_call_impl" and id(frame.f_locals.get("self")) in paths:
            path, start = paths[id(frame.f_locals["self"])], i + 1
    line = None
    for frame, lineno in frames[start:]:
        name = frame.f_code.co_filename
        internal = name.startswith(_TORCH_DIR) and not name.startswith(os.path.join(_TORCH_DIR, "nn", ""))
        if internal or name == _MODULE_PY or name.startswith(_OWN_DIRS):
            continue
        code = linecache.getline(name, lineno).strip()
        line = f"{os.path.basename(name)}:{lineno} in {frame.f_code.co_name}" + (f": {code}" if code else "")
    return path, line


def describe(opaques: Sequence[Opaque]) -> str:
    """One line per opaque submodule: its path, type and why it falls back."""
    return "\n".join(
        f"  - '{o.path or '<root>'}' ({type(o.module).__name__}): {o.reason}" for o in opaques
    )


# -- one ATen op whose shapes torch computes from values

_CIA = torch._C.DispatchKey.CompositeImplicitAutograd
KEPT_WHOLE = "bridge_kept_whole"  # node.meta key of an op `eager_shapes` kept whole


def failing_op(error: BaseException) -> torch._ops.OpOverload | None:
    """The ATen op torch.export was recording as one graph node when it stopped, if any.

    torch.export keeps a composite op (`aten.cov`, `aten.corrcoef`) as one node,
    but computes its output shapes by running its C++ decomposition on fake
    tensors; a decomposition that checks a value (`aten.equal` in cov's
    degrees-of-freedom test) stops the capture although the op's output shapes
    depend only on its input shapes. Returns the outermost such op (a
    CompositeImplicitAutograd ATen op returning only tensors), or None.
    """
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        op = frame.f_locals.get("func") if frame.f_code.co_name == "proxy_call" else None
        if isinstance(op, torch._ops.OpOverload):
            from torch._export.utils import _is_preservable_cia_op

            returns = [str(r.type) for r in op._schema.returns]
            # Only ops torch.export keeps as nodes (functional ones, not views such as
            # narrow.Tensor): for any other the stand-in kernel would be traced.
            if (op.namespace == "aten" and returns and all(t == "Tensor" for t in returns)
                    and _is_preservable_cia_op(op)):
                return op
            return None
        tb = tb.tb_next
    return None


def _shapes_by_eager(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    """`op`'s outputs as empty tensors, their shapes from running torch on zeros (or ones)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:  # traced as the op's decomposition: it would compute nothing
        raise FallbackError(
            f"{op}: bridge's shape function for this op was traced as its decomposition; this is "
            "a bug in bridge, please report it"
        )
    leaves = [x for x in torch_pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    device = leaves[0].device if leaves else torch.device("cpu")
    if any(not isinstance(s, int) for t in leaves for s in t.shape):
        raise FallbackError(f"{op}: symbolic input shapes; its output shapes cannot be found by running it")
    errors = []
    for fill in (0, 1):
        with unset_fake_temporarily(), torch._C._DisablePythonDispatcher(), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings about the zeros, not the user's inputs
            real = torch_pytree.tree_map(
                lambda t, fill=fill: torch.full(tuple(t.shape), fill, dtype=t.dtype) if isinstance(t, torch.Tensor) else t,
                (args, kwargs))
            try:
                out = op._op_dk(_CIA, *real[0], **real[1])
            except Exception as e:  # e.g. a weight check that zeros fail: try ones
                errors.append(e)
                continue
        return torch_pytree.tree_map(
            lambda t: torch.empty(tuple(t.shape), dtype=t.dtype, device=device) if isinstance(t, torch.Tensor) else t,
            out)
    raise FallbackError(
        f"{op}: torch.export cannot compute its output shapes, and torch raises on zeros and on ones "
        f"of the input shapes ({errors[-1]})"
    ) from errors[-1]


@contextlib.contextmanager
def eager_shapes(ops: Iterable[torch._ops.OpOverload]):
    """While the block runs, torch.export keeps each of `ops` as one node, its shapes from torch.

    The op's CompositeImplicitAutograd Python kernel (which torch.export reads
    as the op's shape function, and which a caller holding the capture lock
    alone uses) is replaced by `_shapes_by_eager`. Its values come from the
    op's lowering or, outside strict mode, from torch through a callback.
    """
    saved = []
    try:
        for op in ops:
            saved.append((op, op.py_kernels.pop(_CIA, _MISSING)))
            op.py_impl(_CIA)(functools.partial(_shapes_by_eager, op))
            op._dispatch_cache.clear()
        yield
    finally:
        for op, kernel in reversed(saved):
            op.py_kernels.pop(_CIA, None)
            if kernel is not _MISSING:
                op.py_kernels[_CIA] = kernel
            op._dispatch_cache.clear()
