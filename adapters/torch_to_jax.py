"""torch -> JAX: nn.Module -> (apply, params), torch function -> JAX function.

    apply, params = bridge.torch_to_jax(module)
    out = apply(params, x)                         # jit / grad / vmap / jvp work
    apply, params, state = bridge.torch_to_jax_with_state(module)
    out, new_state = apply(params, state, x, rng=key)

Trace mode (the default) captures the module with torch.export the first
time `apply` sees a new input signature (cached like jax.jit's cache) and
translates the ATen graph into JAX operations. Callback mode runs torch
itself behind a JAX primitive (see bridge/callback/).
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch
import torch.utils._pytree as torch_pytree

from bridge import capture as capture_lib
from bridge import checks as checks_lib
from bridge import dtypes, interpreter
from bridge import fallback as fallback_lib
from bridge.dlpack import to_jax
from bridge.ops.registry import MissingKeyError
from bridge.tree import ARRAY, STATIC, map_tree, partition

__all__ = [
    "ConvertedApply",
    "FunctionApply",
    "MissingKeyError",
    "ModuleApply",
    "StatefulApply",
    "torch_to_jax",
    "torch_to_jax_with_state",
]

Params = dict[str, jax.Array]


def torch_to_jax(
    module_or_fn: torch.nn.Module | Callable,
    *,
    mode: str = "trace",
    strict: bool = False,
    checks: bool = True,
) -> Any:
    """Convert a torch module into `(apply, params)`, or a torch function into a JAX one.

    Args:
        module_or_fn: an `nn.Module` or a function of torch tensors.
        mode: "trace" translates torch into JAX operations (ops with no
            lowering fall back to torch callbacks, with one warning that lists
            them); "callback" runs torch itself at run time.
        strict: in trace mode, raise on ops with no lowering instead of
            falling back to callbacks.
        checks: keep torch's run-time errors (an index out of range, an
            integer division by zero, an int64 result that does not fit
            int32 with x64 off) as errors; see bridge/checks.py. False
            follows JAX's rules instead (clamped indices, wrapped integers).

    Returns:
        For a module, `(apply, params)`: `params` is a dict keyed like
        `module.named_parameters()` sharing memory with the module's tensors;
        `apply(params, *args, rng=None, **kwargs)` returns JAX values mirroring
        the module's output structure. Buffers are used as they are in the
        module; a forward that updates buffers (train-mode BatchNorm) raises
        and points to `torch_to_jax_with_state`. For a function, a JAX
        function with the same arguments. Either callable is a
        `ConvertedApply` whose `converted` attribute is the conversion
        behind it (for introspection).
    """
    _check_convertible(module_or_fn, "torch_to_jax")
    if isinstance(module_or_fn, torch.nn.Module):
        converted = _Converted(module_or_fn, mode=mode, strict=strict, checks=checks)
        return ModuleApply(converted), converted.params()
    if callable(module_or_fn):
        module = _FunctionModule(module_or_fn)
        fn = FunctionApply(_Converted(module, mode=mode, strict=strict, checks=checks))
        return functools.update_wrapper(fn, module_or_fn)
    raise TypeError(
        f"torch_to_jax takes an nn.Module or a function of torch tensors, got {type(module_or_fn).__name__}."
    )


def torch_to_jax_with_state(
    module: torch.nn.Module, *, mode: str = "trace", strict: bool = False, checks: bool = True
) -> tuple[Callable, Params, Params]:
    """Convert a module whose buffers are state: `(apply, params, state)`.

    `state` is keyed like `module.named_buffers()`; `apply(params, state,
    *args, rng=None, **kwargs)` returns `(out, new_state)` where `new_state`
    holds every buffer, updated where the forward updates it (BatchNorm
    running statistics and `num_batches_tracked` in train mode). Nothing is
    mutated: the module and `state` are left as they are.
    """
    _check_convertible(module, "torch_to_jax_with_state")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"torch_to_jax_with_state takes an nn.Module, got {type(module).__name__}.")
    converted = _Converted(module, mode=mode, strict=strict, checks=checks)
    return StatefulApply(converted), converted.params(), converted.state()


class ConvertedApply:
    """What `torch_to_jax` and `torch_to_jax_with_state` return as `apply`: a plain callable.

    jit, grad, vmap and sharding treat it like any function. `converted`
    is the conversion behind it (the module, its shared params and buffers,
    and its graphs cached per input signature; `converted.captures` maps each
    signature to its torch.export capture in trace mode), for introspection.
    """

    def __init__(self, converted: _Converted) -> None:
        self.converted = converted

    def __repr__(self) -> str:
        module = self.converted.module
        what = module.fn if isinstance(module, _FunctionModule) else module
        return f"<{type(self).__name__} of {getattr(what, '__qualname__', type(what).__name__)}>"


class ModuleApply(ConvertedApply):
    """`apply(params, *args, rng=None, **kwargs)` of a module converted by `torch_to_jax`."""

    def __call__(
        self, params: Params, *args: Any, rng: jax.Array | None = None, **kwargs: Any
    ) -> Any:
        converted = self.converted
        out, new_state = converted(params, converted.state(), args, kwargs, rng)
        if new_state:
            raise ValueError(
                "this module updates its buffers during forward ("
                + ", ".join(sorted(new_state))
                + "), e.g. BatchNorm running statistics in train mode. torch_to_jax would "
                "drop those updates; use bridge.torch_to_jax_with_state(module) to get them "
                "back as new_state, or call module.eval() before converting."
            )
        return out


class FunctionApply(ConvertedApply):
    """A torch function converted by `torch_to_jax`: the same arguments, JAX values."""

    def __call__(self, *args: Any, rng: jax.Array | None = None, **kwargs: Any) -> Any:
        converted = self.converted
        return converted({}, converted.state(), args, kwargs, rng)[0]


class StatefulApply(ConvertedApply):
    """`apply(params, state, *args, rng=None, **kwargs) -> (out, new_state)`.

    What `torch_to_jax_with_state` returns.
    """

    def __call__(
        self,
        params: Params,
        state: Params,
        *args: Any,
        rng: jax.Array | None = None,
        **kwargs: Any,
    ) -> tuple[Any, Params]:
        converted = self.converted
        converted.check_state(state)
        out, updates = converted(params, state, args, kwargs, rng)
        return out, {**state, **updates}


def _check_convertible(obj: Any, api: str) -> None:
    if isinstance(obj, type):
        kind = "module class" if issubclass(obj, torch.nn.Module) else "class"
        raise TypeError(
            f"{api} got the {kind} {obj.__module__}.{obj.__qualname__}, not an instance; "
            f"create the module first, e.g. {api}({obj.__name__}(...))."
        )
    if isinstance(obj, torch.Tensor):
        raise TypeError(
            f"{api} converts modules and functions, got a tensor; use bridge.to_jax(tensor) "
            "to convert data."
        )


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


class _Converted:
    """A module, its shared params/buffers, and its graphs cached per signature."""

    def __init__(self, module: torch.nn.Module, *, mode: str, strict: bool, checks: bool) -> None:
        if mode not in ("trace", "callback"):
            raise ValueError(f"mode must be 'trace' or 'callback', got {mode!r}")
        self.module = module
        self.mode = mode
        self.strict = strict
        self.checks = checks
        self._param_shapes = _expected(module.named_parameters())
        self._buffer_shapes = _expected(module.named_buffers())
        # Tied weights appear once in named_parameters(); the graph may name
        # either alias, so map every alias to the name users see.
        self._alias = _aliases(module.named_parameters(remove_duplicate=False))
        self._alias.update(_aliases(module.named_buffers(remove_duplicate=False)))
        self._state: Params | None = None
        self._graphs: dict[capture_lib.Signature, Callable] = {}
        # The torch.export capture behind each graph (trace mode), for introspection
        # and for bridge.export's source comments.
        self.captures: dict[capture_lib.Signature, capture_lib.Captured] = {}
        # Example size and range of each JAX symbolic dimension `apply` may be traced with
        # (jax.export.symbolic_shape): what torch.export needs to capture it symbolic.
        # bridge.export(dynamic_shapes=...) fills it in.
        self.dims: dict[str, capture_lib.SymbolicDim] = {}
        self._build_lock = threading.Lock()

    # -- values shared with the module

    def params(self) -> Params:
        return {n: to_jax(p) for n, p in self.module.named_parameters()}

    def state(self) -> Params:
        if self._state is None:
            self._state = {n: to_jax(b) for n, b in self.module.named_buffers()}
        return self._state

    def check_params(self, params: Params) -> None:
        if not isinstance(params, dict):
            raise TypeError(
                f"params must be a dict keyed like module.named_parameters(), got {type(params).__name__}"
            )
        _check_entries(
            "params", params, self._param_shapes,
            "Pass the dict returned by torch_to_jax (or one with the same keys, shapes and "
            "dtypes); to run in another dtype, convert the module (e.g. module.to(torch.bfloat16)) "
            "and call torch_to_jax again.",
        )

    def check_state(self, state: Params) -> None:
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be the dict of buffers keyed like module.named_buffers(), got "
                f"{type(state).__name__}."
            )
        _check_entries(
            "state", state, self._buffer_shapes,
            "Pass the state returned by torch_to_jax_with_state, or the new_state of a previous call.",
        )

    # -- running

    def __call__(
        self, params: Params, state: Params, args: tuple, kwargs: dict, rng: jax.Array | None
    ) -> tuple[Any, Params]:
        self.check_params(params)
        split, arrays = partition((args, kwargs), _take, "apply()")
        shapes = iter(arrays)
        sig = capture_lib.Signature(
            treedef=split.treedef,
            leaves=tuple(_aval(next(shapes)) if s is ARRAY else s[1] for s in split.slots),
            types=tuple(None if s is ARRAY else s[0] for s in split.slots),
            training=tuple(m.training for m in self.module.modules()),
            x64=dtypes.x64_enabled(),
        )
        graph_fn = self._graphs.get(sig)
        if graph_fn is None:
            with self._build_lock:  # threads calling with a new signature build it once
                graph_fn = self._graphs.get(sig)
                if graph_fn is None:
                    graph_fn = self._graphs[sig] = self._build(sig)
        return graph_fn(params, state, arrays, rng)

    def _build(self, sig: capture_lib.Signature) -> Callable:
        if self.mode == "callback":
            return self._build_callback(sig)
        # Outside strict mode, what torch.export cannot capture runs in torch:
        # per submodule, or the whole module or function (see bridge/fallback.py).
        try:
            captured = capture_lib.capture(self.module, _call_module, sig, fall_back=not self.strict, dims=self.dims)
        except capture_lib.RootFallback as e:
            if isinstance(self.module, _FunctionModule):
                _warn_function_fallback(self.module.fn, e.source)
            else:
                _warn_fallback(f"  - '<root>' ({type(self.module).__name__}): {e.source or 'its forward'}")
            return self._build_callback(sig, updated=e.updated)
        self.captures[sig] = captured
        if captured.opaque:
            _warn_fallback(fallback_lib.describe(captured.opaque))
        # Outside strict mode, ops with no lowering and ops whose lowering
        # refuses the arguments at hand run in torch through callbacks.
        fallback = None if self.strict else _callback_lowering
        if captured.unsupported:
            if self.strict:
                raise interpreter.unsupported_error(captured.unsupported)
            ops = sorted({str(interpreter.node_op(n)) for n in captured.unsupported})
            warnings.warn(
                f"{len(ops)} ATen op(s) have no JAX lowering and run through torch callbacks: "
                f"{', '.join(ops)}. Such callbacks run on the host and cannot be serialised "
                "or run on TPU; pass strict=True to make this an error.",
                stacklevel=4,
            )
        constants = {k: to_jax(v) for k, v in captured.constants.items()}
        alias = self._alias
        out_spec = captured.out_spec
        with_checks = self.checks
        # The checks' exceptions, taken when the program is traced (the same
        # on every trace of this graph); an eager call raises the failed one.
        exceptions: list[Exception] = []

        def graph_fn(params, state, arrays, rng, staged):
            inputs = []
            for kind, name in captured.inputs:
                if kind == "user":
                    inputs.append(arrays[name])
                elif kind == "param":
                    inputs.append(params[alias.get(name, name)])
                elif kind == "buffer":
                    inputs.append(state[alias.get(name, name)])
                else:
                    inputs.append(constants[name])
            checks = [] if with_checks else None
            outs = interpreter.run(captured.program, inputs, rng, fallback, checks)
            updates, user = {}, []
            for (kind, name), value in zip(captured.outputs, outs, strict=True):
                if kind == "buffer":
                    updates[alias.get(name, name)] = value
                else:
                    user.append(value)
            out = _unflatten_outputs(user, out_spec)
            if staged:
                checks_lib.stage(checks or [])
                return out, updates, None
            exceptions[:] = [c.exception() for c in checks or []]
            return out, updates, checks_lib.flags(checks or [])

        jitted = jax.jit(graph_fn, static_argnames="staged")

        def run(params, state, arrays, rng):
            # Eager calls check on the host and raise torch's own error type;
            # traced calls carry the checks inside the program.
            staged = _traced((params, state, arrays, rng))
            out, updates, oks = jitted(params, state, arrays, rng, staged=staged)
            checks_lib.raise_failed(exceptions, oks)
            return out, updates

        return run

    def _build_callback(self, sig: capture_lib.Signature, updated: tuple[str, ...] | None = None) -> Callable:
        """Run the whole module in torch.

        `updated` (the module-level fallback for a root torch.export cannot
        capture): the buffers the forward writes, returned as new state; every
        buffer is then a clone, so no write reaches JAX's buffers.
        """
        from bridge.callback import wrap

        module = self.module
        array_pos = [i for i, leaf in enumerate(sig.leaves) if isinstance(leaf, capture_lib.Leaf)]

        def torch_fn(params, buffers, tensors):
            leaves = list(sig.leaves)
            for i, t in zip(array_pos, tensors, strict=True):
                leaves[i] = t
            args, kwargs = jax.tree_util.tree_unflatten(sig.treedef, leaves)
            if updated is None:
                return torch.func.functional_call(module, {**params, **buffers}, args, kwargs)
            buffers = {n: b.clone() for n, b in buffers.items()}
            out = torch.func.functional_call(module, {**params, **buffers}, args, kwargs)
            return out, {n: buffers[n] for n in updated}

        wrapped = wrap(torch_fn)

        def graph_fn(params, state, arrays, rng):
            if updated is None:
                return wrapped(params, state, list(arrays)), {}
            return wrapped(params, state, list(arrays))

        return graph_fn


def _callback_lowering(node: torch.fx.Node) -> Callable:
    """How a node with no lowering runs: an opaque submodule's call, or one ATen op, in torch."""
    return fallback_lib.lowering(node) or interpreter.callback_fallback(node)


