"""torch -> ATen graph: torch.export (non-strict), selective decomposition.

`capture(module, signature)` exports `module` for one input signature
(shapes, dtypes, pytree structure and static values of the arguments) and
returns a `Captured` graph whose high-level ops (linear, convolution,
layer_norm, scaled_dot_product_attention, ...) are kept wherever the lowering
table has them. Only ops without a lowering are decomposed, with a table
restricted to them; a blanket `run_decompositions()` is avoided (it fails on
transformers' GPT-2 in torch 2.13).

With `fall_back=True`, a module that torch.export cannot capture because a
forward makes a Python decision on a tensor's value (or reads its values, as
`.numpy()` does) is captured with the
innermost such submodules as opaque calls that run in torch (see
bridge/fallback.py); if the module's own forward makes the decision,
`RootFallback` says so, for the caller to run the whole module in torch.
Before that, and also without `fall_back`: a guard on which only one outcome
lets torch go on is assumed and checked at run time (bridge/specialise.py),
and a composite op whose decomposition tests values is kept whole, its shapes
from torch (`fallback.eager_shapes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import torch
from torch._decomp import core_aten_decompositions
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from bridge import constants, dtypes, preserve, specialise
from bridge import fallback as fallback_lib
from bridge.dlpack import to_torch
from bridge.interpreter import node_op
from bridge.ops import LOWERINGS

_PREFIX = "m."
_MAX_DECOMPOSITION_ROUNDS = 8

# torch.export is not re-entrant: two captures at once (threads calling
# converted functions for the first time) corrupt its global tracing state
# and can leave fake tensors in the user's module. One capture at a time.
_CAPTURE_LOCK = threading.RLock()


class CaptureError(RuntimeError):
    """torch.export could not capture the module for this input signature.

    `module_path` is the submodule whose forward made the Python decision on a
    tensor's value ('' for the module itself, None if unknown) and `source`
    the line that made it (`file.py:12 in forward: if x.sum() > 0:`).
    """

    module_path: str | None = None
    source: str | None = None


class RootFallback(CaptureError):
    """The module's own forward cannot be captured: run the whole module in torch.

    `updated` names the buffers its forward writes (from one eager run on the
    example inputs), which the caller must return as new state.
    """

    updated: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Shape and dtype of one array argument (its aval).

    A dimension is an int, or a JAX symbolic dimension (`jax.export.symbolic_shape`)
    when the caller traces with symbolic shapes; see `SymbolicDim`.
    """

    shape: tuple[Any, ...]
    dtype: Any


@dataclasses.dataclass(frozen=True)
class SymbolicDim:
    """How to capture a JAX symbolic dimension: torch.export's `Dim(name, min=, max=)`,
    traced at the size `example` (a torch example input needs a concrete size)."""

    name: str
    example: int
    min: int | None = None
    max: int | None = None


@dataclasses.dataclass(frozen=True)
class Signature:
    """Everything that selects a captured graph: what jax.jit keys on too."""

    treedef: Any  # jax treedef of (args, kwargs)
    leaves: tuple  # Leaf for arrays, the value itself for static leaves
    training: tuple[bool, ...]
    x64: bool  # JAX's x64 mode: it decides how 32-bit integer inputs are read
    # The type of every leaf: 2, 2.0 and True are equal and hash alike, but torch
    # promotes `int_tensor * 2.0` to float and `int_tensor * 2` not.
    types: tuple[type | None, ...] = ()


@dataclasses.dataclass
class Captured:
    """An exported, functional ATen graph and how its inputs/outputs map."""

    program: ExportedProgram
    inputs: list[tuple[str, str | int]]  # per placeholder: (kind, name or user-leaf index)
    constants: dict[str, torch.Tensor]
    outputs: list[tuple[str, str | None]]  # per graph output: (kind, buffer name)
    out_spec: Any  # torch pytree spec of the user outputs
    unsupported: list[torch.fx.Node]
    # Submodules that run in torch as opaque calls (module-level fallback).
    opaque: list[fallback_lib.Opaque] = dataclasses.field(default_factory=list)
    # Data-dependent guards decided at capture, each checked at run time.
    assumptions: list[specialise.Assumption] = dataclasses.field(default_factory=list)


class _Wrapper(torch.nn.Module):
    """Holds the module as `m` and rebuilds the caller's args from flat tensors."""

    def __init__(self, module: torch.nn.Module, call: Callable, rebuild: Callable) -> None:
        super().__init__()
        self.m = module
        self._call = call
        self._rebuild = rebuild

    def forward(self, *tensors):
        args, kwargs = self._rebuild(tensors)
        return self._call(self.m, *args, **kwargs)


