"""Run PyTorch's OpInfo samples through bridge.torch_to_jax and compare with torch.

Used by tests/test_opinfo.py and by hand while writing lowerings:

    .venv/bin/python tests/opinfo_harness.py add mul --grad     # per-sample report

Each sample becomes a torch function of its tensor leaves (everything else is
baked in as a static value), translated with `torch_to_jax(strict=True)`, run
under `jax.jit`, and compared with torch eager. With `grad=True` the VJP of
every floating output (random cotangent) against every floating input is
compared with `torch.autograd.grad`.

What "matches" means, in one place:

- Values within `FORWARD_TOL`/`GRAD_TOL` of torch eager. Where that fails in
  float32, the sample is re-run by torch in float64 and the bridge passes if
  it is no farther from that float64 result than torch's own float32 result
  is (plus the tolerance): torch's float32 kernels for, e.g., polygamma are
  less accurate than JAX's, and being closer to the truth is not a failure.
  Gradients get the same fallback (torch's float32 backward of logcumsumexp
  or grid_sampler_3d is farther from float64 than JAX's).
- Random ops (`RANDOM`): JAX cannot replay torch's generator, so the
  translated op runs with an `rng=` key and is checked for shape, dtype and
  the support of its distribution (`RANDOM`'s predicate), not values; where
  the gradient depends on the draw (`RANDOM_GRADIENTS`), so are gradients.
  The samples of deterministic entries that draw (`RANDOM_SAMPLES`: dropout
  with p > 0) are checked the same way, shape, dtype and finite values.
- A sample input that is a partial view of a larger storage is passed as
  that whole storage and viewed inside the function (see `_as_function`).
- Ops whose values are undefined (`UNINITIALISED`: `torch.empty` and kin) are
  checked for shape and dtype.
- Eigenvectors (`EIGENVECTORS`) are defined up to a phase per column: both
  sides are rotated so each column's largest entry is real and positive. For
  gradients, the sample's own `output_process_fn_grad` (torch's test-suite
  hook that makes eigenvector losses phase-invariant) is applied inside the
  translated function.
- Ops that write into an input (`x.uniform_()`, `batch_norm` updating its
  running statistics) are run on a clone of that input made inside the
  function, and the clone's final value is compared as an extra output: a
  JAX function cannot mutate its arguments (the adapter rejects that with an
  error, tested in tests/test_torch_to_jax.py), but the op itself must
  translate.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


def _within(lo: float | None = None, hi: float | None = None, integral: bool = False):
    def check(t: torch.Tensor) -> bool:
        ok = torch.ones((), dtype=torch.bool)
        if lo is not None:
            ok &= (t >= lo).all()
        if hi is not None:
            ok &= (t <= hi).all()
        if integral:
            ok &= (t == t.round()).all()
        return bool(ok)

    return check


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# Random ops: entry -> predicate every output value must satisfy (given the
# sample's arguments, which fix the ranges below).
RANDOM = {
    "randn": _finite,
    "randn_like": _finite,
    "rand_like": _finite,  # the OpInfo entry calls torch.randn_like
    "randint": _within(0, 10, integral=True),  # samples draw from [0, 10) or narrower
    "randint_like": _within(0, 10, integral=True),
    "multinomial": _within(0, None, integral=True),
    "normal": _finite,
    "normal.number_mean": _finite,
    "normal.in_place": _finite,
    "bernoulli": _within(0.0, 1.0, integral=True),
    "cauchy": lambda t: not bool(torch.isnan(t).any()),
    "exponential": _within(0.0, None),
    "geometric": _within(1.0, None, integral=True),
    "log_normal": _within(0.0, None),
    "uniform": _within(-100.0, 100.0),  # the sample's own bounds
}
# Random ops whose gradient depends on the draw (the window a fractional pool
# picks, rrelu's slopes): their gradients are checked for shape and dtype.
RANDOM.update({
    "nn.functional.fractional_max_pool2d": _finite,  # window maxima and their indices
    "nn.functional.fractional_max_pool3d": _finite,
    "nn.functional.rrelu": _finite,
})
RANDOM_GRADIENTS = {"nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
                    "nn.functional.rrelu"}
# Deterministic entries some of whose samples draw random numbers (dropout
# with p > 0): entry -> which samples. Those samples are checked like RANDOM
# entries (key, shape, dtype, finite values; gradients shape and dtype); the
# entry's other samples are compared value for value.
def _dropout(s) -> bool:
    """F.dropout and kin: random for 0 < p < 1 in training (p = 1 zeroes everything)."""
    return bool(s.kwargs.get("training", True)) and 0 < s.kwargs.get("p", 0.5) < 1


RANDOM_SAMPLES = {
    "nn.functional.multi_head_attention_forward": lambda s: bool(s.kwargs.get("training", True))
    and s.args[9] > 0,  # args: key, value, embed_dim, num_heads, in_proj w/b, bias_k/v, add_zero_attn, dropout_p
    "nn.functional.scaled_dot_product_attention": lambda s: s.kwargs.get("dropout_p", 0.0) > 0,
    "nn.functional.dropout": _dropout,
    "nn.functional.dropout2d": _dropout,
    "nn.functional.dropout3d": _dropout,
    "nn.functional.alpha_dropout": _dropout,
    "nn.functional.feature_alpha_dropout.with_train": _dropout,
}


def draws(name: str, sample) -> bool:
    """Whether the sample's result depends on a random draw."""
    return name in RANDOM or (name in RANDOM_SAMPLES and RANDOM_SAMPLES[name](sample))


