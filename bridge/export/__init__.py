"""bridge.export: a torch model written out so that it runs without torch.

    bridge.export(module, *example_args, path="port/", format="stablehlo", **example_kwargs)
    bridge.export(module, x, path="port/", dynamic_shapes={"x": {0: torch.export.Dim("batch")}})

writes a folder:

    params.safetensors   parameters, keyed like module.named_parameters()
    state.safetensors    buffers, keyed like module.named_buffers()
    export.json          format, input/output structure, shapes and dtypes (a symbolic dimension
                         by name; `dims`: their ranges), rng, state updates, the jax version
                         that wrote it and the compatibility note
    model.py             load(folder) -> (params, state); apply(params, *args, rng=None, **kwargs);
                         apply_with_state(params, state, *args, rng=None, **kwargs) -> (out, new_state);
                         imports only jax, numpy, safetensors and the standard library
    model.stablehlo      format="stablehlo": the serialized jax.export program (with its VJP)

The program comes from the one translator: the module is converted with
`torch_to_jax_with_state` (a function with `torch_to_jax`), with `strict=True`
and `checks=False`, and traced once at the example inputs (with symbolic dimensions
where `dynamic_shapes` asks for them). See docs/export.md.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax

from bridge.export import flat, weights
from bridge.export.model_py import model_source

__all__ = ["FORMATS", "export"]

FORMATS = ("source", "stablehlo")

COMPATIBILITY = (
    "model.stablehlo is a jax.export artifact. jax.export guarantees that an artifact can be "
    "compiled and run by a JAX (jaxlib) up to 6 months newer than the one that exported it "
    "(6 months backward compatibility) and up to 3 weeks older (3 weeks forward "
    "compatibility); what matters is when the jaxlib releases were built. Outside that "
    "window, export again from torch (or use format='source')."
)


def export(
    module_or_fn: Any,
    *example_args: Any,
    path: str | pathlib.Path,
    format: str = "source",
    dynamic_shapes: Any = None,
    **example_kwargs: Any,
) -> pathlib.Path:
    """Export a torch module or function as a folder that runs without torch; returns the folder.

    Args:
        module_or_fn: an `nn.Module` (in the mode to export: `.eval()` or `.train()`) or a
            function of torch tensors.
        example_args, example_kwargs: example inputs (torch tensors, or pytrees of them,
            and static values such as flags). The program has their dtypes, and their
            shapes except where `dynamic_shapes` makes a dimension symbolic.
        path: the folder to write (created if needed; files in it are overwritten).
        format: "stablehlo" (a serialized jax.export program plus a loader) or "source"
            (readable JAX source).
        dynamic_shapes: torch.export's spec of symbolic dimensions, keyed like the
            arguments of forward (a dict by name, or a tuple over the arguments), e.g.
            `{"x": {0: Dim("batch")}}` or `{"input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"}}`; a dim is a `torch.export.Dim` (its
            min/max kept as the range), `Dim.AUTO`/`Dim.DYNAMIC`, or a name. Those dimensions
            are symbolic in the program (one model serves every batch size or sequence
            length): the source reads them from its inputs' shapes, the StableHLO artifact
            has them as `jax.export` symbols. An op that cannot follow a symbolic size is an
            error at export that names it. None: every shape is the example's, checked at
            call time. See bridge/export/dynamic.py and docs/export.md.

    Exporting the same model twice writes identical bytes.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    program = flat.build(module_or_fn, example_args, example_kwargs, dynamic_shapes)
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "params.safetensors": weights.serialize(program.param_tensors, program.params),
        "state.safetensors": weights.serialize(program.state_tensors, program.state),
    }
    if format == "stablehlo":
        from bridge.export import stablehlo

        files["model.stablehlo"] = stablehlo.serialize(program)
        core = None
    else:
        from bridge.export import source

        constants: dict = {}
        core = source.emit_function(
            program.fn, program.example, name="forward", arg_names=program.arg_names,
            comments=program.comments, constants=constants,
        )
        if constants:  # tables a lowering computed with NumPy, too large to print
            files["constants.safetensors"] = weights.serialize_arrays(constants)
    title = _title(module_or_fn)
    files["export.json"] = _spec_json(program, format, title, constants if core else {})
    files["model.py"] = model_source(format, title, core).encode()
    for name, data in sorted(files.items()):
        (folder / name).write_bytes(data)
    return folder


def _title(module_or_fn: Any) -> str:
    cls = module_or_fn if callable(module_or_fn) and not hasattr(module_or_fn, "forward") else type(module_or_fn)
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', getattr(cls, '__name__', '?'))}"


def _spec_json(program: flat.FlatProgram, format: str, title: str, constants: dict) -> bytes:
    spec = {
        "format": format,
        "exported_from": title,
        "jax_version": jax.__version__,
        "x64": bool(jax.config.jax_enable_x64),
        "compatibility": COMPATIBILITY if format == "stablehlo" else (
            "model.py is plain JAX source: it runs on any JAX that has the functions it calls."
        ),
        "platforms": list(_platforms(format)),
        "params": program.params,
        "state": program.state,
        "rng": program.rng,
        "state_updates": program.state_updates,
        "inputs": program.inputs,
        "dims": program.dims,
        "outputs": program.outputs,
        "flat_inputs": program.arg_names,
        "constants": [[k, list(v.shape), str(v.dtype)] for k, v in constants.items()],
    }
    return (json.dumps(spec, indent=1, sort_keys=True) + "\n").encode()


def _platforms(format: str) -> tuple[str, ...]:
    if format != "stablehlo":
        return ()
    from bridge.export.stablehlo import PLATFORMS

    return PLATFORMS
