"""The text of an exported model.py: header, imports, the runtime, and the format's program."""

from __future__ import annotations

import pathlib

import jax

_HERE = pathlib.Path(__file__).parent
_MARKER = "# ---- BODY (copied into model.py) ----\n"

_IMPORTS = """\
from __future__ import annotations

import json
import math  # noqa: F401  (used by generated source)
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from jax import lax  # noqa: F401  (used by generated source)
"""

_USAGE = '''\
"""{title}, exported by bridge.export (format="{format}", jax {jax_version}).

Runs without torch: it imports only jax, numpy, safetensors and the standard
library, and reads the files beside it (export.json, params.safetensors,
state.safetensors{artifact}).

    import importlib.util
    spec = importlib.util.spec_from_file_location("model", "<folder>/model.py")
    model = importlib.util.module_from_spec(spec); spec.loader.exec_module(model)
    params, state = model.load()                          # dicts keyed like torch's names
    out = model.apply(params, *args, rng=None, **kwargs)  # jit / grad / vmap work
    out, new_state = model.apply_with_state(params, state, *args, rng=key, **kwargs)

Shapes are those of the example inputs given to bridge.export, except the
symbolic dimensions export.json lists under dims (checked at call time);
non-array arguments are fixed at export. Out-of-range indices follow
JAX's rules (clamped), since the program carries no run-time checks.
"""
'''


def _body(name: str) -> str:
    text = (_HERE / name).read_text()
    return text[text.index(_MARKER) + len(_MARKER):]


def model_source(format: str, title: str, core: str | None) -> str:
    """model.py for `format`; `core` is the generated source of `forward` (format="source")."""
    artifact = ", model.stablehlo" if format == "stablehlo" else ""
    parts = [_USAGE.format(title=title, format=format, jax_version=jax.__version__, artifact=artifact)]
    parts.append(_IMPORTS)
    parts.append(_body("runtime.py").rstrip("\n") + "\n")
    if format == "stablehlo":
        parts.append(_body("runtime_stablehlo.py").rstrip("\n") + "\n")
    else:
        core_lines = [line for line in core.splitlines() if not line.startswith("# imports:")]
        parts.append(
            "# Arrays the program closes over that are too large to print (constants.safetensors).\n"
            "CONSTANTS = (\n"
            '    _read_weights(FOLDER / "constants.safetensors", spec()["constants"])\n'
            '    if spec()["constants"] else {}\n'
            ")\n"
        )
        parts.append("\n".join(core_lines).strip("\n") + "\n")
        parts.append(
            '\n\ndef _program():\n    if "program" not in CACHE:\n'
            '        CACHE["program"] = jax.jit(forward)  # noqa: F821  (defined above)\n'
            '    return CACHE["program"]\n'
        )
    head = "\n".join(p.strip("\n") + "\n" for p in parts[:3])  # docstring, imports, runtime
    return "\n\n".join([head.rstrip("\n") + "\n", *(p.strip("\n") + "\n" for p in parts[3:])])
