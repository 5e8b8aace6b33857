"""Gradient checks that give the same verdict on every machine.

float32 results of one computation differ between XLA and torch by rounding
(each framework sums in its own order, and the order depends on the CPU). That
is harmless where the function is smooth, but at a kink (a ReLU pre-activation,
a max-pool window whose two largest values nearly tie, the order of a sort) a
value within rounding noise of the threshold lands on either side of it, and
the derivative there jumps: the same correct translation passes on one machine
and fails on another. Two tools keep the checks machine-independent:

- `float64_gradients` checks a derivative exactly: the model and its inputs in
  float64 on both sides (torch.autograd against `jax.grad` of a fresh
  `bridge.torch_to_jax` conversion under x64), where rounding noise is ~1e-16
  and a tolerance can sit orders of magnitude below any real error (~1e-6 where
  the model itself keeps parts in float32; see GRAD64_ISLAND_RTOL).
- `KinkMonitor` records, during a torch forward, how far every kinked op's
  operands are from their threshold. `assert_away_from_kinks` runs a module in
  float64 and in float32, takes the float32 noise of each kinked operand from
  the difference, and fails if any operand lies within `NOISE_FACTOR` times that
  noise of its kink: a float32 gradient check guarded by it cannot turn
  machine-dependent because of a future change of inputs or seeds.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from torch.utils._python_dispatch import TorchDispatchMode

import bridge

aten = torch.ops.aten

#: An operand must lie this many times its measured float32 noise from a kink.
NOISE_FACTOR = 10.0
#: The noise floor, relative to the operand's magnitude (float32's unit roundoff).
EPS32 = float(np.finfo(np.float32).eps) / 2


def enable_x64():
    """`jax.enable_x64(True)` where it exists (jax >= 0.8), else the older experimental one."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64 as legacy  # jax 0.7 (torch_xla environment)

    return legacy()