_WIDER = {torch.int32: torch.int64, torch.uint32: torch.uint64}


def example_tensor(
    leaf: Leaf, device: torch.device | None, widen: bool, dims: Mapping[str, SymbolicDim] | None = None
) -> torch.Tensor:
    """A zero tensor standing for the array `leaf` describes.

    With x64 off, JAX holds torch's int64 as int32, so a JAX int32 array may
    stand for either a torch int64 tensor (ids, indices: torch's convention) or
    a genuine int32 one (LU pivots); nothing in the array tells which. With
    `widen`, 32-bit integers become 64-bit (the convention); `capture` falls
    back to keeping them 32-bit when torch rejects that.
    """
    dtype = dtypes.to_torch_dtype(leaf.dtype)
    if widen:
        dtype = _WIDER.get(dtype, dtype)
    shape = [d if isinstance(d, int) else _symbolic(d, dims).example for d in leaf.shape]
    return torch.zeros(shape, dtype=dtype, device=device)


def _examples(leaves: list[Leaf], device, widen: Sequence[bool], dims: Mapping | None) -> tuple[torch.Tensor, ...]:
    """One example tensor per array leaf (`widen`: per leaf, whether to widen it)."""
    return tuple(example_tensor(leaf, device, w, dims) for leaf, w in zip(leaves, widen, strict=True))


def _symbolic(d: Any, dims: Mapping[str, SymbolicDim] | None) -> SymbolicDim:
    """The `SymbolicDim` of a JAX symbolic dimension that is one variable."""
    name = str(d)
    if dims is None or name not in dims:
        raise CaptureError(
            f"the symbolic dimension {name!r} cannot be captured: torch.export needs an example "
            "size and range for each symbolic dimension, and only single dimension variables "
            "(not expressions such as 2*b) with one are supported. bridge.export(..., "
            "dynamic_shapes=...) provides them."
        )
    return dims[name]


def _dynamic_shapes(leaves: list[Leaf], dims: Mapping[str, SymbolicDim] | None) -> tuple | None:
    """torch.export's `dynamic_shapes` for the wrapper's flat tensors: one `Dim` per symbol."""
    if all(isinstance(d, int) for leaf in leaves for d in leaf.shape):
        return None
    made: dict[str, Any] = {}

    def dim(d: Any) -> Any:
        sym = _symbolic(d, dims)
        if sym.name not in made:
            bounds = {k: v for k, v in (("min", sym.min), ("max", sym.max)) if v is not None}
            made[sym.name] = torch.export.Dim(sym.name, **bounds)
        return made[sym.name]

    per_leaf = tuple(
        {axis: dim(d) for axis, d in enumerate(leaf.shape) if not isinstance(d, int)} or None
        for leaf in leaves
    )
    return (per_leaf,)  # the wrapper's forward takes the tensors as *args


def _example_choices(leaves: list[Leaf], x64: bool) -> list[list[bool]]:
    """Which leaves to widen, in the order `capture` tries them.

    First every 32-bit integer widened (torch's int64 convention); if torch
    rejects that (an op that requires int32, such as LU pivots), each such leaf
    kept 32-bit on its own, then all of them. Under x64 nothing is widened.
    """
    if x64:
        return [[False] * len(leaves)]
    narrowable = [i for i, leaf in enumerate(leaves) if dtypes.to_torch_dtype(leaf.dtype) in _WIDER]
    choices = [[True] * len(leaves)]
    for i in narrowable:
        choices.append([j != i for j in range(len(leaves))])
    if len(narrowable) > 1:
        choices.append([j not in narrowable for j in range(len(leaves))])
    return choices


def capture(
    module: torch.nn.Module,
    call: Callable,
    sig: Signature,
    fall_back: bool = False,
    dims: Mapping[str, SymbolicDim] | None = None,
) -> Captured:
    """Export `call(module, *args, **kwargs)` for the signature `sig`.

    Array leaves become graph inputs; static leaves are baked into the graph
    (they are part of `sig`, so a new value captures anew). Safe to call from
    any thread (captures run one at a time), and the module is left exactly as
    it was, even when torch.export fails. With `fall_back`, submodules whose
    forward torch.export cannot capture become opaque calls (`Captured.opaque`);
    `RootFallback` if the module's own forward cannot be captured.

    Leaves whose shapes hold JAX symbolic dimensions are captured with those
    dimensions symbolic (torch.export's `dynamic_shapes`), each traced at the
    example size and within the range `dims` gives for it; the graph then
    carries SymInts, which the interpreter reads from its inputs' shapes.
    """
    if not fall_back:
        with _CAPTURE_LOCK, preserve.module_preserved(module):
            return _capture(module, call, sig, dims)
    with _CAPTURE_LOCK, preserve.module_preserved(module), _no_graph_dumps():
        try:
            return _capture(module, call, sig, dims)
        except CaptureError as e:
            return _capture_around(module, call, sig, e, dims)