def _warn_fallback(listing: str) -> None:
    warnings.warn(
        "torch.export cannot capture these submodules (Python code that needs a tensor's values); "
        "they run in torch through callbacks and the rest is translated:\n"
        f"{listing}\nCallbacks run on the host and cannot be serialised or run on TPU; "
        "pass strict=True to make this an error.",
        stacklevel=5,
    )


def _warn_function_fallback(fn: Callable, source: str | None) -> None:
    name = getattr(fn, "__qualname__", type(fn).__name__)
    warnings.warn(
        f"torch.export cannot capture the function {name} (Python code that needs a tensor's "
        f"values{': ' + source if source else ''}); it runs in torch through a callback. "
        "Callbacks run on the host and cannot be serialised or run on TPU; pass strict=True "
        "to make this an error.",
        stacklevel=5,
    )


def _traced(tree: Any) -> bool:
    """Whether this call is being traced (its values have no data yet).

    Inputs that are tracers say so; a call inside `jax.jit` on closed-over
    concrete arrays is traced too, which only JAX's trace state tells.
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree)):
        return True
    return _trace_state_clean is not None and not _trace_state_clean()


try:
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # a jax without it: the inputs alone decide
    _trace_state_clean = None


def _expected(named: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in named}


def _check_entries(what: str, given: dict, expected: dict, fix: str) -> None:
    """Name every missing, unexpected, mis-shaped or mis-typed entry of params/state."""
    missing = sorted(expected.keys() - given.keys())
    extra = sorted(given.keys() - expected.keys())
    wrong = []
    for n in sorted(expected.keys() & given.keys()):
        shape, torch_dtype = expected[n]
        dtype = dtypes.canonical_jax_dtype(torch_dtype)  # as JAX holds it in this x64 mode
        value = given[n]
        got_shape = tuple(jax.numpy.shape(value))
        got_dtype = np.dtype(getattr(value, "dtype", type(value)))
        if got_shape != shape:
            wrong.append(f"'{n}' has shape {got_shape}, expected {shape}")
        elif got_dtype != dtype:
            wrong.append(f"'{n}' has dtype {got_dtype.name}, expected {dtype.name}")
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        parts.extend(wrong)
        owner = "parameters" if what == "params" else "buffers"
        raise ValueError(f"{what} do not match the module's {owner}: " + "; ".join(parts) + ". " + fix)


def _aliases(named: Any) -> dict[str, str]:
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, tensor in named:
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            alias[name] = canonical
    return alias


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, torch.Tensor)
    )


def _take(x: Any, i: int) -> Any:
    """An array argument of apply() as it is, or STATIC (for `bridge.tree.partition`)."""
    if isinstance(x, torch.Tensor):
        raise TypeError(
            "apply() takes JAX arrays, got a torch.Tensor; convert it with bridge.to_jax(tensor)."
        )
    return x if _is_array(x) else STATIC


def _aval(x: Any) -> capture_lib.Leaf:
    return capture_lib.Leaf(tuple(x.shape), jax.numpy.dtype(x.dtype))


def _unflatten_outputs(leaves: list[Any], out_spec: Any) -> Any:
    """Rebuild torch's output structure around JAX values, as a JAX pytree.

    torch's unflatten functions (ModelOutput, transformers caches) expect
    tensors, so the structure is built around distinct empty placeholder
    tensors, which are then swapped for the JAX values by identity.
    """
    placeholders = [torch.empty(0) for _ in leaves]
    slot = {id(t): i for i, t in enumerate(placeholders)}
    skeleton = torch_pytree.tree_unflatten(placeholders, out_spec)
    return map_tree(skeleton, lambda t: leaves[slot[id(t)]], lambda x: isinstance(x, torch.Tensor), "jax")

