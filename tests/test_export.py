"""bridge.export(format="stablehlo"), loaded and run where torch cannot be imported.

The parent exports each case (tools/export_examples.py's `write_case`: the model,
its inputs, torch eager's outputs, torch autograd's gradients of a fixed random
projection of the outputs, torch_to_jax_with_state's new state), then ONE
subprocess (tools/check_exports.py --block-torch: a meta-path finder that refuses
torch, transformers and bridge) loads every exported model.py and checks:
forward parity (relative 1e-4 in float32), jax.grad against torch autograd
(float64 on both sides for the torch.nn layers, 1e-9; 1e-3 in float32 for GPT-2
and ResNet, whose inputs are checked away from kinks), jax.vmap against a loop,
train-mode BatchNorm's new state, dropout drawing from the key.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("flatbuffers")  # jax.export serialization
import torch  # noqa: E402
from numerics import assert_away_from_kinks  # noqa: E402
from test_nn_layers import CASES  # noqa: E402
from torch.export import Dim  # noqa: E402

import bridge  # noqa: E402
from bridge.export import export  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from export_examples import write_case  # noqa: E402

# torch.nn layer cases (tests/test_nn_layers.py) exported here: one of each kind of layer.
LAYERS = ["mlp", "conv2d-groups-dilation", "conv-transpose1d", "batchnorm-eval", "embedding", "lstm",
          "multihead-attention", "pooling", "sdpa-causal"]


SOURCE_LAYERS = ["mlp", "lstm", "embedding", "sdpa-float-mask"]  # the mask: a constant table

# dynamic_shapes: exported once with a symbolic batch, checked at the example's batch and at
# another one (the input shape given here), in both formats; GPT-2 with symbolic batch and length
DYNAMIC_LAYERS = {"mlp": (7, 6), "conv2d-groups-dilation": (3, 4, 9, 9)}
DYNAMIC_FORMATS = {"stablehlo": "dyn-", "source": "source-dyn-"}


def _write_dynamic_cases(root, gpt2):
    for format, prefix in DYNAMIC_FORMATS.items():
        for name, other in DYNAMIC_LAYERS.items():
            module, x = _layer(name)
            first = root / f"{prefix}{name}"
            write_case(first, module, (x,), x64=True, grad_rtol=1e-9, vmap=True, format=format,
                       dynamic_shapes=({0: Dim("batch")},))
            torch.manual_seed(1)
            write_case(root / f"{prefix}{name}-b{other[0]}", module, (torch.randn(*other),), x64=True,
                       grad_rtol=1e-9, exported=first)
        g = torch.Generator().manual_seed(3)
        ids, mask = torch.randint(3, 90, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.long)
        mask[1, -2:] = 0
        first = root / f"{prefix}gpt2"
        bs = {0: Dim("batch"), 1: Dim("seq", max=64)}  # the config's max_position_embeddings
        # gradients at the other size only (the static "gpt2" case checks them at this one)
        write_case(first, gpt2, kwargs={**GPT2_INPUTS, "use_cache": False}, grad_rtol=None, format=format,
                   dynamic_shapes={"input_ids": bs, "attention_mask": bs})
        write_case(root / f"{prefix}gpt2-3x5", gpt2, kwargs={"input_ids": ids, "attention_mask": mask,
                   "use_cache": False}, grad_rtol=1e-3, exported=first)


def _layer(name):
    make_module, make_input = CASES[name]
    torch.manual_seed(0)
    return make_module(), make_input()


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Export every case, then check them all in one torch-free subprocess."""
    import models

    root = tmp_path_factory.mktemp("exports")
    for name in LAYERS:
        module, x = _layer(name)
        assert_away_from_kinks(module, x)
        write_case(root / f"{name}-f32", module, (x,), grad_rtol=None, vmap=True)
        write_case(root / f"{name}-f64", module, (x,), x64=True, grad_rtol=1e-9)
    gpt2, inputs = models.build("gpt2")
    GPT2_INPUTS.update(inputs)
    write_case(root / "gpt2", gpt2, kwargs={**inputs, "use_cache": False}, grad_rtol=1e-3)
    resnet, inputs = models.build("resnet")
    write_case(root / "resnet", resnet, kwargs=inputs, grad_rtol=1e-3, kink_check=assert_away_from_kinks)
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 1), torch.nn.BatchNorm1d(4), torch.nn.Tanh()).train()
    write_case(root / "batchnorm-train", bn, (torch.randn(5, 3, 7),), x64=True, grad_rtol=1e-9)
    drop = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)).train()
    write_case(root / "dropout", drop, (torch.randn(4, 6),), rng=True, vmap=True)
    # format="source": readable JAX source, the same checks
    for name in SOURCE_LAYERS:
        module, x = _layer(name)
        write_case(root / f"source-{name}-f32", module, (x,), grad_rtol=None, vmap=True, format="source")
        write_case(root / f"source-{name}-f64", module, (x,), x64=True, grad_rtol=1e-9, format="source")
    write_case(root / "source-gpt2", gpt2, kwargs={**models.build("gpt2")[1], "use_cache": False},
               grad_rtol=1e-3, format="source")
    write_case(root / "source-batchnorm-train", bn, (torch.randn(5, 3, 7),), x64=True, grad_rtol=1e-9,
               format="source")
    write_case(root / "source-dropout", drop, (torch.randn(4, 6),), rng=True, vmap=True, format="source")
    _write_dynamic_cases(root, gpt2)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_exports.py"), str(root), "--block-torch"],
        capture_output=True, text=True, timeout=600,
    )
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else None
    assert results is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, results