UNINITIALISED = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"}
EIGENVECTORS = {"linalg.eigh": (1,), "eigh": (1,)}  # entry -> output indices holding eigenvectors


def op_db() -> list:
    from torch.testing._internal.common_methods_invocations import op_db as db

    return db


def entry_id(op) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def find_ops(name: str) -> list:
    return [op for op in op_db() if op.name == name or f"{op.name}.{op.variant_test_name}" == name]


def samples(op, dtype: torch.dtype, requires_grad: bool = False) -> Iterator:
    yield from op.sample_inputs("cpu", dtype, requires_grad=requires_grad)


def _as_function(op, sample, clone: frozenset[int] = frozenset(), post=None):
    """The sample as a function of its tensor leaves; the leaves at positions
    `clone` are cloned inside it and returned after the op's result; `post`
    is applied to the result."""
    leaves, spec = torch_pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    index = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    # A leaf that is a partial view of a larger storage (as_strided's
    # "partial_views" samples) is passed as that whole storage and viewed
    # inside the function: a clone would drop the memory around it, which
    # ops like as_strided read (torch's own call then fails in setStorage).
    views = {k: (t.size(), t.stride(), t.storage_offset())
             for k, t in enumerate(leaves[i] for i in index) if _partial_view(t)}

    def fn(*tensors):
        values = list(leaves)
        tensors = [t.clone() if k in clone else t for k, t in enumerate(tensors)]
        viewed = [t.as_strided(*views[k]) if k in views else t for k, t in enumerate(tensors)]
        for i, t in zip(index, viewed, strict=True):
            values[i] = t
        inp, args, kwargs = torch_pytree.tree_unflatten(values, spec)
        out = op.op(inp, *args, **kwargs)
        if post is not None:
            out = post(out)
        return (out, *(tensors[k] for k in sorted(clone))) if clone else out

    tensors = [leaves[i] for i in index]
    return fn, [_whole_storage(t) if k in views else t for k, t in enumerate(tensors)]


def _partial_view(t: torch.Tensor) -> bool:
    """Whether `t` sees only part of its storage (an offset, or memory past its last element)."""
    if t.numel() == 0 or t.layout != torch.strided:
        return False
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return t.storage_offset() != 0 or t.untyped_storage().nbytes() > extent * t.element_size()


def _whole_storage(t: torch.Tensor) -> torch.Tensor:
    """`t`'s whole storage as a 1-d tensor of its dtype."""
    return t.detach().as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)


