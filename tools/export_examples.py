"""Export example models with bridge.export, with torch references for a torch-free check.

    python tools/export_examples.py ROOT        # in .venv (torch, transformers, bridge)
    python tools/check_exports.py ROOT --optax  # anywhere with jax, numpy, safetensors (optax)

`make test-torchless` runs the first in .venv and the second in .venv-torchless,
which has no torch at all. `write_case` is also what tests/test_export.py uses.
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil
import sys
from collections.abc import Callable

import jax
import numpy as np
import torch

import bridge
from bridge.export import export

ROOT = pathlib.Path(__file__).resolve().parents[1]


def torch_leaves(out) -> list[torch.Tensor]:
    """A torch output's tensors in the order of the exported outputs (dicts and ModelOutputs by key)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in torch_leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in torch_leaves(v)]
    return []


def _input_leaves(tree, value, out: list) -> None:
    kind = tree[0]
    if kind == "array":
        out.append(value)
    elif kind in ("tuple", "list"):
        for sub, v in zip(tree[1], value, strict=True):
            _input_leaves(sub, v, out)
    elif kind == "dict":
        for k, sub in tree[1]:
            _input_leaves(sub, value[k], out)


def _as_jax(tree):
    return bridge.to_jax(tree)


def write_case(
    folder: pathlib.Path,
    module: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    grad_rtol: float | None = 1e-3,
    vmap: bool = False,
    rng: bool = False,
    x64: bool = False,
    optax: bool = False,
    kink_check: Callable | None = None,
    format: str = "stablehlo",
    dynamic_shapes=None,
    exported: pathlib.Path | None = None,
) -> dict:
    """Export `module` into `folder` and save what tools/check_exports.py compares against.

    Outputs: torch eager (or, when the module draws random numbers, the bridge's own
    `apply` with `jax.random.key(0)`). Gradients of a fixed random projection of the
    outputs: torch autograd, in float64 when `x64` (module and inputs converted to
    float64, JAX's x64 mode on for the export). New state: `torch_to_jax_with_state`'s.

    `dynamic_shapes` is passed to export. With `exported` (a folder written by an earlier
    `write_case`), nothing is exported: that folder's export is copied, and the references
    are for this call's inputs (one export with symbolic dimensions, checked at another size).
    """
    kwargs = dict(kwargs or {})
    if x64:
        module = copy.deepcopy(module).double()
        args, kwargs = _double((args, kwargs))
    x64_ctx = jax.enable_x64(x64)
    with x64_ctx:
        if exported is not None:
            shutil.copytree(exported, folder, ignore=shutil.ignore_patterns("case.json", "reference.npz"))
        else:
            export(module, *args, path=folder, format=format, dynamic_shapes=dynamic_shapes, **kwargs)
        spec = json.loads((folder / "export.json").read_text())
        ref: dict[str, np.ndarray] = {}
        leaves: list = []
        _input_leaves(spec["inputs"]["tree"], (list(args), kwargs), leaves)
        for i, (leaf, (_, dtype)) in enumerate(zip(leaves, spec["inputs"]["leaves"], strict=True)):
            ref[f"in_{i}"] = leaf.detach().numpy().astype(dtype)
        if rng or spec["state_updates"]:
            apply, params, state = bridge.torch_to_jax_with_state(module)
            out, new_state = apply(params, state, *_as_jax(args), rng=jax.random.key(0), **_as_jax(kwargs))
            for n in spec["state_updates"]:
                ref["ns/" + n] = np.asarray(new_state[n])
        if rng:
            expected = [np.asarray(x) for x in jax.tree_util.tree_leaves(out)]
        else:
            with torch.no_grad():
                expected = [t.numpy() for t in torch_leaves(copy.deepcopy(module)(*args, **kwargs))]
        gen = np.random.default_rng(0)
        ws = [gen.standard_normal(e.shape).astype(e.dtype) if np.issubdtype(e.dtype, np.floating) else None
              for e in expected]
        for i, (e, w) in enumerate(zip(expected, ws, strict=True)):
            ref[f"out_{i}"] = e
            if w is not None:
                ref[f"w_{i}"] = w
        if grad_rtol is not None and not rng:
            if kink_check is not None:
                kink_check(module, *args, **kwargs)
            m = copy.deepcopy(module)
            outs = torch_leaves(m(*args, **kwargs))
            sum((o * torch.from_numpy(w)).sum() for o, w in zip(outs, ws, strict=True) if w is not None).backward()
            for n, p in m.named_parameters():
                if p.grad is not None:
                    ref["g/" + n] = p.grad.numpy()
    np.savez(folder / "reference.npz", **ref)
    case = {"x64": x64, "rtol": 1e-9 if x64 else 1e-4, "grad_rtol": None if rng else grad_rtol,
            "vmap": vmap, "optax": optax}
    (folder / "case.json").write_text(json.dumps(case, indent=1, sort_keys=True))
    return case


def _double(tree):
    import torch.utils._pytree as torch_pytree

    return torch_pytree.tree_map(
        lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


def export_examples(root: pathlib.Path) -> list[str]:
    """GPT-2 and a ResNet (small random-init transformers models), train-mode BatchNorm, dropout."""
    sys.path.insert(0, str(ROOT / "tests"))
    import models
    from numerics import assert_away_from_kinks

    written = []
    gpt2, gpt2_inputs = models.build("gpt2")
    resnet, inputs = models.build("resnet")
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 1), torch.nn.BatchNorm1d(4), torch.nn.Tanh()).train()
    bn_input = torch.randn(5, 3, 7)
    for format, prefix in (("stablehlo", ""), ("source", "source-")):  # both formats run without torch
        write_case(root / f"{prefix}gpt2", gpt2, kwargs={**gpt2_inputs, "use_cache": False}, optax=True,
                   format=format)
        write_case(root / f"{prefix}batchnorm-train", bn, (bn_input,), x64=True, grad_rtol=1e-9,
                   optax=True, format=format)
        written += [f"{prefix}gpt2", f"{prefix}batchnorm-train"]
    write_case(root / "resnet", resnet, kwargs=inputs, optax=True, kink_check=assert_away_from_kinks)
    written.append("resnet")
    drop = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)).train()
    write_case(root / "dropout", drop, (torch.randn(4, 6),), rng=True, optax=True)
    written.append("dropout")
    return written


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    for name in export_examples(out):
        print(f"exported {name} to {out / name}")