class _NoGraphDumps:
    """sys.stderr, less the partial graphs torch.export prints when it fails, from this thread.

    A failed attempt is expected while the fallback searches; its dump (the
    graph up to the failure) would only bury the warning that says what fell back.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.thread = threading.get_ident()
        self.dropping = False

    def write(self, text: str) -> int:
        if threading.get_ident() == self.thread:
            if "def forward(self" in text:
                self.dropping = True
                return len(text)
            if self.dropping and text == "\n":
                self.dropping = False
                return len(text)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def _no_graph_dumps():
    stream = sys.stderr
    sys.stderr = _NoGraphDumps(stream)
    try:
        yield
    finally:
        sys.stderr = stream


def _capture_around(
    module: torch.nn.Module, call: Callable, sig: Signature, error: CaptureError, dims: Mapping | None
) -> Captured:
    """Capture with the innermost submodules that stop torch.export made opaque."""
    wrapper, leaves, device = _wrapped(module, call, sig)
    choice = _example_choices(leaves, sig.x64)[0]
    examples = _examples(leaves, device, choice, dims)
    try:
        with preserve.module_preserved(module):  # an eager run may fill the module's caches
            recording = fallback_lib.record(module, lambda: wrapper(*examples))
    except Exception as e:
        raise error from e  # torch itself fails on the example inputs: nothing to fall back to
    opaque: dict[str, fallback_lib.Opaque] = {}
    for _ in range(len(list(module.modules())) + 1):
        path, reason = error.module_path, error.source or "a Python decision on a tensor's value"
        while path and path in opaque:  # its caller passes it a value computed from data
            reason = f"passes submodule '{path}' a value computed from a tensor ({opaque[path].reason})"
            path = path.rpartition(".")[0]
        if not path:  # the module's own forward decides
            if "" in recording.errors:
                raise fallback_lib.FallbackError(
                    f"torch.export cannot capture this code ({reason}), and it cannot run through a "
                    f"torch callback either: {recording.errors['']}. Return tensors (e.g. "
                    "torch.tensor(value) or keep the value a tensor instead of calling .item()), "
                    "or call the torch code outside JAX."
                ) from error
            root = RootFallback(str(error))
            root.module_path, root.source = "", reason
            root.updated = recording.updated.get("", ())
            raise root from error
        opaque = {p: o for p, o in opaque.items() if not p.startswith(path + ".")}
        opaque[path] = fallback_lib.Opaque(path, module.get_submodule(path), reason, recording)
        try:
            with fallback_lib.opaque_forwards(opaque.values()):  # each export attempt is preserved
                captured = _capture(module, call, sig, dims)
        except CaptureError as e:
            error = e
            continue
        captured.opaque = list(opaque.values())
        return captured
    raise error


def _wrapped(module: torch.nn.Module, call: Callable, sig: Signature) -> tuple[_Wrapper, list[Leaf], Any]:
    """The module wrapped to take flat tensors, the array leaves, the examples' device."""
    array_pos = [i for i, leaf in enumerate(sig.leaves) if isinstance(leaf, Leaf)]
    # Example inputs live where the module's parameters do (e.g. an XLA device).
    device = next((p.device for p in module.parameters()), None)
    leaves = [sig.leaves[i] for i in array_pos]

    def rebuild(tensors):
        leaves = list(sig.leaves)
        for i, t in zip(array_pos, tensors, strict=True):
            leaves[i] = t
        # TorchNodes (e.g. a cache passed back in) become torch objects again.
        return to_torch(jax.tree_util.tree_unflatten(sig.treedef, leaves))

    return _Wrapper(module, call, rebuild), leaves, device


