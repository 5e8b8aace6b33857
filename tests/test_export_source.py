"""bridge/export/source.py: traced JAX programs printed as torch-free Python source.

Every case emits the source, imports it from a file (header: the imports the
caller of `emit_function` writes), and checks that the printed function is the
same program: outputs bit-identical to `jax.jit(fn)` on the same inputs, and
`jax.grad` equal (pure JAX functions in float64; converted torch models in
float32, where the same XLA program gives the same bits). Pure JAX functions
cover the primitive table; the torch.nn layer cases and GPT-2 / ResNet / BERT
check readability too: at most one statement per graph node, names from the
module path, `ruff check` clean, identical text across emissions.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from numerics import enable_x64

from bridge.export.source import ConstantError, UnsupportedPrimitiveError, emit_function

ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def header(src: str) -> str:
    """The imports the caller of emit_function writes, limited to those the text uses."""
    used = re.match(r"# uses: (.*)\n", src).group(1).split(", ")
    lines = {"math": "import math", "jax": "import jax", "jnp": "import jax.numpy as jnp",
             "np": "import numpy as np", "lax": "from jax import lax"}
    std = [lines["math"]] if "math" in used else []
    third = [lines[m] for m in ("jax", "jnp", "np", "lax") if m in used]
    return "\n".join(std + ([""] if std else []) + third) + "\n\n"


def load(src: str, tmp_path: Path, name: str = "forward"):
    path = tmp_path / f"emitted_{next(_counter)}.py"
    path.write_text(header(src) + src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name), path


def specs(args) -> tuple:
    return tuple(jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in args)


def emit(fn, args, **kw) -> str:
    names = kw.pop("arg_names", [f"a{i}" for i in range(len(args))])
    return emit_function(fn, specs(args), name="forward", arg_names=names, **kw)


def assert_same_outputs(f, g, args):
    got, want = jax.jit(f)(*args), jax.jit(g)(*args)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def float_positions(args) -> list[int]:
    return [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]


def grads(f, args, weights):
    pos = float_positions(args)

    def loss(*diff):
        full = list(args)
        for i, d in zip(pos, diff, strict=True):
            full[i] = d
        outs = f(*full)
        return sum(jnp.vdot(o, w) for o, w in zip(outs, weights, strict=True) if w is not None)

    return jax.jit(jax.grad(loss, argnums=tuple(range(len(pos)))))(*[args[i] for i in pos])


def loss_weights(fn, args):
    outs = jax.eval_shape(fn, *args)
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(o.shape), o.dtype)
            if jnp.issubdtype(o.dtype, jnp.floating) else None for o in outs]


def assert_same_grads(f, g, args, rtol=0.0):
    w = loss_weights(g, args)
    if not float_positions(args) or all(x is None for x in w):
        return
    for a, b in zip(grads(f, args, w), grads(g, args, w), strict=True):
        if rtol:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def ruff(path: Path) -> None:
    done = subprocess.run([str(ROOT / ".venv/bin/ruff"), "check", "--no-cache", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- pure JAX


def _r(*shape, dtype=np.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@jax.custom_jvp
def clipped_identity(x):
    return jnp.clip(x, -1.0, 1.0)


@clipped_identity.defjvp
def _clipped_identity_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return clipped_identity(x), t * 0.5  # deliberately not the derivative of the primal


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def scaled_sin(x, y, k):
    return jnp.sin(x) * y * k, x + 1


def _scaled_sin_fwd(x, y, k):
    return scaled_sin(x, y, k), (jnp.cos(x), y, x)


def _scaled_sin_bwd(k, res, g):
    c, y, _ = res
    return (g[0] * c * y * k * 3.0 + g[1], None)  # deliberately not the true gradient of y


scaled_sin.defvjp(_scaled_sin_fwd, _scaled_sin_bwd)


def elementwise(x, y):
    return (jnp.sin(x) * y + jnp.exp(-x) / (1 + y**2), jnp.maximum(x, y), jnp.minimum(x, 0.5),
            jnp.where(x > y, x, y), jnp.tanh(x) ** 3, jnp.abs(x) - jnp.sqrt(jnp.abs(y)),
            jnp.log1p(jnp.abs(x)), jax.nn.sigmoid(x), jnp.power(jnp.abs(x) + 1, y),
            jnp.clip(x, -0.5, 0.5), jnp.round(x * 3), jnp.floor(x), jnp.sign(x) * jnp.ceil(y),
            jax.lax.rsqrt(jnp.abs(x) + 1), jnp.arctan2(x, y), jax.scipy.special.erf(x),
            (x.astype(jnp.int32) % 3), ~(x > 0), (x > 0) & (y < 0) | (x == y),
            jnp.isfinite(x / y), jnp.float32(0.1) * x, jnp.float32(1e-7) + x)


def activations(x):
    return (jax.nn.relu(x), jax.nn.gelu(x), jax.nn.gelu(x, approximate=False),
            jax.nn.softplus(x), jax.nn.silu(x), jax.nn.logsumexp(x, axis=-1),
            jax.nn.softmax(x, axis=-1), jax.nn.log_softmax(x), clipped_identity(x * 2),
            *scaled_sin(x, x * x, 2.0))


def matmuls(x, w, k):
    y = x @ w
    z = jnp.einsum("bi,bj->bij", x, x)
    c = lax.conv_general_dilated(k, jnp.ones((4, 2, 3, 3)) * 0.1, (2, 1), ((1, 2), (0, 1)),
                                 lhs_dilation=(1, 1), rhs_dilation=(1, 2),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                 feature_group_count=2)
    return y, z, c, lax.dot(x, w, precision=lax.Precision.HIGHEST)


def reductions(x):
    return (x.sum(0), x.max(1), x.min(), x.prod(1), jnp.argmax(x, 1), jnp.argmin(x, 0),
            x.mean(-1), x.var(0), jnp.cumsum(x, 1), jnp.cumprod(x, 0), lax.cummax(x, 1),
            jnp.sort(x, 1), jnp.argsort(x, 0), lax.top_k(x, 2)[0], jnp.any(x > 1), jnp.all(x > -3),
            lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 1), "SAME"))


def generic_reductions(x):  # forward only: JAX does not differentiate a generic reduce
    return (*lax.reduce((x, jnp.arange(24).reshape(4, 6)), (-jnp.inf, 0), _max_and_index, (0,)),
            lax.reduce(x, 1.0, lambda a, b: a * b + 0.5, (1,)))


def _max_and_index(a, b):
    return jnp.maximum(a[0], b[0]), jnp.where(a[0] >= b[0], a[1], b[1])


def indexing(x, idx, v):
    return (x[idx], x.at[idx].add(v), x.at[idx].set(v), x[1:3, ::2], x[:, -1],
            jnp.take_along_axis(x, jnp.abs(idx)[:, None] % 4, axis=1),
            lax.dynamic_slice(x, (idx[0], 1), (2, 2)),
            lax.dynamic_update_slice(x, v[:2, :2], (idx[1], 0)),
            jnp.concatenate([x, x[::-1]], 0), jnp.pad(x, ((1, 0), (0, 2))),
            x.reshape(2, -1).T, jnp.expand_dims(x, 0)[0], jnp.broadcast_to(x[:, :1], (4, 5)),
            jnp.arange(5) * 2 + x.shape[0], jnp.flip(x, 1), jnp.stack([x, v]), *jnp.split(x, 2, 1))


def control(x, w):
    def step(h, xt):
        h = jnp.tanh(h @ w + xt)
        return h, h.sum()

    h, ys = lax.scan(step, jnp.zeros(4), x)
    n = lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] * 1.5), (0, 2.0))
    c = lax.cond(x[0, 0] > 0, lambda a: a * 2, lambda a: a - 1, x)
    return h, ys, n[1], c, lax.fori_loop(0, 3, lambda i, a: a @ w, x)


def random_fn(key, x):
    k1, k2 = jax.random.split(key)
    drop = jax.random.bernoulli(jax.random.fold_in(k1, 3), 0.5, x.shape)
    return (jnp.where(drop, x * 2, 0.0), jax.random.normal(k2, (3,)),
            jax.random.uniform(key, (2, 2)), jax.random.key_data(k1),
            jax.random.uniform(jax.random.wrap_key_data(jax.random.key_data(k2)), (2,)),
            jax.random.bits(jax.random.key(7), (2,)))


PURE = {
    "elementwise": (elementwise, lambda: (_r(3, 4), _r(3, 4, seed=1))),
    "activations": (activations, lambda: (_r(3, 5),)),
    "matmuls": (matmuls, lambda: (_r(3, 4), _r(4, 5), _r(2, 4, 7, 6))),
    "reductions": (reductions, lambda: (_r(4, 6),)),
    "generic-reductions": (generic_reductions, lambda: (_r(4, 6),)),
    "indexing": (indexing, lambda: (_r(4, 4), jnp.array([3, 0, 1, 3]), _r(4, 4, seed=2))),
    "control": (control, lambda: (_r(6, 4), _r(4, 4) * 0.3)),
}


NO_GRADS = {"generic-reductions"}


@pytest.mark.parametrize("name", list(PURE))
def test_pure_jax_program_round_trips(name, tmp_path):
    f, make = PURE[name]
    fn = lambda *a: tuple(f(*a))  # noqa: E731
    args = make()
    src = emit(fn, args)
    assert src == emit(fn, args)
    forward, path = load(src, tmp_path)
    assert_same_outputs(forward, fn, args)
    ruff(path)
    with enable_x64():
        args64 = tuple(a.astype(jnp.float64) if a.dtype == jnp.float32 else a for a in make())
        forward64, _ = load(emit(fn, args64), tmp_path)
        assert_same_outputs(forward64, fn, args64)
        # Same values, but jax.grad sums cotangents per nested jit in the original and over
        # the inlined program here: the order of the sums (not the derivative) may differ.
        if name not in NO_GRADS:
            assert_same_grads(forward64, fn, args64, rtol=1e-12)


def test_custom_jvp_rule_is_kept(tmp_path):
    fn = lambda x: (clipped_identity(x),)  # noqa: E731
    x = jnp.array([0.3, -2.0, 5.0], jnp.float32)
    forward, _ = load(emit(fn, (x,)), tmp_path)
    g = jax.grad(lambda v: forward(v)[0].sum())(x)
    np.testing.assert_array_equal(np.asarray(g), [0.5, 0.5, 0.5])


def test_custom_vjp_rule_is_kept(tmp_path):
    fn = lambda x, y: scaled_sin(x * jnp.arange(3.0), y, 2.0)  # noqa: E731
    args = (_r(3), _r(3, seed=1))
    forward, _ = load(emit(fn, args), tmp_path)
    g = jax.grad(lambda x, y: forward(x, y)[0].sum(), argnums=(0, 1))(*args)
    want = jax.grad(lambda x, y: fn(x, y)[0].sum(), argnums=(0, 1))(*args)
    np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(g[1]), 0.0)  # the rule gives y no cotangent


def test_random_draws_the_same_bits(tmp_path):
    fn = lambda k, x: tuple(random_fn(k, x))  # noqa: E731
    args = (jax.random.key(3), _r(3, 4))
    src = emit(fn, args, arg_names=["key", "x"])
    forward, path = load(src, tmp_path)
    assert_same_outputs(forward, fn, args)
    ruff(path)


def test_exact_constants(tmp_path):
    values = np.array([0.1, 1 / 3, 1e-38, 3.4028235e38, -0.0, 2.0**-149], np.float32)
    fn = lambda x: tuple(x * jnp.float32(v) for v in values) + (x + jnp.asarray(values[:4]),)  # noqa: E731
    x = _r(4)
    forward, _ = load(emit(fn, (x,)), tmp_path)
    assert_same_outputs(forward, fn, (x,))


def test_large_constants_are_refused():
    table = jnp.arange(100.0)
    with pytest.raises(ValueError, match="constant array of shape"):
        emit(lambda x: (x + table,), (_r(100),))


def test_unknown_primitive_is_named():
    fn = lambda x: (jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x),)  # noqa: E731
    with pytest.raises(UnsupportedPrimitiveError, match="pure_callback"):
        emit(fn, (_r(3),))


_EMIT_SCRIPT = """
import jax, jax.numpy as jnp
from jax import lax
from bridge.export.source import emit_function