EXPECTED = {f"{n}-f32": {"forward", "vmap"} for n in LAYERS}
EXPECTED |= {f"{n}-f64": {"forward", "grad"} for n in LAYERS}
EXPECTED |= {"gpt2": {"forward", "grad"}, "resnet": {"forward", "grad"},
             "batchnorm-train": {"forward", "grad", "new_state"}, "dropout": {"forward", "rng", "vmap"}}
EXPECTED |= {f"source-{k}": v for k, v in EXPECTED.items()
             if k.rsplit("-", 1)[0] in SOURCE_LAYERS or k in ("gpt2", "batchnorm-train", "dropout")}
EXPECTED |= {f"{prefix}{name}": {"forward", "grad", "vmap"} for prefix in DYNAMIC_FORMATS.values()
             for name in DYNAMIC_LAYERS}
EXPECTED |= {f"{prefix}{name}-b{other[0]}": {"forward", "grad"} for prefix in DYNAMIC_FORMATS.values()
             for name, other in DYNAMIC_LAYERS.items()}
EXPECTED |= {f"{prefix}gpt2": {"forward"} for prefix in DYNAMIC_FORMATS.values()}
EXPECTED |= {f"{prefix}gpt2-3x5": {"forward", "grad"} for prefix in DYNAMIC_FORMATS.values()}
GPT2_INPUTS: dict = {}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_exported_model_runs_without_torch(checked, case):
    _, results = checked
    assert results["torch_importable"] is False
    got = results["cases"][case]
    assert set(got) == EXPECTED[case], sorted(got)
    failures = {k: v for k, v in got.items() if v != "ok"}
    assert not failures, failures


