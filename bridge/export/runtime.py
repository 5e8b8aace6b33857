"""The torch-free runtime of an exported model: `load`, `apply`, `apply_with_state`.

bridge.export copies the body of this file (below the BODY marker) into every
`model.py` it writes, after the imports, so that the generated file needs only
jax, numpy and safetensors. It reads `export.json` beside the `model.py` it is
copied into: the names, shapes and dtypes of params and state, and the
structure of the inputs and outputs. The format's own part of model.py defines
`_program()`, which returns the flat program `(*flat) -> tuple of arrays`.

Inputs are flattened in a fixed order (params in `named_parameters()` order,
then state in `named_buffers()` order, then the rng key's data if the model
draws random numbers, then the array leaves of `(args, kwargs)`), and the flat
outputs are the output leaves followed by the buffers the forward updates.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors


def _program():  # defined by the format's part of model.py
    raise NotImplementedError


# ---- BODY (copied into model.py) ----

FOLDER = pathlib.Path(__file__).resolve().parent
CACHE: dict = {}
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64", "C128": "complex128",
}


def spec() -> dict:
    """The contents of export.json: the program's inputs, outputs, params and state."""
    if "spec" not in CACHE:
        CACHE["spec"] = json.loads((FOLDER / "export.json").read_text())
    return CACHE["spec"]


def load(folder=None) -> tuple[dict, dict]:
    """`(params, state)`: dicts of jax arrays keyed like torch's named_parameters() / named_buffers()."""
    folder = pathlib.Path(folder) if folder is not None else FOLDER
    params = _read_weights(folder / "params.safetensors", spec()["params"])
    state = _read_weights(folder / "state.safetensors", spec()["state"])
    return params, state


def _read_weights(path, entries: list) -> dict:
    raw = {name: info for name, info in safetensors.deserialize(path.read_bytes())}
    out = {}
    for name, shape, dtype in entries:
        info = raw[name]
        stored = jnp.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        array = np.frombuffer(bytes(info["data"]), dtype=stored).reshape(info["shape"])
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{path.name}: '{name}' has shape {array.shape}, expected {tuple(shape)}")
        # 64-bit buffers are held as the program expects them (int32 when JAX's x64 mode
        # was off at export; their values were checked to fit then).
        out[name] = jnp.asarray(array.astype(jnp.dtype(dtype)))
    return out


def apply_with_state(params: dict, state: dict, *args, rng=None, **kwargs):
    """`(out, new_state)`: the forward on `args`/`kwargs`, and every buffer, updated where it changes."""
    s = spec()
    _check_entries("params", params, s["params"])
    _check_entries("state", state, s["state"])
    flat = [params[name] for name, _, _ in s["params"]]
    flat += [state[name] for name, _, _ in s["state"]]
    if s["rng"] is not None:
        flat.append(_key_data(rng, s["rng"]))
    leaves: list = []
    _flatten(s["inputs"]["tree"], (list(args), kwargs), leaves, "inputs")
    names = s["flat_inputs"][len(flat):]
    sizes: dict = {}  # symbolic dimension -> the size this call gives it
    for name, leaf, (shape, dtype) in zip(names, leaves, s["inputs"]["leaves"], strict=True):
        _check_input(name, leaf, shape, dtype, sizes, s.get("dims", {}))
    outs = _program()(*flat, *leaves)
    n_out = len(s["outputs"]["leaves"])
    out = _build(s["outputs"]["tree"], outs[:n_out])
    new_state = dict(state)
    new_state.update(zip(s["state_updates"], outs[n_out:], strict=True))
    return out, new_state


def apply(params: dict, *args, rng=None, **kwargs):
    """The forward with the exported buffers; raises if the forward updates buffers."""
    s = spec()
    if s["state_updates"]:
        raise ValueError(
            "this model updates its buffers during forward (" + ", ".join(s["state_updates"])
            + "), e.g. BatchNorm running statistics in train mode; apply would drop those "
            "updates. Use apply_with_state(params, state, ...) with (params, state) = load()."
        )
    if "state" not in CACHE:
        CACHE["state"] = load()[1]
    out, _ = apply_with_state(params, CACHE["state"], *args, rng=rng, **kwargs)
    return out


def _key_data(rng, impl: str):
    if rng is None:
        raise ValueError(
            "this model draws random numbers (e.g. dropout) and needs a JAX key: call "
            "apply(params, ..., rng=jax.random.key(0))."
        )
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)  # a raw key (jax.random.PRNGKey)