class _WriteRecorder(TorchDispatchMode):
    """Records the storages that ATen ops write into (schema `Tensor(a!)` arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in _tensor_leaves(value):
                self.written.add(t.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def _mutated(op, sample) -> frozenset[int]:
    """Positions of the tensor leaves that the op writes into (torch eager)."""
    fn, tensors = _as_function(op, sample)
    tensors = [t.detach().clone() for t in tensors]
    before = [(t._version, t.clone()) for t in tensors]
    with _WriteRecorder() as rec:
        fn(*tensors)
    # A write shows in the schema (`Tensor(a!)`), the version counter, or the
    # values: native_batch_norm writes its running statistics with none of
    # the first two.
    return frozenset(
        k
        for k, (t, (version, old)) in enumerate(zip(tensors, before, strict=True))
        if t.untyped_storage().data_ptr() in rec.written
        or t._version != version
        or not torch.equal(t.nan_to_num(), old.nan_to_num())
    )


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in torch_pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _number_leaves(tree: Any) -> list[torch.Tensor]:
    """The Python numbers in `tree` (torch.Size included), as 0-d tensors of torch's default dtypes."""
    leaves = []
    for x in torch_pytree.tree_leaves(tree):
        for v in (x if isinstance(x, torch.Size) else (x,)):
            if isinstance(v, (bool, int, float)):
                leaves.append(torch.tensor(v))
    return leaves


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """JAX holds 64-bit values as 32-bit with x64 off: the dtype to compare in."""
    if t.dtype in bridge.dtypes.WIDE_DTYPES and not bridge.dtypes.x64_enabled():
        return t.to({torch.float64: torch.float32, torch.complex128: torch.complex64,
                     torch.int64: torch.int32, torch.uint64: torch.uint32}[t.dtype])
    return t