def _capture(module: torch.nn.Module, call: Callable, sig: Signature, dims: Mapping | None) -> Captured:
    register_model_pytrees(module)
    wrapper, leaves, device = _wrapped(module, call, sig)
    ops: list[torch._ops.OpOverload] = []  # ops kept whole, their shapes from torch (fallback.eager_shapes)
    while True:
        with warnings.catch_warnings(), fallback_lib.eager_shapes(ops):
            # torch.export's own pytree deprecation noise; nothing a user can act on.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
            try:
                program, specialised = _export(wrapper, leaves, device, sig.x64, dims)
            except CaptureError as e:
                op = fallback_lib.failing_op(e.__cause__) if e.__cause__ is not None else None
                if op is None or op in ops or len(ops) >= _MAX_DECOMPOSITION_ROUNDS:
                    raise
                ops.append(op)
                continue
            constants.check(program, module, _PREFIX)  # before torch warns about the same tensors
            program = program.run_decompositions({})  # functionalise; keep high-level ops
            program = _decompose_unlowered(program, keep=ops)
        break
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in ops:
            node.meta[fallback_lib.KEPT_WHOLE] = True
    captured = _describe(program)
    if specialised:
        specialise.label_assertions(program, *specialised)
        captured.assumptions = specialised[0]
    return captured


# What torch raises when Python code reads a tensor's values while torch.export
# traces with fake tensors (`.numpy()`, `np.asarray(x)`, a data pointer).
_VALUE_READS = (".numpy() is not supported for tensor subclasses", "Cannot access data pointer of Tensor")


def _data_dependent_error(e: Exception, root: torch.nn.Module) -> CaptureError | None:
    """A clear error for torch.export's data-dependent guard failures, or None."""
    name = type(e).__name__
    text = str(e)
    reads = any(marker in text for marker in _VALUE_READS)
    # An op whose fake kernel cannot give its output shapes (aten._ctc_loss,
    # aten.linalg_lstsq): torch computes them from values.
    dynamic = name == "DynamicOutputShapeException"
    # A tensor's value used as a number in a view (narrow with a tensor start).
    pending = name == "PendingUnbackedSymbolNotFound"
    if not (reads or dynamic or pending) and "DataDependent" not in name and "data-dependent" not in text:
        return None
    path, source = fallback_lib.locate(e, root)
    where = ""
    if source:
        where = f" at {source}"
    else:
        marker = "The following call raised this error:"
        if marker in text:
            lines = [ln.strip() for ln in text.split(marker, 1)[1].strip().splitlines()[:2]]
            where = " at " + ": ".join(ln for ln in lines if ln)
    if path:
        where += f" (in submodule '{path}', {type(root.get_submodule(path)).__name__})"
    reason = text.strip().splitlines()[0] if text.strip() else name
    submodule = (
        f"torch_to_jax with strict=False (the default) runs only submodule '{path}' in torch "
        "and translates the rest; or " if path else ""
    )
    what = (
        "reads the values of a tensor in Python" if reads
        else "calls an op whose output shapes torch computes from tensor values" if dynamic
        else "uses the value of a tensor as a Python number (an index or a size)" if pending
        else "makes a Python decision from the value of a tensor"
    )
    error = CaptureError(
        f"torch.export cannot capture this code: it {what}{where} ({reason}). While capturing, "
        "tensor values are unknown, so the "
        f"branch cannot be translated into one JAX program. Fixes: {submodule}convert with "
        "mode='callback' to run torch itself at run time; or compute both branches and pick "
        "with torch.where (or use torch.cond); or pass the deciding value as a Python "
        "argument (it then becomes a static value, captured once per value)."
    )
    error.module_path, error.source = path, source
    return error


def _export_once(wrapper: torch.nn.Module, examples: tuple, dynamic_shapes: Any) -> ExportedProgram:
    """One torch.export attempt; what the traced forward stored on the module does not outlive it."""
    with preserve.module_preserved(wrapper):
        return torch.export.export(wrapper, examples, dynamic_shapes=dynamic_shapes, strict=False)


def _export(
    wrapper: torch.nn.Module, leaves: list[Leaf], device, x64: bool, dims: Mapping | None
) -> tuple[ExportedProgram, Any]:
    """torch.export the wrapper, with 32-bit integer inputs widened where torch accepts it.

    Also returns what `specialise.explore` assumed to capture it (None if nothing).
    """
    choices = _example_choices(leaves, x64)
    dynamic_shapes = _dynamic_shapes(leaves, dims)
    first_error = None
    # A rejected choice makes FakeTensor log the failing meta function's
    # traceback; the first error is raised below if no choice works.
    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
    # Data-dependent guards log a warning per symbol; the error below says it all.
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    levels = fake_tensor_log.level, shapes_log.level
    if len(choices) > 1:
        fake_tensor_log.setLevel(logging.CRITICAL)
    shapes_log.setLevel(logging.ERROR)
    try:
        for widen in choices:
            examples = _examples(leaves, device, widen, dims)
            try:
                with specialise.deciding([]) as trace:  # notes the data-dependent guard it stops at
                    return _export_once(wrapper, examples, dynamic_shapes), None
            except Exception as e:  # torch's own checks reject a dtype: try the next choice
                specialise.note_guard(e, trace)
                first_error = first_error or e
        # A data-dependent guard on which only one outcome lets torch go on:
        # assume it, checked at run time (bridge/specialise.py).
        examples = _examples(leaves, device, choices[0], dims)
        try:
            with _no_graph_dumps():  # the failed attempts' partial graphs
                export = functools.partial(_export_once, wrapper, examples, dynamic_shapes)
                program, assumptions, trace = specialise.explore(specialise.attempt_with(export),
                    first_error)
            return program, (assumptions, trace)
        except Exception as e:
            if e is not first_error:
                raise
    finally:
        fake_tensor_log.setLevel(levels[0])
        shapes_log.setLevel(levels[1])
    clear = _data_dependent_error(first_error, wrapper.m)
    if clear is not None:
        raise clear from first_error
    raise first_error