def _check_entries(what: str, given, entries: list) -> None:
    if not isinstance(given, dict):
        raise TypeError(f"{what} must be a dict of arrays as load() returns, got {type(given).__name__}")
    expected = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
    problems = []
    missing = sorted(expected.keys() - given.keys())
    extra = sorted(given.keys() - expected.keys())
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    for name in sorted(expected.keys() & given.keys()):
        shape, dtype = expected[name]
        value = given[name]
        if tuple(jnp.shape(value)) != shape:
            problems.append(f"'{name}' has shape {tuple(jnp.shape(value))}, expected {shape}")
        elif jnp.dtype(value.dtype) != jnp.dtype(dtype):
            problems.append(f"'{name}' has dtype {jnp.dtype(value.dtype).name}, expected {dtype}")
    if problems:
        raise ValueError(f"{what} do not match the exported model: " + "; ".join(problems) + ".")


def _check_input(name: str, leaf, shape: list, dtype: str, sizes: dict, dims: dict) -> None:
    """Static dimensions as exported; a symbolic one (a name in `shape`) within its range and
    the same size wherever it appears (`sizes` collects them over the inputs of one call)."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(f"input {name} must be a JAX or NumPy array, got {type(leaf).__name__}")
    got = tuple(leaf.shape)
    if len(got) != len(shape) or any(isinstance(e, int) and g != e for g, e in zip(got, shape, strict=False)):
        exported = "(" + ", ".join(str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(
            f"input {name} has shape {got}, but this model was exported for {exported}: "
            "dimensions other than the symbolic ones named in export.json's dims are those of "
            "the example inputs. Pad or slice to that shape, map over a batch with jax.vmap, "
            "or export again (with dynamic_shapes= for the dimensions that vary)."
        )
    for axis, (g, e) in enumerate(zip(got, shape, strict=True)):
        if isinstance(e, int):
            continue
        lo, hi = dims.get(e, [None, None])
        if g < max(lo or 1, 1) or (hi is not None and g > hi):
            raise ValueError(
                f"input {name} has size {g} in dimension {axis}, the symbolic dimension {e!r}, "
                f"which was exported for sizes in [{max(lo or 1, 1)}, {'inf' if hi is None else hi}]"
            )
        if sizes.setdefault(e, g) != g:
            raise ValueError(
                f"input {name} has size {g} in dimension {axis}, the symbolic dimension {e!r}, "
                f"which another input gives size {sizes[e]}: it must be the same everywhere"
            )
    if jnp.dtype(leaf.dtype) != jnp.dtype(dtype):
        raise ValueError(f"input {name} has dtype {jnp.dtype(leaf.dtype).name}, expected {dtype}")


def _flatten(tree, value, leaves: list, where: str) -> None:
    """Append the array leaves of `value` to `leaves`, checking it has the exported structure."""
    kind = tree[0]
    if kind == "array":
        leaves.append(value)
    elif kind == "static":
        if value != tree[1]:
            raise ValueError(
                f"{where} is {value!r}, but this model was exported with {tree[1]!r} there; "
                "non-array arguments are fixed at export: export again to change it."
            )
    elif kind in ("tuple", "list"):
        if not isinstance(value, (tuple, list)) or len(value) != len(tree[1]):
            raise ValueError(f"{where} must be a {kind} of {len(tree[1])} entries as exported")
        for i, (sub, v) in enumerate(zip(tree[1], value, strict=True)):
            _flatten(sub, v, leaves, f"{where}[{i}]")
    elif kind == "dict":
        keys = [k for k, _ in tree[1]]
        if not isinstance(value, dict) or sorted(value) != sorted(keys):
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ValueError(f"{where} must be a dict with keys {sorted(keys)} as exported, got {got}")
        for k, sub in tree[1]:
            _flatten(sub, value[k], leaves, f"{where}[{k!r}]")
    else:
        raise ValueError(f"export.json: unknown tree node {kind!r}")


def _build(tree, leaves):
    """The output pytree (dicts, tuples, lists) around the flat outputs."""
    kind = tree[0]
    if kind == "array":
        return leaves[tree[1]]
    if kind == "static":
        return tree[1]
    if kind == "tuple":
        return tuple(_build(sub, leaves) for sub in tree[1])
    if kind == "list":
        return [_build(sub, leaves) for sub in tree[1]]
    if kind == "dict":
        return {k: _build(sub, leaves) for k, sub in tree[1]}
    raise ValueError(f"export.json: unknown tree node {kind!r}")
