"""format="stablehlo": the flat program as a serialized `jax.export` artifact, plus its model.py.

The artifact is `jax.export.export(jax.jit(flat))(...)` serialized with its
first-order VJP (`vjp_order=1`), so `jax.grad` works after
`jax.export.deserialize`. params, state and the rng key's data are explicit
inputs; the updated buffers are outputs (see bridge/export/flat.py).
"""

from __future__ import annotations

import jax

from bridge.export.flat import FlatProgram

#: Platforms the artifact is lowered for; jax.export checks the platform at call time.
PLATFORMS = ("cpu", "cuda", "tpu")


def serialize(program: FlatProgram) -> bytes:
    exported = jax.export.export(jax.jit(program.fn), platforms=PLATFORMS)(*program.example)
    return bytes(exported.serialize(vjp_order=1))