def f(x, w):
    h, ys = lax.scan(lambda h, xt: (jnp.tanh(h @ w + xt), h.sum()), jnp.zeros(4), x)
    with jax.named_scope("block/linear_1"):
        y = jax.nn.relu(x @ w) + 1.0
    with jax.named_scope("block/softmax_2"):
        z = jax.nn.softmax(y) * jax.nn.gelu(y)
    return h, ys, jax.nn.logsumexp(z, -1), y, z

specs = (jax.ShapeDtypeStruct((6, 4), jnp.float32), jax.ShapeDtypeStruct((4, 4), jnp.float32))
print(emit_function(f, specs, name="forward", arg_names=["x", "w"], comments={"linear_1": "y"}))
"""


def test_text_is_identical_across_processes():
    import os

    texts = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _EMIT_SCRIPT], capture_output=True,
                              text=True, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        texts.append(done.stdout)
    assert texts[0] == texts[1]
    assert "    # y\n    block_linear = _linear(x, w)\n" in texts[0]
    assert "\n    block_softmax = _softmax(block_linear)\n" in texts[0]


# ---------------------------------------------------------------- symbolic shapes


def attention_block(x, wq, wk, g):
    with jax.named_scope("ln/layer_norm"):  # helpers that read b and t from their inputs
        mu = x.mean(-1, keepdims=True)
        h = (x - mu) * lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * g
    with jax.named_scope("attn/q/linear"):
        q = h @ wq
    with jax.named_scope("attn/k/linear_1"):
        k = h @ wk
    s = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(8.0)
    t = x.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    out = jnp.einsum("bts,bsd->btd", p, h)
    with jax.named_scope("pos/arange"):  # no input has the shape: b comes in as a parameter
        pos = jnp.arange(x.shape[0]) + 1
    return out.reshape(x.shape[0], -1), out.sum() / x.shape[0], pos


def test_symbolic_batch_and_length(tmp_path):
    from jax import export

    b, t = export.symbolic_shape("b, t")
    example = (jax.ShapeDtypeStruct((b, t, 8), jnp.float32), jax.ShapeDtypeStruct((8, 8), jnp.float32),
               jax.ShapeDtypeStruct((8, 8), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.float32))
    fn = lambda *a: tuple(attention_block(*a))  # noqa: E731
    src = emit_function(fn, example, name="forward", arg_names=["x", "wq", "wk", "g"])
    assert "b = x.shape[0]" in src and "t = x.shape[1]" in src
    assert "def _layer_norm(x0, x1):\n    b = x0.shape[0]\n    t = x0.shape[1]\n" in src
    assert "def _arange(b):\n" in src and " = _arange(b)\n" in src
    forward, path = load(src, tmp_path)
    ruff(path)
    for batch, length in ((2, 5), (3, 7)):
        args = (_r(batch, length, 8), _r(8, 8, seed=1), _r(8, 8, seed=2), _r(8, seed=3))
        assert_same_outputs(forward, fn, args)
    exported = export.export(jax.jit(forward))(*example)  # the source traces symbolically too
    assert str(exported.in_avals[0].shape) == "(b, t, 8)"


# ---------------------------------------------------------------- torch-free


def test_emitted_source_runs_without_torch_or_bridge(tmp_path):
    fn = lambda x, y: tuple(activations(x)) + tuple(elementwise(x, y))  # noqa: E731
    args = (_r(3, 4), _r(3, 4, seed=1))
    src = emit(fn, args)
    path = tmp_path / "model_src.py"
    path.write_text(header(src) + src)
    want = [np.asarray(o) for o in jax.jit(fn)(*args)]
    np.savez(tmp_path / "io.npz", *[np.asarray(a) for a in args], *want)
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "bridge", "transformers"):
                    raise ImportError(f"{{name}} is refused here")
        sys.meta_path.insert(0, Refuse())
        sys.path.insert(0, {str(tmp_path)!r})
        import jax, numpy as np
        import model_src
        io = np.load({str(tmp_path / "io.npz")!r})
        arrs = [io[f"arr_{{i}}"] for i in range(len(io.files))]
        outs = jax.jit(model_src.forward)(*arrs[:2])
        assert len(outs) == len(arrs) - 2
        for o, w in zip(outs, arrs[2:]):
            np.testing.assert_array_equal(np.asarray(o), w)
        assert "torch" not in sys.modules and "bridge" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# ---------------------------------------------------------------- converted torch models


def flat_model(module, inputs: dict, rng=None, positional: bool = False):
    """`fn(*flat) -> flat outputs` of a converted module (params, state and inputs flat, in
    that order), its example arrays and argument names."""
    import bridge

    apply, params, state = bridge.torch_to_jax_with_state(module, strict=True, checks=False)
    jinputs = bridge.to_jax(inputs)
    pkeys, skeys, ikeys = list(params), list(state), list(jinputs)
    extra = ["rng"] if rng is not None else []

    def fn(*flat):
        p = dict(zip(pkeys, flat[:len(pkeys)], strict=True))
        s = dict(zip(skeys, flat[len(pkeys):len(pkeys) + len(skeys)], strict=True))
        rest = flat[len(pkeys) + len(skeys):]
        kw = dict(zip(ikeys, rest[:len(ikeys)], strict=True))
        if extra:
            kw["rng"] = rest[-1]
        if positional:
            out, new_state = apply(p, s, *[kw.pop(k) for k in ikeys], **kw)
        else:
            out, new_state = apply(p, s, **kw)
        return tuple(jax.tree_util.tree_leaves((out, new_state)))

    args = (*params.values(), *state.values(), *jinputs.values(), *([rng] if extra else []))
    names = ([f"p_{k}" for k in pkeys] + [f"s_{k}" for k in skeys] + ikeys + extra)
    names = [re.sub(r"\W", "_", n).lower() for n in names]
    return fn, args, names


def main_statements(path: Path) -> int:
    import ast

    tree = ast.parse(path.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    return sum(1 for s in main.body if not isinstance(s, ast.Return)
               and not (isinstance(s, ast.Assign) and "shape[" in ast.unparse(s.value)))


def node_scopes(fn, args) -> int:
    """Distinct name scopes of the traced program (nested jits inlined), plus unscoped
    equations: what `one statement per graph node at most` is counted against."""
    closed = jax.make_jaxpr(fn)(*args)
    scopes, glue = set(), 0

    def walk(jaxpr, prefix):
        nonlocal glue
        for e in jaxpr.eqns:
            scope = "/".join(s for s in (prefix, str(e.source_info.name_stack)) if s)
            sub = e.params.get("jaxpr") if e.primitive.name in ("jit", "pjit") else None
            if sub is not None:
                walk(sub.jaxpr, scope)
            elif scope:
                scopes.add(scope)
            else:
                glue += 1

    walk(closed.jaxpr, "")
    return len(scopes) + glue


def check_model(fn, args, names, tmp_path, grad_rtol=1e-6, comments=None):
    src = emit_function(fn, specs(args), name="forward", arg_names=names, comments=comments)
    assert src == emit_function(fn, specs(args), name="forward", arg_names=names,
                                comments=comments)
    forward, path = load(src, tmp_path)
    assert max(len(line) for line in src.splitlines()) <= 100
    assert_same_outputs(forward, fn, args)
    if grad_rtol is not None:
        assert_same_grads(forward, fn, args, rtol=grad_rtol)
    ruff(path)
    assert main_statements(path) <= node_scopes(fn, args)
    return src


def nn_cases():
    from test_nn_layers import CASES

    return CASES


NN_CASES = ["mlp", "conv1d", "conv2d-groups-dilation", "conv3d", "conv-transpose2d",
            "conv-transpose1d", "batchnorm-eval", "layernorm", "groupnorm", "embedding", "lstm",
            "gru", "multihead-attention", "transformer-encoder", "transformer-decoder", "pooling",
            "maxpool1d-avgpool1d", "interpolate-nearest", "interpolate-bilinear",
            "interpolate-bilinear-aligned", "sdpa-causal", "sdpa-bool-mask", "sdpa-float-mask"]
GRADS = {"mlp", "lstm", "sdpa-causal"}  # gradients of the rest go through the same printers
# A lowering that computes a table in NumPy (torch.linspace's) puts it into the program as a
# constant: larger than printers.SMALL_CONSTANT elements, it is refused, naming its user node.
CONSTANT_TABLES = {"sdpa-float-mask": "view"}


def test_nn_case_list_is_complete():
    assert sorted(NN_CASES) == sorted(nn_cases())


@pytest.mark.parametrize("name", NN_CASES)
def test_torch_nn_layer_round_trips(name, tmp_path):
    import bridge

    make_module, make_input = nn_cases()[name]
    fn, args, names = flat_model(make_module(), {"x": make_input()}, positional=True)
    if name in CONSTANT_TABLES:
        with pytest.raises(ConstantError, match=f"constant array of shape .* in {CONSTANT_TABLES[name]}"):
            emit_function(fn, specs(args), name="forward", arg_names=names)
        return
    comments = {"linear": "x = self.linear(x)"}
    src = check_model(fn, args, names, tmp_path, 1e-6 if name in GRADS else None, comments)
    if name == "mlp":
        assert "    # x = self.linear(x)\n    m0_linear = " in src
    del bridge


def test_dropout_in_train_mode_draws_from_the_key(tmp_path):
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5)).train()
    fn, args, names = flat_model(module, {"x": torch.randn(3, 4)}, rng=jax.random.key(0),
                                 positional=True)
    src = check_model(fn, args, names, tmp_path)
    assert "jax.random.bits(" in src


@pytest.fixture(scope="module")
def transformers_models():
    pytest.importorskip("transformers")
    from models import build

    out = {}
    for name in ("gpt2", "resnet", "bert"):
        model, inputs = build(name)
        out[name] = flat_model(model, inputs)
    return out


@pytest.mark.parametrize("name", ["gpt2", "resnet", "bert"])
def test_transformers_model_round_trips(name, transformers_models, tmp_path):
    fn, args, names = transformers_models[name]
    # Gradients on GPT-2 only (the file's time budget): ResNet's and BERT's go through the
    # same printers, which the forward checks bit for bit.
    src = check_model(fn, args, names, tmp_path, 1e-6 if name == "gpt2" else None)
    if name == "gpt2":
        assert re.search(r"\n    transformer_h_0_attn\w* = ", src)
        assert re.search(r"\n    transformer_h_1_attn\w* = _\w+\(", src)
