"""Run PyTorch's OpInfo samples through bridge.torch_to_jax and compare with torch.

Used by tests/test_opinfo.py and by hand while writing lowerings:

    .venv/bin/python tests/opinfo_harness.py add mul --grad     # per-sample report

Each sample becomes a torch function of its tensor leaves (everything else is
baked in as a static value), translated with `torch_to_jax(strict=True)`, run
under `jax.jit`, and compared with torch eager. With `grad=True` the VJP of
every floating output (random cotangent) against every floating input is
compared with `torch.autograd.grad`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import torch
import torch.utils._pytree as torch_pytree

import bridge

warnings.filterwarnings("ignore", message="`isinstance\\(treespec, LeafSpec\\)`")

# Tolerances, per dtype, in one place: (rtol, atol).
FORWARD_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.complex64: (1e-5, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.complex64: (1e-4, 1e-4), torch.float64: (1e-7, 1e-7)}


def op_db() -> list:
    from torch.testing._internal.common_methods_invocations import op_db as db

    return db


def find_ops(name: str) -> list:
    return [op for op in op_db() if op.name == name or f"{op.name}.{op.variant_test_name}" == name]


def samples(op, dtype: torch.dtype, requires_grad: bool = False) -> Iterator:
    yield from op.sample_inputs("cpu", dtype, requires_grad=requires_grad)


def _as_function(op, sample):
    leaves, spec = torch_pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    index = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def fn(*tensors):
        values = list(leaves)
        for i, t in zip(index, tensors, strict=True):
            values[i] = t
        inp, args, kwargs = torch_pytree.tree_unflatten(values, spec)
        return op.op(inp, *args, **kwargs)

    return fn, [leaves[i] for i in index]


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in torch_pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _assert_close(got: Any, expected: torch.Tensor, tol: dict, what: str) -> None:
    got_t = bridge.to_torch(got, copy=True)
    if expected.dtype in bridge.dtypes.WIDE_DTYPES and not bridge.dtypes.x64_enabled():
        # JAX holds 64-bit results as 32-bit with x64 off: compare in that dtype.
        expected = expected.to(got_t.dtype)
    assert got_t.shape == expected.shape, f"{what}: shape {tuple(got_t.shape)} != {tuple(expected.shape)}"
    assert got_t.dtype == expected.dtype, f"{what}: dtype {got_t.dtype} != {expected.dtype}"
    rtol, atol = tol.get(expected.dtype, (0, 0))
    torch.testing.assert_close(got_t, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_sample(op, sample, *, grad: bool = False) -> None:
    """Assert that the translated op matches torch on one sample (raises otherwise)."""
    fn, tensors = _as_function(op, sample)
    tensors = [t.detach() for t in tensors]
    expected = fn(*tensors)
    jfn = bridge.torch_to_jax(fn, strict=True)
    inputs = [bridge.to_jax(t, copy=True) for t in tensors]
    got = jax.jit(jfn)(*inputs)
    exp_leaves = _tensor_leaves(expected)
    got_leaves = [x for x in jax.tree_util.tree_leaves(got) if hasattr(x, "dtype")]
    assert len(got_leaves) == len(exp_leaves), f"{len(got_leaves)} outputs, torch has {len(exp_leaves)}"
    for i, (g, e) in enumerate(zip(got_leaves, exp_leaves, strict=True)):
        _assert_close(g, e, FORWARD_TOL, f"output {i}")
    if grad:
        _check_grad(fn, tensors, jfn, inputs, exp_leaves)


def _check_grad(fn, tensors, jfn, inputs, exp_leaves) -> None:
    diff = [i for i, t in enumerate(tensors) if t.is_floating_point() or t.is_complex()]
    outs = [i for i, e in enumerate(exp_leaves) if e.is_floating_point() or e.is_complex()]
    if not diff or not outs:
        return
    gen = torch.Generator().manual_seed(0)
    cot = {i: torch.randn(exp_leaves[i].shape, generator=gen, dtype=exp_leaves[i].dtype) for i in outs}
    leaf = [t.clone().requires_grad_(i in diff) for i, t in enumerate(tensors)]
    try:
        torch_out = _tensor_leaves(fn(*leaf))
    except RuntimeError as e:
        if "not differentiable" not in str(e) and "not implemented" not in str(e):
            raise
        # Some float arguments (loss weights, running stats) are not
        # differentiable in torch: differentiate w.r.t. the main input only.
        diff = diff[:1] if diff and diff[0] == 0 else []
        if not diff:
            return
        leaf = [t.clone().requires_grad_(i in diff) for i, t in enumerate(tensors)]
        torch_out = _tensor_leaves(fn(*leaf))
    pairs = [(torch_out[i], cot[i]) for i in outs if torch_out[i].requires_grad]
    if not pairs:
        return
    expected = torch.autograd.grad(
        [p[0] for p in pairs], [leaf[i] for i in diff], [p[1] for p in pairs], allow_unused=True
    )

    def f(*diff_inputs):
        values = list(inputs)
        for i, v in zip(diff, diff_inputs, strict=True):
            values[i] = v
        leaves = [x for x in jax.tree_util.tree_leaves(jfn(*values)) if hasattr(x, "dtype")]
        return [leaves[i] for i in outs]

    _, vjp = jax.vjp(f, *[inputs[i] for i in diff])
    # torch's gradient is conj(JAX's VJP at the conjugate cotangent).
    got = jax.jit(vjp)([bridge.to_jax(cot[i].conj().resolve_conj()) for i in outs])
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        e = torch.zeros_like(tensors[diff[k]]) if e is None else e
        # torch's convention for complex gradients is the conjugate of JAX's.
        if e.is_complex():
            e = e.conj()
        _assert_close(g, e.detach().resolve_conj(), GRAD_TOL, f"grad of input {diff[k]}")


def report(name: str, dtype: torch.dtype = torch.float32, grad: bool = False) -> tuple[int, int]:
    """Print one line per failing sample of the OpInfos called `name`; return (passed, total)."""
    passed = total = 0
    for op in find_ops(name):
        for k, sample in enumerate(samples(op, dtype)):
            total += 1
            try:
                check_sample(op, sample, grad=grad and op.supports_autograd)
                passed += 1
            except Exception as e:  # report every kind of failure
                msg = str(e).strip().splitlines()
                print(f"  {op.name}.{op.variant_test_name} sample {k}: {type(e).__name__}: {msg[0] if msg else ''}"[:400])
    return passed, total


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    do_grad = "--grad" in sys.argv
    for name in args:
        p, t = report(name, grad=do_grad)
        print(f"{name}: {p}/{t} samples pass" + (" (with grad)" if do_grad else ""))
    np.seterr(all="ignore")