def to_double(tree):
    """Every floating-point tensor in a pytree, in float64; everything else as it is."""
    return torch_pytree.tree_map(
        lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


# ------------------------------------------------------------------ float64 gradients


def relative_errors(got: dict[str, np.ndarray], expected: dict[str, torch.Tensor], floor_frac: float = 0.01) -> dict[str, float]:
    """Per-entry max |got - expected| / max(max |expected|, floor_frac * largest |expected| of all entries).

    The floor keeps entries that are exactly zero in exact arithmetic (a key-projection
    bias shifts every attention score of a query equally) from dividing rounding noise
    by rounding noise."""
    exp = {k: v.detach().double().numpy() for k, v in expected.items()}
    floor = floor_frac * max(float(np.abs(v).max()) for v in exp.values())
    errs = {}
    for k, e in exp.items():
        g = np.asarray(got[k], dtype=np.float64)
        assert g.shape == e.shape, (k, g.shape, e.shape)
        errs[k] = float(np.abs(g - e).max() / max(float(np.abs(e).max()), floor, 1e-300))
    return errs


#: float64 gradients of a model that computes in float64 throughout agree to ~1e-15.
GRAD64_RTOL = 1e-9
#: ... and to ~1e-7..1e-6 where the model itself computes parts in float32 whatever its
#: dtype (transformers' RMSNorm variance, rotary tables, eager softmax): the two
#: frameworks round those islands differently. Smooth noise, well below this.
GRAD64_ISLAND_RTOL = 1e-5


@dataclasses.dataclass
class Float64Gradients:
    got: dict[str, np.ndarray]  # jax.grad, float64
    expected: dict[str, torch.Tensor]  # torch.autograd, float64
    float32_ops: set[str]  # ops the float64 model still ran in a lower precision

    @property
    def rtol(self) -> float:
        return GRAD64_ISLAND_RTOL if self.float32_ops else GRAD64_RTOL

    def errors(self, floor_frac: float = 0.01) -> dict[str, float]:
        return relative_errors(self.got, self.expected, floor_frac)

    def check(self, floor_frac: float = 0.01) -> float:
        """Assert every entry's relative error is within `rtol`; return the largest."""
        errs = self.errors(floor_frac)
        worst = max(errs, key=errs.get)
        assert errs[worst] <= self.rtol, (worst, errs[worst], self.rtol, sorted(self.float32_ops))
        return errs[worst]


def float64_gradients(
    module: torch.nn.Module,
    args: Sequence = (),
    kwargs: dict | None = None,
    outputs: Callable = lambda out: [out],
    wrt_args: Sequence[int] = (),
    seed: int = 0,
) -> Float64Gradients:
    """Gradients of a fixed random projection of `outputs(module(*args, **kwargs))`, in float64.

    A float64 copy of the module (the original is not touched) and float64 copies of the
    float inputs; JAX converts the copy afresh under x64 and differentiates it under
    jax.jit. Gradients are keyed by parameter name and, for the positional arguments
    in `wrt_args`, by "arg<i>". Before any of that, the module's float32 and float64
    torch forwards run under KinkMonitors and no kinked operand may lie within
    float32 noise of its threshold (parts of a "float64" model may still compute in
    float32, so float32 noise is the safe yardstick)."""
    kwargs = kwargs or {}
    m64 = copy.deepcopy(module).double()
    args64 = [to_double(a) for a in args]
    kwargs64 = to_double(kwargs)

    with torch.no_grad(), KinkMonitor() as run32:
        module(*args, **kwargs)
    targs = [a.clone().requires_grad_(True) if i in wrt_args else a for i, a in enumerate(args64)]
    with KinkMonitor() as run64:
        expected = outputs(m64(*targs, **kwargs64))
    run64.assert_away_from_kinks(run32)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in expected]
    sum((e * w).sum() for e, w in zip(expected, weights, strict=True)).backward()
    torch_grads = {n: p.grad for n, p in m64.named_parameters() if p.grad is not None}
    torch_grads.update({f"arg{i}": targs[i].grad for i in wrt_args})

    with enable_x64():
        apply, params = bridge.torch_to_jax(m64, strict=True)
        jargs = [bridge.to_jax(a) for a in args64]
        jkwargs = bridge.to_jax(kwargs64)
        jweights = [bridge.to_jax(w) for w in weights]
        diff = list(wrt_args)

        def loss(p, diff_args):
            full = list(jargs)
            for i, a in zip(diff, diff_args, strict=True):
                full[i] = a
            outs = outputs(apply(p, *full, **jkwargs))
            return sum((o * w).sum() for o, w in zip(outs, jweights, strict=True))

        pgrads, agrads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, [jargs[i] for i in diff])
        got = {n: np.asarray(pgrads[n]) for n in torch_grads if n in pgrads}
        got.update({f"arg{i}": np.asarray(g) for i, g in zip(diff, agrads, strict=True)})
    assert set(got) == set(torch_grads), sorted(set(torch_grads) ^ set(got))
    assert all(g.dtype == np.float64 for g in got.values()), {k: g.dtype for k, g in got.items()}
    return Float64Gradients(got, torch_grads, run64.low_precision_ops)


# ------------------------------------------------------------------ kinks


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64).reshape(-1)