def _assert_close(got: Any, expected: torch.Tensor, tol: dict, what: str, reference=None,
                  values: bool = True) -> None:
    """`got` (JAX) matches `expected` (torch). `reference`, if given, is a
    float64 torch result of the same computation: then `got` also passes
    where it is no farther from it than `expected` is."""
    got_t = bridge.to_torch(got, copy=True)
    expected = _narrow(expected)
    assert got_t.shape == expected.shape, f"{what}: shape {tuple(got_t.shape)} != {tuple(expected.shape)}"
    assert got_t.dtype == expected.dtype, f"{what}: dtype {got_t.dtype} != {expected.dtype}"
    if not values:
        return
    rtol, atol = tol.get(expected.dtype, (0, 0))
    try:
        torch.testing.assert_close(got_t, expected, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
    except AssertionError:
        if reference is None or not expected.is_floating_point():
            raise
        ref = reference.to(torch.float64)
        torch_err = (expected.to(torch.float64) - ref).abs().nan_to_num(nan=0.0)
        bound = torch_err + atol + rtol * ref.abs()
        got64 = got_t.to(torch.float64)
        # NaN where the reference is not (or the reverse) makes `ours` NaN: not close.
        close = ((got64 - ref).abs() <= bound) | (got64 == ref) | (torch.isnan(got64) & torch.isnan(ref))
        if not close.all():
            raise


def _gauge(t: torch.Tensor) -> torch.Tensor:
    """Eigenvector columns rotated so each column's largest entry is real positive."""
    if t.shape[-2] == 0:  # 0x0 matrices: no entries to align
        return t
    idx = t.abs().argmax(dim=-2, keepdim=True)
    pivot = torch.gather(t, -2, idx)
    phase = pivot / pivot.abs().clamp_min(torch.finfo(t.real.dtype).tiny)
    return t * phase.conj()


class NeedsX64(Exception):
    """The sample has a 64-bit floating input, which JAX holds only with x64 on."""


def check_sample(op, sample, *, grad: bool = False) -> None:
    """Assert that the translated op matches torch on one sample (raises otherwise)."""
    name = entry_id(op)
    if not bridge.dtypes.x64_enabled():
        wide = [t.dtype for t in _tensor_leaves((sample.input, sample.args, sample.kwargs))
                if t.dtype in (torch.float64, torch.complex128)]
        if wide:
            raise NeedsX64(f"a {wide[0]} input needs JAX's x64 mode")
    post = sample.output_process_fn_grad if grad and name in EIGENVECTORS else None
    random = draws(name, sample)
    clone = _mutated(op, sample)
    while True:
        fn, tensors = _as_function(op, sample, clone, post)
        tensors = [t.detach() for t in tensors]
        expected = fn(*[t.clone() for t in tensors])
        jfn = bridge.torch_to_jax(fn, strict=True)
        if random:
            jfn = functools.partial(jfn, rng=jax.random.key(0))
        inputs = [bridge.to_jax(t, copy=True) for t in tensors]
        try:
            got = jax.jit(jfn)(*inputs)
            break
        except ValueError as e:
            # A write that left the values as they were (batch_norm with
            # momentum 0) escapes _mutated; torch.export still records it.
            if "writes into one of its inputs" not in str(e) or len(clone) == len(tensors):
                raise
            clone = frozenset(range(len(tensors)))
    exp_leaves = _tensor_leaves(expected)
    got_leaves = [x for x in jax.tree_util.tree_leaves(got) if hasattr(x, "dtype")]
    if not exp_leaves and got_leaves:
        # torch returns Python numbers (broadcast_shapes' torch.Size); a jitted
        # JAX function can only return them as arrays: compare them as such.
        exp_leaves = _number_leaves(expected)
    assert len(got_leaves) == len(exp_leaves), f"{len(got_leaves)} outputs, torch has {len(exp_leaves)}"
    reference = None
    for i, (g, e) in enumerate(zip(got_leaves, exp_leaves, strict=True)):
        what = f"output {i}"
        if random:
            _assert_close(g, e, FORWARD_TOL, what, values=False)
            support = RANDOM.get(name, _finite)
            assert support(bridge.to_torch(g, copy=True)), f"{what}: values outside the distribution's support"
            continue
        if name in UNINITIALISED:
            _assert_close(g, e, FORWARD_TOL, what, values=False)
            continue
        if post is None and i in EIGENVECTORS.get(name, ()):
            g, e = bridge.to_jax(_gauge(bridge.to_torch(g, copy=True))), _gauge(e)
        try:
            _assert_close(g, e, FORWARD_TOL, what)
        except AssertionError:
            if e.dtype != torch.float32 or not _has_float64(op):
                raise
            if reference is None:
                wide = [t.to(torch.float64) if t.dtype == torch.float32 else t for t in tensors]
                reference = _tensor_leaves(fn(*wide))
            _assert_close(g, e, FORWARD_TOL, what, reference=reference[i])
    if grad:
        _check_grad(fn, tensors, jfn, inputs, exp_leaves,
                    random_draws=name in RANDOM_GRADIENTS or (random and name not in RANDOM),
                    has_float64=_has_float64(op))


def _has_float64(op) -> bool:
    return torch.float64 in op.supported_dtypes("cpu")


def _check_grad(fn, tensors, jfn, inputs, exp_leaves, *, random_draws: bool = False,
                has_float64: bool = True) -> None:
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
    got = jax.jit(vjp)([bridge.to_jax(_narrow(cot[i].conj().resolve_conj())) for i in outs])
    reference = None
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        e = torch.zeros_like(tensors[diff[k]]) if e is None else e
        # torch's convention for complex gradients is the conjugate of JAX's.
        if e.is_complex():
            e = e.conj()
        e = e.detach().resolve_conj()
        what = f"grad of input {diff[k]}"
        if random_draws:  # the gradient depends on the random draw: shape and dtype only
            _assert_close(g, e, GRAD_TOL, what, values=False)
            continue
        try:
            _assert_close(g, e, GRAD_TOL, what)
        except AssertionError:
            if e.dtype != torch.float32 or has_float64 is False:
                raise
            if reference is None:  # the same gradient computed by torch in float64
                wide = [t.to(torch.float64) if t.dtype == torch.float32 else t for t in tensors]
                leaf64 = [t.clone().requires_grad_(i in diff) for i, t in enumerate(wide)]
                out64 = _tensor_leaves(fn(*leaf64))
                reference = torch.autograd.grad(
                    [out64[i] for i in outs if out64[i].requires_grad],
                    [leaf64[i] for i in diff],
                    [cot[i].to(out64[i].dtype) for i in outs if out64[i].requires_grad],
                    allow_unused=True,
                )
            ref = reference[k] if reference[k] is not None else torch.zeros_like(e, dtype=torch.float64)
            _assert_close(g, e, GRAD_TOL, what, reference=ref.detach())


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
