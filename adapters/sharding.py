"""Place a `torch_to_jax` params dict on a device mesh, by parameter name.

    mesh = jax.make_mesh((8,), ("data",))
    rules = [
        (r"\\.weight$", P("data", None)),    # FSDP: shard weights' first dim
        (r"\\.bias$", P()),                  # replicate biases
    ]
    params = shard_params(params, mesh, rules)
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    step = jax.jit(train_step)              # XLA partitions it to follow the data

Rules are `(regex, PartitionSpec)` pairs tried in order with `re.search`
against the names of `module.named_parameters()`; the first that matches
wins. Names no rule matches get `default` (replicated, `P()`), or raise when
`default=None`, so a model whose parameters must all be sharded never
silently replicates one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["param_shardings", "shard_params"]

Rules = Sequence[tuple[str, PartitionSpec]]
REPLICATED = PartitionSpec()  # the default spec: a full copy on every device


def param_shardings(
    params: Mapping[str, Any],
    mesh: Mesh,
    rules: Rules,
    *,
    default: PartitionSpec | None = REPLICATED,
) -> dict[str, NamedSharding]:
    """The `NamedSharding` of every parameter, by the first rule its name matches.

    Args:
        params: a dict of arrays (or anything with `.shape`) keyed like
            `module.named_parameters()`, e.g. the params of `bridge.torch_to_jax`.
        mesh: the device mesh the specs' axis names refer to.
        rules: `(regex, PartitionSpec)` pairs, tried in order with `re.search`.
        default: the spec of parameters no rule matches; None makes an
            unmatched parameter an error.

    Returns:
        A dict with the same keys, usable as `jax.jit`'s in/out shardings.

    Raises:
        ValueError: a parameter no rule matches (with `default=None`), a spec
            with more entries than the parameter has dimensions, an axis
            name the mesh does not have, or a dimension the mesh axes do not
            divide evenly.
    """
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[1], PartitionSpec)):
            raise TypeError(
                f"rule #{i} is {rule!r}; each rule is a (regex, PartitionSpec) pair, "
                "e.g. (r'\\.weight$', PartitionSpec('data', None))."
            )
        compiled.append((re.compile(rule[0]), rule[1]))
    out: dict[str, NamedSharding] = {}
    unmatched = []
    for name, value in params.items():
        spec = next((s for pattern, s in compiled if pattern.search(name)), None)
        if spec is None:
            if default is None:
                unmatched.append(name)
                continue
            spec = default
        _check_spec(name, tuple(value.shape), spec, mesh)
        out[name] = NamedSharding(mesh, spec)
    if unmatched:
        raise ValueError(
            f"no sharding rule matches the parameter(s) {unmatched} and default=None requires "
            f"one; rules tried: {[r[0] for r in rules]}. Add a rule for them (PartitionSpec() "
            "replicates) or pass a default."
        )
    return out


def shard_params(
    params: Mapping[str, Any],
    mesh: Mesh,
    rules: Rules,
    *,
    default: PartitionSpec | None = REPLICATED,
) -> dict[str, jax.Array]:
    """Place every parameter on `mesh` as the first matching rule says.

    Same arguments and errors as `param_shardings`; returns the params dict
    with each array put (`jax.device_put`) onto its `NamedSharding`. On a mesh
    that spans several processes (`jax.distributed`), every process calls it
    with the same values and places the shards of its own devices.
    """
    shardings = param_shardings(params, mesh, rules, default=default)
    return {name: _put(params[name], shardings[name]) for name in params}


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    # A mesh over several processes (jax.distributed): device_put refuses an array
    # committed to one local device (as torch_to_jax's params are), so each process
    # places its own shards from a host copy; every process must hold the same value.
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _check_spec(name: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(
            f"parameter '{name}' has shape {shape} ({len(shape)} dims) but its PartitionSpec "
            f"{spec} has {len(spec)} entries; give at most one entry per dimension."
        )
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"parameter '{name}': PartitionSpec {spec} names mesh axis {missing[0]!r}, but "
                f"the mesh has axes {tuple(mesh.shape)}."
            )
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % size:
            raise ValueError(
                f"parameter '{name}' of shape {shape}: dimension {dim} (size {shape[dim]}) is "
                f"not divisible by mesh axis {'*'.join(axes)} (size {size}) in PartitionSpec "
                f"{spec}. Shard another dimension, use a mesh axis that divides it, or "
                "replicate it (None)."
            )