def _top2_gap(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per slice along `dim`: largest minus second largest (a near-tie flips max/argmax)."""
    if x.shape[dim] < 2:
        return x.new_empty(0)
    top = x.detach().to(torch.float64).topk(2, dim=dim).values
    return (top.select(dim, 0) - top.select(dim, 1)).reshape(-1)


def _adjacent_gaps(x: torch.Tensor, dim: int, k: int | None = None) -> torch.Tensor:
    """Gaps between neighbours in sorted order along `dim` (the first k+1 for a top-k)."""
    s = x.detach().to(torch.float64).sort(dim=dim, descending=True).values
    n = s.shape[dim]
    if k is not None:
        s = s.narrow(dim, 0, min(k + 1, n))
    d = s.narrow(dim, 0, s.shape[dim] - 1) - s.narrow(dim, 1, s.shape[dim] - 1)
    return d.reshape(-1)


def _pool_windows(x: torch.Tensor, kernel, stride, padding, dilation, ceil_mode) -> torch.Tensor:
    """The max-pool windows of x (N, C, *spatial) as an (N, C, *out, window) tensor, -inf padded."""
    nd = len(kernel)
    x = x.detach().to(torch.float64)
    outs, pads = [], []
    for i in range(nd):
        size, span = x.shape[2 + i], dilation[i] * (kernel[i] - 1) + 1
        num = size + 2 * padding[i] - span
        out = (-(-num // stride[i]) if ceil_mode else num // stride[i]) + 1
        if ceil_mode and (out - 1) * stride[i] >= size + padding[i]:
            out -= 1  # the last window must start inside the input or its left padding
        outs.append(out)
        pads.append((padding[i], max((out - 1) * stride[i] + span - size - padding[i], 0)))
    x = torch.nn.functional.pad(x, [p for pair in reversed(pads) for p in pair], value=-float("inf"))
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]].narrow(2 + i, 0, outs[i])
    return x.reshape(*x.shape[: 2 + nd], -1)


def _as_tuple(v, nd: int, default=None) -> tuple[int, ...]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return (v,) * nd
    return tuple(v) * (nd if len(v) == 1 else 1)


def _maxpool_gap(nd: int):
    def rule(args, kwargs):
        x, kernel = args[0], args[1]
        names = ["stride", "padding", "dilation", "ceil_mode"]
        rest = dict(zip(names, args[2:], strict=False))
        rest.update({k: v for k, v in kwargs.items() if k in names})
        kernel = _as_tuple(kernel, nd)
        stride = _as_tuple(rest.get("stride"), nd, kernel)
        padding = _as_tuple(rest.get("padding", 0), nd)
        dilation = _as_tuple(rest.get("dilation", 1), nd)
        batched = x.dim() == nd + 2
        xb = x if batched else x.unsqueeze(0)
        w = _pool_windows(xb, kernel, stride, padding, dilation, bool(rest.get("ceil_mode", False)))
        top = w.topk(2, dim=-1).values
        gap = top[..., 0] - top[..., 1]
        # Exact ties of an exact value (zeros out of a ReLU before the pool, -inf padding)
        # are ties in every framework and on every machine: not a rounding hazard.
        exact = (top[..., 0] == top[..., 1]) & ((top[..., 0] == 0) | torch.isinf(top[..., 0]))
        return gap[~exact].reshape(-1), x

    return rule


def _dim(args, kwargs, i: int, default=-1) -> int:
    return kwargs.get("dim", args[i] if len(args) > i else default)


def _binary(args, kwargs):
    a, b = args[0], args[1]
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return None
    b = b if isinstance(b, torch.Tensor) else torch.tensor(float(b), dtype=torch.float64)
    return (a.to(torch.float64) - b.to(torch.float64)).reshape(-1), a


def _clamp(args, kwargs):
    x = args[0]
    lo = kwargs.get("min", args[1] if len(args) > 1 else None)
    hi = kwargs.get("max", args[2] if len(args) > 2 else None)
    gaps = [(x.to(torch.float64) - (b.to(torch.float64) if isinstance(b, torch.Tensor) else float(b))).reshape(-1)
            for b in (lo, hi) if b is not None]
    return torch.cat(gaps), x


def _hardtanh(args, kwargs):
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return _clamp((args[0], lo, hi), {})


def _threshold(args, kwargs):
    return _binary((args[0], args[1]), {})


def _at_zero(args, kwargs):
    return _flat(args[0]), args[0]


def _reduce_max(args, kwargs):
    x = args[0]
    if len(args) > 1 and isinstance(args[1], torch.Tensor):  # max.other: elementwise
        return _binary(args, kwargs)
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return _top2_gap(x.reshape(-1), 0), x
    if isinstance(dim, (list, tuple)):
        dims = [d % x.dim() for d in dim]
        keep = [d for d in range(x.dim()) if d not in dims]
        x2 = x.permute(*keep, *dims).reshape(*[x.shape[d] for d in keep], -1)
        return _top2_gap(x2, -1), x
    return _top2_gap(x, dim), x


def _reduce_min(args, kwargs):
    gap, _ = _reduce_max((-args[0], *args[1:]), kwargs)
    return gap, args[0]


def _sort(args, kwargs):
    return _adjacent_gaps(args[0], _dim(args, kwargs, 1)), args[0]


def _topk(args, kwargs):
    k = kwargs.get("k", args[1])
    return _adjacent_gaps(args[0], _dim(args, kwargs, 2), k), args[0]


_RULES: dict = {
    aten.relu: _at_zero,
    aten.relu_: _at_zero,
    aten.abs: _at_zero,
    aten.sign: _at_zero,
    aten.leaky_relu: _at_zero,
    aten.threshold: _threshold,
    aten.hardtanh: _hardtanh,
    aten.hardtanh_: _hardtanh,
    aten.clamp: _clamp,
    aten.clamp_min: lambda a, k: _clamp((a[0], a[1], None), {}),
    aten.clamp_max: lambda a, k: _clamp((a[0], None, a[1]), {}),
    aten.maximum: _binary,
    aten.minimum: _binary,
    aten.gt: _binary,
    aten.ge: _binary,
    aten.lt: _binary,
    aten.le: _binary,
    aten.max: _reduce_max,
    aten.amax: _reduce_max,
    aten.argmax: _reduce_max,
    aten.min: _reduce_min,
    aten.amin: _reduce_min,
    aten.argmin: _reduce_min,
    aten.sort: _sort,
    aten.argsort: _sort,
    aten.topk: _topk,
    aten.max_pool1d: _maxpool_gap(1),
    aten.max_pool1d_with_indices: _maxpool_gap(1),
    aten.max_pool2d: _maxpool_gap(2),
    aten.max_pool2d_with_indices: _maxpool_gap(2),
    aten.max_pool3d: _maxpool_gap(3),
    aten.max_pool3d_with_indices: _maxpool_gap(3),
}


class KinkMonitor(TorchDispatchMode):
    """Records, for every kinked op a torch forward runs, each operand's signed distance to its kink.

    `records` is a list of (op name, distances, operand magnitude) in call order; two
    runs of one module in different dtypes give lists that pair up element by element."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, torch.Tensor, float]] = []
        self.low_precision_ops: set[str] = set()  # ops taking float64 to a lower precision

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Distances first: an in-place op (relu_, clamp_) overwrites its operand, and
        # measured afterwards every negative ReLU input would sit exactly on the kink.
        rule = _RULES.get(func.overloadpacket)
        got = None
        if rule is not None and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and args[0].numel():
            got = rule(args, kwargs)
            if got is not None:
                dist, operand = got
                scale = float(operand.detach().abs().max()) if operand.numel() else 0.0
                got = (dist.detach().to(torch.float64).reshape(-1).clone(), scale)
        out = func(*args, **kwargs)
        # A float64 value taken down to a lower precision: the model computes this part
        # in float32 whatever its dtype (constants created in float32 do not count).
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in torch_pytree.tree_leaves((args, kwargs))):
            if any(isinstance(o, torch.Tensor) and o.is_floating_point() and o.dtype != torch.float64
                   for o in torch_pytree.tree_leaves(out)):
                self.low_precision_ops.add(str(func))
        if got is not None:
            self.records.append((str(func), *got))
        return out

    def assert_away_from_kinks(self, float32_run: KinkMonitor) -> None:
        """Fail if a kinked operand of this (float64) run is within the float32 noise of its kink.

        `float32_run` ran the same module and inputs in float32. Each kinked op's noise is
        the largest |float32 - float64| difference of its distances, floored at EPS32
        times the operand's magnitude; the margin is NOISE_FACTOR times that."""
        names = [r[0] for r in self.records], [r[0] for r in float32_run.records]
        assert names[0] == names[1], "the float32 and float64 runs took different kinked ops"
        near = []
        for (name, d, scale), (_, d32, _) in zip(self.records, float32_run.records, strict=True):
            noise = float((d32 - d).abs().max()) if d.numel() else 0.0
            margin = NOISE_FACTOR * max(noise, EPS32 * scale)
            close = d.abs() <= margin
            if bool(close.any()):
                near.append(f"{name}: {int(close.sum())} operand(s) within {margin:.2g} of the kink, "
                            f"nearest {float(d.abs().min()):.2g} (operand scale {scale:.2g})")
        assert not near, "inputs within float32 rounding noise of a kink; choose others:\n" + "\n".join(near)


def assert_away_from_kinks(module: torch.nn.Module, *args, **kwargs) -> None:
    """Run a float32 `module` on float32 inputs, and a float64 copy on float64 copies, and
    fail if a kinked operand lies within NOISE_FACTOR times its float32 noise of its kink."""
    with torch.no_grad(), KinkMonitor() as run32:
        module(*args, **kwargs)
    with torch.no_grad(), KinkMonitor() as run64:
        copy.deepcopy(module).double()(*to_double(list(args)), **to_double(kwargs))
    run64.assert_away_from_kinks(run32)