@pytest.mark.parametrize("format", ["stablehlo", "source"])
def test_export_writes_the_folder_and_identical_bytes_twice(tmp_path, format):
    module, x = _layer("batchnorm-eval")
    for folder in ("a", "b"):
        export(module, x, path=tmp_path / folder, format=format)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    program = ["model.stablehlo"] if format == "stablehlo" else []
    assert files == sorted(["export.json", "model.py", "params.safetensors", "state.safetensors", *program])
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    spec = json.loads((tmp_path / "a" / "export.json").read_text())
    assert [p[0] for p in spec["params"]] == [n for n, _ in module.named_parameters()]
    assert [b[0] for b in spec["state"]] == [n for n, _ in module.named_buffers()]
    assert spec["rng"] is None and spec["state_updates"] == [] and spec["format"] == format
    assert "6 months" in spec["compatibility"] or format == "source"
    from safetensors.torch import load_file

    params = load_file(tmp_path / "a" / "params.safetensors")
    for n, p in module.named_parameters():
        assert torch.equal(params[n], p)
    ruff = ROOT / ".venv" / "bin" / "ruff"
    if ruff.exists():  # the generated model.py passes the project's lint
        proc = subprocess.run([str(ruff), "check", "--config", str(ROOT / "pyproject.toml"), str(tmp_path / "a" / "model.py")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_exported_program_names_a_wrong_shape(tmp_path, monkeypatch):
    module, x = _layer("mlp")
    export(module, x, path=tmp_path, format="stablehlo")
    spec = importlib.util.spec_from_file_location("exported_mlp", tmp_path / "model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    params, _ = model.load()
    with pytest.raises(ValueError, match=r"input arg0 has shape \(5, 6\), but this model was exported for \(4, 6\)"):
        model.apply(params, bridge.to_jax(torch.randn(5, 6)))
    with pytest.raises(ValueError, match=r"params do not match the exported model: missing \['0.bias'\]"):
        model.apply({k: v for k, v in params.items() if k != "0.bias"}, bridge.to_jax(x))


def test_unknown_formats_are_refused(tmp_path):
    module, x = _layer("mlp")
    with pytest.raises(ValueError, match="format must be one of"):
        export(module, x, path=tmp_path, format="onnx")


def _load(folder, name):
    spec = importlib.util.spec_from_file_location(name, folder / "model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    return model


@pytest.mark.parametrize("format", ["stablehlo", "source"])
def test_dynamic_export_takes_symbolic_sizes_and_checks_them_at_call_time(tmp_path, format):
    """Two inputs share the symbolic batch; its range and equality are checked with clear errors."""
    torch.manual_seed(0)
    module = torch.nn.Bilinear(3, 4, 2)  # aten._trilinear: broadcasting decided on symbolic sizes
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    batch = Dim("batch", max=16)
    export(module, x, y, path=tmp_path, format=format, dynamic_shapes={"input1": {0: batch}, "input2": {0: batch}})
    spec = json.loads((tmp_path / "export.json").read_text())
    assert spec["inputs"]["leaves"] == [[["batch", 3], "float32"], [["batch", 4], "float32"]]
    assert spec["outputs"]["leaves"] == [[["batch", 2], "float32"]]
    assert spec["dims"] == {"batch": [0, 16]}
    model = _load(tmp_path, f"exported_bilinear_{format}")
    params, _ = model.load()
    for n in (1, 2, 9, 16):
        a, b = torch.randn(n, 3), torch.randn(n, 4)
        got = model.apply(params, bridge.to_jax(a), bridge.to_jax(b))
        torch.testing.assert_close(torch.from_numpy(np.array(got)), module(a, b).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"input arg1 has size 6 in dimension 0, the symbolic dimension 'batch', "
                                         r"which another input gives size 5"):
        model.apply(params, bridge.to_jax(torch.randn(5, 3)), bridge.to_jax(torch.randn(6, 4)))
    with pytest.raises(ValueError, match=r"size 17 in dimension 0, the symbolic dimension 'batch', which was "
                                         r"exported for sizes in \[1, 16\]"):
        model.apply(params, bridge.to_jax(torch.randn(17, 3)), bridge.to_jax(torch.randn(17, 4)))
    with pytest.raises(ValueError, match=r"input arg0 has shape \(5, 2\), but this model was exported for \(batch, 3\)"):
        model.apply(params, bridge.to_jax(torch.randn(5, 2)), bridge.to_jax(torch.randn(5, 4)))


class _SizeArithmetic(torch.nn.Module):
    def forward(self, x):
        return x / x.numel() + x.stride(0) + x.shape[0]  # sym_numel, sym_stride, sym_size as values


@pytest.mark.parametrize("format", ["stablehlo", "source"])
def test_dynamic_export_computes_with_the_sizes_of_its_inputs(tmp_path, format):
    export(_SizeArithmetic(), torch.randn(4, 3), path=tmp_path, format=format, dynamic_shapes={"x": {0: Dim("b")}})
    model = _load(tmp_path, f"exported_sizes_{format}")
    params, _ = model.load()
    for n in (2, 7):
        x = torch.randn(n, 3)
        got = torch.from_numpy(np.array(model.apply(params, bridge.to_jax(x))))
        torch.testing.assert_close(got, _SizeArithmetic()(x), rtol=1e-6, atol=0)


def _cat_softmax(a, b):
    return torch.cat([a, b], dim=0).softmax(-1)


@pytest.mark.parametrize("format", ["stablehlo", "source"])
def test_dynamic_export_of_a_function_with_two_symbols(tmp_path, format):
    """A size that is an expression (m + n after the cat) reaches softmax's custom_jvp helper, which
    the source reads from its argument's shape."""
    export(_cat_softmax, torch.randn(3, 4), torch.randn(5, 4), path=tmp_path, format=format,
           dynamic_shapes={"a": {0: "n"}, "b": {0: "m"}})
    model = _load(tmp_path, f"exported_cat_softmax_{format}")
    params, _ = model.load()
    for n, m in ((2, 9), (6, 1)):
        a, b = torch.randn(n, 4), torch.randn(m, 4)
        got = torch.from_numpy(np.array(model.apply(params, bridge.to_jax(a), bridge.to_jax(b))))
        torch.testing.assert_close(got, _cat_softmax(a, b), rtol=1e-6, atol=1e-7)


def test_dynamic_shapes_specs_that_cannot_work_are_refused(tmp_path):
    module, x = _layer("mlp")
    with pytest.raises(ValueError, match=r"dynamic_shapes names \['x'\], which are not arguments .* \['input'\]"):
        export(module, x, path=tmp_path, dynamic_shapes={"x": {0: "batch"}})
    with pytest.raises(ValueError, match=r"dimension 0 of input arg0 \('batch'\) has size 1 .* size 2 or more"):
        export(module, x[:1], path=tmp_path, dynamic_shapes=({0: "batch"},))
    with pytest.raises(NotImplementedError, match="derived dimension"):
        export(module, x, path=tmp_path, dynamic_shapes=({0: 2 * Dim("half")},))
    with pytest.raises(ValueError, match="outside its range"):
        export(module, x, path=tmp_path, dynamic_shapes=({0: Dim("batch", min=8)},))


class _Upsample(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="linear")


class _Strided(torch.nn.Module):
    def forward(self, x):
        return torch.as_strided(x, (2, 2), (1, 2))


class _FixedRows(torch.nn.Module):
    def forward(self, x):
        return x.reshape(4, -1)


def test_dynamic_export_refuses_what_cannot_follow_a_symbolic_size(tmp_path):
    """An op whose lowering needs the concrete size, and torch code that needs one, are errors
    at export, never a program right only at the example's size."""
    from bridge.symbolic import SymbolicShapeError

    x = torch.randn(2, 3, 8)
    with pytest.raises(SymbolicShapeError, match=r"aten.upsample_linear1d.vec .* cannot be traced with symbolic"):
        export(_Upsample(), x, path=tmp_path, dynamic_shapes={"x": {2: Dim("n")}})
    with pytest.raises(SymbolicShapeError, match=r"aten.as_strided.default .* reads the example value of a "
                                                 r"symbolic size \(torch recorded the guard Eq\(n, 8\)\)"):
        export(_Strided(), x, path=tmp_path, dynamic_shapes={"x": {2: Dim("n")}})
    with pytest.raises(bridge.CaptureError, match=r"Constraints violated \(n\)(.|\n)*L\['tensors'\]\[0\] is input arg0"):
        export(_FixedRows(), x, path=tmp_path, dynamic_shapes={"x": {2: Dim("n")}})


@pytest.mark.slow
def test_port_to_jax_example():
    """examples/port_to_jax.py: export GPT-2 and a ResNet, then parity, optax and generation without torch."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "port_to_jax.py")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torch cannot be imported here" in proc.stdout and "greedy tokens" in proc.stdout