def register_model_pytrees(module: torch.nn.Module) -> None:
    """Register the non-tensor types a model passes around (caches) as torch pytrees.

    transformers models return cache objects by default; torch.export needs
    them registered, and transformers ships the registration.
    """
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return
    from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model

    register_cache_pytrees_for_model(module)


def _graph_ops(program: ExportedProgram) -> set[torch._ops.OpOverload]:
    return {
        n.target
        for n in program.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
    }


def _decomposition_for(op: torch._ops.OpOverload) -> Callable | None:
    # Only decompositions into core ATen ops: torch's general table also maps
    # ops to prims, which would trade a missing lowering for another.
    table = core_aten_decompositions()
    if op in table:
        return table[op]
    if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
        return op.decompose
    return None


def _decompose_unlowered(program: ExportedProgram, keep: Sequence[torch._ops.OpOverload] = ()) -> ExportedProgram:
    """Decompose only the ops with no lowering, until none is left to decompose.

    The ops in `keep` (whose decomposition needs tensor values) stay whole.
    """
    failed: set[torch._ops.OpOverload] = set(keep)
    for _ in range(_MAX_DECOMPOSITION_ROUNDS):
        table = {}
        for op in _graph_ops(program) - LOWERINGS.keys() - failed - {fallback_lib.OPAQUE_OP}:
            decomp = _decomposition_for(op)
            if decomp is not None:
                table[op] = decomp
        if not table:
            break
        try:
            program = program.run_decompositions(table)
        except Exception:
            # A decomposition can fail to retrace (e.g. sdpa's CPU kernel has
            # strides a later `view` rejects). Keep the ones that work; the
            # others stay as they are and are reported as unlowered.
            for op, decomp in table.items():
                try:
                    program = program.run_decompositions({op: decomp})
                except Exception:
                    failed.add(op)
    return program


def _describe(program: ExportedProgram) -> Captured:
    sig = program.graph_signature
    inputs: list[tuple[str, str | int]] = []
    user_index = 0
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(("user", user_index))
            user_index += 1
        elif spec.kind == InputKind.PARAMETER:
            inputs.append(("param", _strip(spec.target)))
        elif spec.kind == InputKind.BUFFER:
            inputs.append(("buffer", _strip(spec.target)))
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            inputs.append(("constant", spec.target))
        elif spec.kind == InputKind.TOKEN:
            continue  # effect tokens: the interpreter makes them up (see interpreter.run)
        else:
            raise NotImplementedError(f"unsupported graph input kind {spec.kind}")
    outputs: list[tuple[str, str | None]] = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(("user", None))
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            outputs.append(("buffer", _strip(spec.target)))
        elif spec.kind == OutputKind.TOKEN:
            continue  # dropped by the interpreter
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise ValueError(
                "the torch code writes into one of its inputs in place; a JAX function "
                "cannot mutate its arguments. Return the new value instead."
            )
        elif spec.kind == OutputKind.PARAMETER_MUTATION:
            raise ValueError(
                f"the torch code writes into parameter '{_strip(spec.target)}' in place "
                "during forward; JAX parameters are immutable. Make it a buffer, or "
                "update it outside forward."
            )
        else:
            raise NotImplementedError(f"unsupported graph output kind {spec.kind}")
    unsupported = [
        n
        for n in program.graph.nodes
        if n.op == "call_function"
        and isinstance(node_op(n), torch._ops.OpOverload)
        and node_op(n) not in LOWERINGS
        and node_op(n) is not fallback_lib.OPAQUE_OP
    ]
    return Captured(
        program=program,
        inputs=inputs,
        constants=dict(program.constants),
        outputs=outputs,
        out_spec=program.call_spec.out_spec,
        unsupported=unsupported,
    )


def _strip(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
