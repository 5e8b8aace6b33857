"""Load exported models without torch and check them against references saved with torch.

    python tools/check_exports.py ROOT [--block-torch] [--optax]

ROOT holds one folder per case, each written by tools/export_examples.py's
`write_case`: an exported model (bridge.export) plus `case.json` (what to check)
and `reference.npz` (inputs, torch's outputs, gradients, new state). This script
imports no torch, transformers or bridge (with --block-torch it makes them
unimportable first, so that a stray import fails), and runs in the main
environment (tests/test_export.py) and in the torch-free one (make test-torchless).

Checks per case: forward parity; `jax.grad` of a fixed projection against
torch autograd; `jax.vmap` against a Python loop; the new state; the rng
(same key, same output; another key, another output); with --optax, a few Adam
steps lower the loss. Prints one line per check and writes ROOT/results.json;
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import pathlib
import sys
import traceback

BLOCKED = ("torch", "transformers", "bridge")


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not importable here (a torch-free check)")
        return None


def load_model(folder: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"exported_{folder.name.replace('-', '_')}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(got, expected, floor: float = 1e-6) -> float:
    import numpy as np

    g, e = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert g.shape == e.shape, (g.shape, e.shape)
    return float(np.abs(g - e).max(initial=0.0) / max(np.abs(e).max(initial=0.0), floor))


def check_case(folder: pathlib.Path, use_optax: bool) -> dict[str, str]:
    """Run the checks case.json asks for; {check: "ok" or the failure}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    case = json.loads((folder / "case.json").read_text())
    ref = np.load(folder / "reference.npz")
    results: dict[str, str] = {}
    with jax.enable_x64(case["x64"]):
        model = load_model(folder)
        spec = model.spec()
        params, state = model.load()
        leaves = [jnp.asarray(ref[f"in_{i}"]) for i in range(len(spec["inputs"]["leaves"]))]
        args, kwargs = model._build(spec["inputs"]["tree"], leaves)
        key = jax.random.key(0) if spec["rng"] else None
        n_out = len(spec["outputs"]["leaves"])

        def out_leaves(p, s, a, k, rng=key):
            out, new_state = model.apply_with_state(p, s, *a, rng=rng, **k)
            return jax.tree_util.tree_leaves(out), new_state

        def run(name, fn):
            try:
                fn()
                results[name] = "ok"
            except Exception as e:  # a check's failure, reported with the others
                results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"

        def forward():
            got, _ = jax.jit(lambda p, s: out_leaves(p, s, args, kwargs))(params, state)
            assert len(got) == n_out
            for i, g in enumerate(got):
                err = rel_err(g, ref[f"out_{i}"])
                assert err <= case["rtol"], f"output {i}: relative error {err:.3g} > {case['rtol']}"

        run("forward", forward)

        if case.get("grad_rtol"):
            def loss(p, s=state, a=args, k=kwargs):
                got, _ = out_leaves(p, s, a, k)
                return sum((o * ref[f"w_{i}"]).sum() for i, o in enumerate(got) if f"w_{i}" in ref)

            def grad():
                grads = jax.jit(jax.grad(loss))(params)
                names = [n[2:] for n in ref.files if n.startswith("g/")]
                assert names, "no reference gradients"
                floor = 0.01 * max(float(np.abs(ref["g/" + n]).max()) for n in names)
                for n in names:
                    err = rel_err(grads[n], ref["g/" + n], floor)
                    assert err <= case["grad_rtol"], f"grad {n}: relative error {err:.3g} > {case['grad_rtol']}"

            run("grad", grad)

        if case.get("vmap"):
            def vmap():
                (i, x), = [(i, x) for i, x in enumerate(leaves)]  # one array input
                xs = jnp.stack([x, jnp.flip(x, 0), x])

                def one(xi):
                    a, k = model._build(spec["inputs"]["tree"], [xi])
                    return out_leaves(params, state, a, k)[0]

                batched = jax.jit(jax.vmap(one))(xs)
                for b in range(xs.shape[0]):
                    for got, exp in zip(batched, one(xs[b]), strict=True):
                        err = rel_err(got[b], exp)
                        assert err <= 1e-5, f"example {b}: vmap vs loop relative error {err:.3g}"

            run("vmap", vmap)

        if any(n.startswith("ns/") for n in ref.files):
            def new_state():
                _, ns = jax.jit(lambda p, s: out_leaves(p, s, args, kwargs))(params, state)
                for n in [n[3:] for n in ref.files if n.startswith("ns/")]:
                    err = rel_err(ns[n], ref["ns/" + n])
                    assert err <= 1e-5, f"new_state {n}: relative error {err:.3g}"
                assert set(ns) == set(state)

            run("new_state", new_state)

        if spec["rng"]:
            def rng():
                f = jax.jit(lambda r: out_leaves(params, state, args, kwargs, r)[0])
                a, b, c = f(jax.random.key(7)), f(jax.random.key(7)), f(jax.random.key(8))
                assert all(bool((x == y).all()) for x, y in zip(a, b, strict=True)), "same key, other output"
                assert not all(bool((x == y).all()) for x, y in zip(a, c, strict=True)), "other key, same output"

            run("rng", rng)

        if use_optax and case.get("optax"):
            run("optax", lambda: _optax_steps(model, params, state, args, kwargs, key, ref))
    return results


def _optax_steps(model, params, state, args, kwargs, key, ref) -> None:
    """Three Adam steps on a fixed projection of the outputs lower it."""
    import jax
    import optax

    def loss(p):
        out, _ = model.apply_with_state(p, state, *args, rng=key, **kwargs)
        return sum((o * ref[f"w_{i}"]).mean() for i, o in enumerate(jax.tree_util.tree_leaves(out)) if f"w_{i}" in ref)

    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    values = []
    for _ in range(3):
        value, grads = value_and_grad(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        values.append(value)
    first = values[0]
    last = loss(params)
    assert last < first, f"loss did not decrease: {float(first)} -> {float(last)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=pathlib.Path)
    parser.add_argument("--block-torch", action="store_true", help="make torch, transformers, bridge unimportable")
    parser.add_argument("--optax", action="store_true", help="also take Adam steps (needs optax)")
    opts = parser.parse_args(argv)
    if opts.block_torch:
        sys.meta_path.insert(0, _Refuse())
    try:
        import torch  # noqa: F401
    except ImportError:
        torch_importable = False
    else:
        torch_importable = True
    results = {"torch_importable": torch_importable, "cases": {}}
    failed = 0
    for folder in sorted(p.parent for p in opts.root.glob("*/case.json")):
        res = results["cases"][folder.name] = check_case(folder, opts.optax)
        for check, outcome in res.items():
            print(f"{'PASS' if outcome == 'ok' else 'FAIL'} {folder.name} {check}" + ("" if outcome == "ok" else f": {outcome}"))
            failed += outcome != "ok"
    (opts.root / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"torch importable: {torch_importable}")
    print(f"{sum(len(r) for r in results['cases'].values()) - failed} passed, {failed} failed")
    return 1 if failed or torch_importable else 0


if __name__ == "__main__":
    sys.exit(main())
