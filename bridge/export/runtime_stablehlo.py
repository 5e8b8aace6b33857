"""The stablehlo format's part of model.py: `_program()` from the serialized jax.export artifact.

Copied (below the BODY marker) into model.py after bridge/export/runtime.py's body.

A deserialized `jax.export.Exported` supports `jax.grad` (its VJP was
serialized with it) but has no batching rule, so `jax.vmap` of `exported.call`
fails. The flat program here is therefore a `jax.custom_vjp` whose forward and
backward each call an exported program through `_looped`, a
`jax.custom_batching.custom_vmap` that maps the unbatched program over the
batch with `lax.map` (a loop inside one compiled program): `jax.vmap`,
`jax.grad` and `jax.vmap(jax.grad(...))` all work, and a vmapped call computes
what a Python loop over the examples computes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax import lax

from bridge.export.runtime import CACHE, FOLDER

# ---- BODY (copied into model.py) ----


def exported():
    """The deserialized `jax.export.Exported` of the flat program (model.stablehlo)."""
    if "exported" not in CACHE:
        CACHE["exported"] = jax.export.deserialize(bytearray((FOLDER / "model.stablehlo").read_bytes()))
    return CACHE["exported"]


def _looped(fn):
    """`fn` with a vmap rule that loops over the batch (lax.map); float0 arguments stay unbatched."""

    @jax.custom_batching.custom_vmap
    def call(*args):
        return tuple(fn(*args))

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        batched = [i for i, b in enumerate(in_batched) if b]

        def one(xs):
            full = list(args)
            for i, x in zip(batched, xs, strict=True):
                full[i] = x
            return call(*full)

        outs = lax.map(one, [args[i] for i in batched])
        return outs, tuple(True for _ in outs)

    return call


def _program():
    if "program" not in CACHE:
        exp = exported()
        primal = _looped(exp.call)
        vjp = _looped(exp.vjp().call)
        ct_avals = exp.vjp().in_avals[len(exp.in_avals):]

        @jax.custom_vjp
        def program(*flat):
            return primal(*flat)

        def fwd(*flat):
            return primal(*flat), flat

        def bwd(flat, cts):
            # integer outputs' cotangents: the exported VJP takes them as float0 zeros
            cts = [np.zeros(a.shape, jax.dtypes.float0) if a.dtype == jax.dtypes.float0 else ct
                   for ct, a in zip(cts, ct_avals, strict=True)]
            return tuple(vjp(*flat, *cts))

        program.defvjp(fwd, bwd)
        CACHE["program"] = jax.jit(program)
    return CACHE["program"]
