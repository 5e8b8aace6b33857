"""The model-library sweep: torchvision, timm and torch.nn models through the bridge.

Each `Case` builds a random-init model (never downloads weights) and its
example inputs. `check(case)` runs it the way a user would (`torch_to_jax`,
then `jax.jit(jax.value_and_grad(...))`) in float32 and in float64, and
compares with torch eager:

- float64 (x64 on, `model.double()`): forward and gradients (of a fixed
  random projection of every output, with respect to every parameter and
  the input) must agree with torch to `F64_FORWARD` / `F64_GRAD`, relative to
  each tensor's largest magnitude. Rounding is ~1e-16 there, so this is an
  exactness check, except in a chaotic net, where torch's own result moves
  further when the input moves by a few ulps: then `COND_MARGIN` times that
  movement is allowed (`conditioning`). Where a gradient disagrees, a central finite difference of
  torch's own float64 forward decides which side is right (torch's autograd
  is not always: see `finite_difference`), and the case records it.
- float32: deep random-init nets amplify rounding, so no fixed tolerance is
  machine-independent. The bridge's float32 result must be no farther from
  torch's float64 result than torch's own float32 result is, times
  `F32_MARGIN`, plus `F32_FLOOR` of the tensor's magnitude: the rule the
  OpInfo harness applies per element, here per tensor (norms).

A case also records whether it was fully translated or needed callbacks (a
submodule torch.export cannot capture, or an op without a lowering), read off
the traced program's `torch_call` equations, and the fallback warning.

Used by tools/models.py (`make models`: every case, writes docs/models.md) and
tests/test_model_zoo.py (the fast subset, in `make test`). torchvision and
timm live only in the models environment (.venv-models); see `import_torchvision`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from numerics import GRAD64_ISLAND_RTOL
from torch.utils._python_dispatch import TorchDispatchMode

import bridge

#: float64 agreement, relative to each tensor's largest magnitude.
F64_FORWARD = 1e-9
F64_GRAD = 1e-7
#: float32: |bridge32 - torch64| <= F32_MARGIN * |torch32 - torch64| + F32_FLOOR * |torch64| (norms).
F32_MARGIN = 4.0
#: float64: also allowed, this many times how far torch's own result moves when the input
#: moves by COND_STEP (relative): the model's conditioning (see `conditioning`).
COND_MARGIN = 10.0
COND_STEP = 1e-15
F32_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # "library/model"
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], tuple]


# ------------------------------------------------------------------ environment


_TORCHVISION_LIB = None


def import_torchvision():
    """Import torchvision beside the CPU torch build.

    PyPI's torchvision 0.28.0 wheel is a CUDA build: its C extension does not
    load next to torch's CPU wheel, and its import then registers fake
    kernels for `torchvision::nms` and `torchvision::qnms`, which fails
    ("operator torchvision::nms does not exist"). Defining the two schemas
    first lets the import succeed; the models swept here never call them
    (detection models, which do, are not in the sweep).
    """
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is None:
        try:
            torch.ops.torchvision.nms  # noqa: B018 (the real extension is loaded)
        except (AttributeError, RuntimeError):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_LIB = lib
    import torchvision

    return torchvision


# ------------------------------------------------------------------ the check


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Random running statistics, so eval-mode BatchNorm is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def _leaves(out: Any) -> list[torch.Tensor]:
    return [x for x in torch_pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _float_inputs(args: tuple) -> list[int]:
    """The inputs gradients are taken for: floating tensors with finite values (not -inf masks)."""
    return [i for i, a in enumerate(args)
            if isinstance(a, torch.Tensor) and a.is_floating_point() and bool(torch.isfinite(a).all())]


def _to(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def torch_reference(model: torch.nn.Module, args: tuple, weights: list[torch.Tensor] | None, seed: int = 1):
    """torch's outputs and gradients of `sum(out_i * w_i)` (params by name, inputs as `arg<i>`)."""
    model.zero_grad(set_to_none=True)
    wrt = _float_inputs(args)
    targs = tuple(a.detach().clone().requires_grad_(True) if i in wrt else a for i, a in enumerate(args))
    outs = _leaves(model(*targs))
    if weights is None:
        gen = torch.Generator().manual_seed(seed)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True) if o.is_floating_point())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"arg{i}": targs[i].grad.detach().clone() for i in wrt if targs[i].grad is not None})
    model.zero_grad(set_to_none=True)
    return [o.detach() for o in outs], grads, weights


def _count_torch_calls(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "torch_call":
            n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_torch_calls(inner)
    return n


def bridge_run(model: torch.nn.Module, args: tuple, weights: list[torch.Tensor]):
    """The bridge's outputs and gradients, as a user gets them: jit(value_and_grad)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply, params = bridge.torch_to_jax(model)
        jargs = [bridge.to_jax(a) if isinstance(a, torch.Tensor) else a for a in args]
        wrt = _float_inputs(args)
        dtype = next(iter(params.values())).dtype if params else jax.numpy.float32
        jweights = [jax.numpy.asarray(w.numpy()).astype(dtype) for w in weights]

        def loss(p, diff):
            full = list(jargs)
            for i, a in zip(wrt, diff, strict=True):
                full[i] = a
            outs = jax.tree_util.tree_leaves(apply(p, *full))
            total = sum((o * w.astype(o.dtype)).sum() for o, w in zip(outs, jweights, strict=True)
                        if jax.numpy.issubdtype(o.dtype, jax.numpy.floating))
            return total, outs

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        diff = [jargs[i] for i in wrt]
        traced = step.trace(params, diff)  # one trace: its program is counted, then compiled
        calls = _count_torch_calls(traced.jaxpr.jaxpr)
        (_, outs), (gp, ga) = traced.lower().compile()(params, diff)
    grads = {n: np.asarray(g) for n, g in gp.items()}
    grads.update({f"arg{i}": np.asarray(g) for i, g in zip(wrt, ga, strict=True)})
    notes = [str(w.message) for w in caught if "callback" in str(w.message)]
    return [np.asarray(o) for o in outs], grads, calls, notes


def _rel(got: np.ndarray, want: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference over the largest magnitude (at least `floor`); non-finite
    values must sit where torch has the same ones."""
    want = want.detach().to(torch.float64).numpy()
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite], want[~finite], equal_nan=True) or not np.isfinite(got[finite]).all():
        return math.inf
    if not finite.any():
        return 0.0
    scale = max(float(np.max(np.abs(want[finite]))), floor)
    err = float(np.max(np.abs(got[finite] - want[finite])))
    return err / scale if scale > 0 else err


def _f32_ratio(b32: np.ndarray, t32: torch.Tensor, t64: torch.Tensor) -> float:
    """The per-tensor rule, as bridge32's distance from torch64 over its bound (at most 1
    passes): no farther than torch32 is, times the margin, plus the floor."""
    ref = t64.detach().to(torch.float64).numpy()
    b = np.asarray(b32, dtype=np.float64)
    if b.shape != ref.shape:
        return math.inf
    t = t32.detach().to(torch.float64).numpy()
    eb = float(np.linalg.norm(b - ref))
    bound = F32_MARGIN * float(np.linalg.norm(t - ref)) + F32_FLOOR * float(np.linalg.norm(ref))
    if math.isnan(eb) or math.isnan(bound):
        return math.inf
    return eb / bound if bound > 0 else (0.0 if eb == 0 else math.inf)


def float32_islands(model64: torch.nn.Module, args64: tuple) -> set[str]:
    """The ops of torch's float64 forward that give float32 (or lower) values."""
    found: set[str] = set()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Also float32 values the model creates itself (timm's XCiT builds its
            # Fourier position encoding with float32 aranges): both sides round them.
            if any(isinstance(o, torch.Tensor) and o.is_floating_point() and o.dtype != torch.float64
                   for o in torch_pytree.tree_leaves(out)):
                found.add(str(func))
            return out

    with torch.no_grad(), Watch():
        model64(*args64)
    return found


def conditioning(model64: torch.nn.Module, args64: tuple, weights: list[torch.Tensor],
                 out64: list[torch.Tensor], grad64: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """How much torch's own float64 results move when the input moves by a few ulps.

    Deep random-init nets (BatchNorm statistics randomised) can be chaotic: in
    timm's efficientnetv2_rw_t a 1e-15 relative change of the input moves torch's
    float64 output by 3e-6 and a gradient by 5e-4. Two correct float64 programs
    that round differently then differ by as much, so the float64 check allows
    `COND_MARGIN` times this movement (and never less than F64_FORWARD / F64_GRAD)."""
    inputs = _float_inputs(args64)
    if not inputs:
        return 0.0, {}
    gen = torch.Generator().manual_seed(7)
    moved = tuple(a * (1 + COND_STEP * torch.randn(a.shape, generator=gen, dtype=a.dtype)) if i in inputs else a
                  for i, a in enumerate(args64))
    out, grads, _ = torch_reference(model64, moved, weights)
    d_out = max((_rel(o.numpy(), t) for o, t in zip(out, out64, strict=True)), default=0.0)
    d_grad = {n: _rel(g.numpy(), grad64[n]) for n, g in grads.items() if n in grad64}
    return d_out, d_grad


def finite_difference(model64: torch.nn.Module, args64: tuple, weights: list[torch.Tensor], name: str,
                      index: int, eps: float = 1e-6) -> float:
    """d loss / d name[index] by a central difference of torch's float64 forward."""
    if name.startswith("arg"):
        target = args64[int(name[3:])]
    else:
        target = dict(model64.named_parameters())[name]
    flat = target.data.view(-1)
    old = flat[index].item()
    h = eps * max(1.0, abs(old))
    vals = []
    with torch.no_grad():
        for sign in (1, -1):
            flat[index] = old + sign * h
            outs = _leaves(model64(*args64))
            vals.append(sum((o * w).sum() for o, w in zip(outs, weights, strict=True)
                            if o.is_floating_point()).item())
        flat[index] = old
    return (vals[0] - vals[1]) / (2 * h)


def check(case: Case, seed: int = 0) -> dict:
    """Run one case; returns its record (see tools/models.py for the fields)."""
    record: dict[str, Any] = {"name": case.name, "family": case.family}
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # the sweep runs cases side by side; torch's threads would contend
    torch.manual_seed(seed)
    model = case.build().eval()
    randomise_batchnorm(model, seed)
    args = case.inputs(torch.Generator().manual_seed(seed))
    record["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)

    # Fresh copies before any forward: a module may cache tensors computed in its first
    # eval forward (timm's EfficientFormer caches its attention biases), and every run
    # below must start from the same untouched module.
    m64 = copy.deepcopy(model).double()
    m64_moved, m64_bridge, m32_bridge = copy.deepcopy(m64), copy.deepcopy(m64), copy.deepcopy(model)
    args64 = _to(args, torch.float64)
    t_out64, t_grad64, weights = torch_reference(m64, args64, None)
    t_out32, t_grad32, _ = torch_reference(model, args, weights)

    # float64: exactness, to the model's own float64 conditioning.
    cond_out, cond_grad = conditioning(m64_moved, args64, weights, t_out64, t_grad64)
    with jax.enable_x64(True):
        b_out64, b_grad64, calls64, _ = bridge_run(m64_bridge, args64, weights)
    fwd64 = max((_rel(b, t) for b, t in zip(b_out64, t_out64, strict=True)), default=0.0)
    # A gradient that is zero but for float64 noise (1e-22) is compared with the others' scale.
    scale = max((float(g.abs().max()) for g in t_grad64.values() if g.numel()), default=0.0)
    grad64 = {n: _rel(b_grad64.get(n, np.zeros(0)), g, floor=1e-6 * scale) for n, g in t_grad64.items()}
    # A model that computes parts in float32 whatever its dtype (timm's LiteMLA calls .float())
    # is float32-exact there: tests/numerics.py's island tolerance.
    island = float32_islands(m64, args64)
    record["float32_islands"] = sorted(island)
    floor_f, floor_g = (GRAD64_ISLAND_RTOL, GRAD64_ISLAND_RTOL) if island else (F64_FORWARD, F64_GRAD)
    bounds = {n: max(floor_g, COND_MARGIN * cond_grad.get(n, 0.0)) for n in grad64}
    worst = max(grad64, key=lambda n: grad64[n] / bounds[n]) if grad64 else None
    record["f64_forward"] = fwd64
    record["f64_forward_bound"] = max(floor_f, COND_MARGIN * cond_out)
    record["f64_grad"] = grad64[worst] if worst else 0.0
    record["f64_grad_bound"] = bounds[worst] if worst else F64_GRAD
    record["f64_worst"] = worst
    if worst and grad64[worst] > bounds[worst] and np.shape(b_grad64.get(worst)) == tuple(t_grad64[worst].shape):
        # Who is right? A finite difference of torch's float64 forward at the worst element.
        diff = np.abs(np.asarray(b_grad64[worst]) - t_grad64[worst].numpy()).reshape(-1)
        idx = int(np.argmax(diff))
        fd = finite_difference(m64, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args64),
                               weights, worst, idx)
        record["fd"] = {"param": worst, "index": idx, "finite_difference": fd,
                        "bridge": float(np.asarray(b_grad64[worst]).reshape(-1)[idx]),
                        "torch": float(t_grad64[worst].reshape(-1)[idx])}

    # float32: as close to the truth as torch's own float32.
    b_out32, b_grad32, calls32, notes = bridge_run(m32_bridge, args, weights)
    ratio_f = max((_f32_ratio(b, t32, t64) for b, t32, t64 in zip(b_out32, t_out32, t_out64, strict=True)),
                  default=0.0)
    ratios_g = {n: _f32_ratio(b_grad32.get(n, np.zeros(0)), t_grad32[n], g64) for n, g64 in t_grad64.items()}
    worst32 = max(ratios_g, key=ratios_g.get) if ratios_g else None
    ratio_g = ratios_g[worst32] if worst32 else 0.0
    record["f32_grad_worst"] = worst32
    if not ratio_g <= 1.0:
        record["kinks"] = near_kinks(model, args)
    record["f32_forward_ratio"] = ratio_f
    record["f32_grad_ratio"] = ratio_g
    record["callbacks"] = max(calls32, calls64)
    record["fallback"] = notes[0] if notes else ""
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["status"] = verdict(record)
    return record


def near_kinks(model: torch.nn.Module, args: tuple) -> str:
    """Kinked operands (ReLU inputs, max-pool near-ties, ...) within float32 noise of the kink.

    There a float32 gradient is decided by rounding: the bridge's and torch's float32
    programs round differently and may take different sides, each side's gradient
    being right for its forward. tests/numerics.py's KinkMonitor measures it."""
    from numerics import KinkMonitor

    with torch.no_grad(), KinkMonitor() as run32:
        model(*args)
    with torch.no_grad(), KinkMonitor() as run64:
        copy.deepcopy(model).double()(*_to(args, torch.float64))
    try:
        run64.assert_away_from_kinks(run32)
    except AssertionError as e:
        lines = str(e).split("\n")[1:]
        return f"{len(lines)} kinked op(s) with operands within float32 noise, e.g. {lines[0]}"
    return ""


def verdict(r: dict) -> str:
    """"pass", or what failed."""
    bad = []
    if not r["f64_forward"] <= r.get("f64_forward_bound", F64_FORWARD):
        bad.append("f64 forward")
    if not r["f64_grad"] <= r.get("f64_grad_bound", F64_GRAD):
        fd = r.get("fd")
        # torch is the wrong side when the finite difference is far closer to the bridge.
        torch_wrong = fd and abs(fd["torch"] - fd["finite_difference"]) > 10 * abs(fd["bridge"] - fd["finite_difference"])
        bad.append("f64 grad (torch autograd is the wrong side)" if torch_wrong else "f64 grad")
    if not r["f32_forward_ratio"] <= 1.0:
        bad.append("f32 forward")
    if not r["f32_grad_ratio"] <= 1.0 and not r.get("kinks"):
        bad.append("f32 grad")
    if bad == ["f64 grad (torch autograd is the wrong side)"]:
        return "pass (torch's autograd disagrees with its finite difference)"
    if not bad and r.get("kinks"):
        return "pass (f32 grad decided by rounding at a kink; float64 exact)"
    return "pass" if not bad else "FAIL: " + ", ".join(bad)


# ------------------------------------------------------------------ the cases


def _image(n: int, c: int, h: int, w: int | None = None):
    return lambda gen: (torch.randn(n, c, h, w or h, generator=gen),)


#: torchvision classification models above this many parameters are left out (the issue's bound).
TORCHVISION_MAX_PARAMS = 40_000_000
#: Input sizes where 64x64 is too small or the model fixes its size.
_TV_SIZE = {"inception_v3": 96, "maxvit_t": 224, "googlenet": 64}


def _torchvision_case(tv, name: str) -> Case:
    if name in _TV_SEGMENTATION:
        builder = getattr(tv.models.segmentation, name)
        return Case(f"torchvision/{name}", "torchvision segmentation",
                    lambda: builder(weights=None, weights_backbone=None), _image(2, 3, 64))
    if name == "r3d_18":
        return Case("torchvision/r3d_18", "torchvision video", lambda: tv.models.video.r3d_18(weights=None),
                    lambda gen: (torch.randn(1, 3, 8, 64, 64, generator=gen),))
    builder = tv.models.get_model_builder(name)
    kwargs = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return Case(f"torchvision/{name}", "torchvision classification", lambda: builder(**kwargs),
                _image(2, 3, _TV_SIZE.get(name, 64)))


_TV_SEGMENTATION = ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large")


def _parameter_count(case: Case) -> int:
    try:
        with torch.device("meta"):  # no memory, no init
            return sum(p.numel() for p in case.build().parameters())
    except NotImplementedError:  # a builder that reads tensor values (regnet)
        return sum(p.numel() for p in case.build().parameters())


def torchvision_cases() -> list[Case]:
    """Every torchvision classification model under 40M parameters, segmentation and video models."""
    tv = import_torchvision()
    cases = [_torchvision_case(tv, n) for n in sorted(tv.models.list_models(module=tv.models))]
    cases = [c for c in cases if _parameter_count(c) <= TORCHVISION_MAX_PARAMS]
    return cases + [_torchvision_case(tv, n) for n in (*_TV_SEGMENTATION, "r3d_18")]


#: timm architectures by family (random init; the smallest variant of each).
TIMM_MODELS = {
    "ResNet family": [
        "resnet18", "resnet26d", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t",
        "res2net50_14w_8s", "resnest14d", "skresnet18", "regnetx_002", "regnety_002", "regnetz_b16",
        "dla34", "dpn48b", "cspresnet50", "hrnet_w18_small", "repvgg_a0",
        "selecsls42b", "densenet121", "ese_vovnet19b_dw", "nf_resnet26", "gernet_s",
        "bat_resnext26ts", "lambda_resnet26t", "gcresnet33ts",
        "inception_v3", "hgnetv2_b0", "botnet26t_256", "halonet26t",
    ],
    "EfficientNet/MobileNet family": [
        "efficientnet_b0", "efficientnetv2_rw_t",
        "mobilenetv3_small_050", "mobilenetv3_large_100", "mobilenetv4_conv_small",
        "mnasnet_050", "fbnetc_100", "tinynet_a", "mixnet_s",
        "ghostnet_100", "lcnet_050", "rexnet_100", "mobileone_s0", "repghostnet_050",
        "efficientvit_b0", "mobilevit_xxs", "mobilevitv2_050", "fastvit_t8",
    ],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto", "inception_next_tiny"],
    "ViT/DeiT/Swin/BEiT/EVA": [
        "vit_tiny_patch16_224", "vit_relpos_small_patch16_224",
        "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
        "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "beit_base_patch16_224",
        "beitv2_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
        "pit_ti_224", "crossvit_tiny_240", "twins_svt_small", "pvt_v2_b0", "convit_tiny",
        "tnt_s_patch16_224", "hiera_tiny_224", "volo_d1_224", "mvitv2_tiny",
    ],
    "hybrid conv-attention": [
        "coatnet_nano_rw_224", "maxvit_nano_rw_256",
        "efficientformer_l1", "efficientformerv2_s0", "levit_128s", "levit_conv_128s", "edgenext_xx_small",
        "tiny_vit_5m_224", "gcvit_xxtiny", "davit_tiny", "efficientvit_m0", "poolformer_s12",
        "caformer_s18", "visformer_tiny", "focalnet_tiny_srf",
        "coat_lite_tiny", "repvit_m0_9", "starnet_s1",
    ],
    "MLP-style": ["mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224"],
    "recurrent": ["sequencer2d_s"],
}
#: Input sides where 64x64 is too small for torch itself (timm's default input is 224 or more).
_TIMM_SIZE = {"inception_v3": 96, "bat_resnext26ts": 256, "halonet26t": 256}
#: Reduced depth for architectures timm only has in large sizes (same blocks, fewer of them).
_TIMM_KWARGS = {"beit_base_patch16_224": {"depth": 2}, "beitv2_base_patch16_224": {"depth": 2}}


def timm_cases() -> list[Case]:
    import_torchvision()
    import timm

    known = set(timm.list_models())
    return [_timm_case(timm, family, name, known) for family, names in TIMM_MODELS.items() for name in names]


def _timm_case(timm, family: str, name: str, known: set[str]) -> Case:
    if name not in known:
        raise LookupError(f"timm {timm.__version__} has no model {name!r}")
    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    size = cfg.get("input_size", (3, 224, 224))
    if not cfg.get("fixed_input_size", False):
        side = _TIMM_SIZE.get(name, 64)
        size = (size[0], side, side)
    kwargs = dict(pretrained=False, **_TIMM_KWARGS.get(name, {}))
    return Case(f"timm/{name}", f"timm {family}", lambda: timm.create_model(name, **kwargs),
                _image(2, *size))


class DataDependentBranch(torch.nn.Module):
    """A Python branch on a tensor's value in a submodule: falls back for that submodule only."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        self.gate = _Gate()
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.gate(torch.relu(self.inp(x))))


class _Gate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)

    def forward(self, x):
        if x.mean() > 0.1:  # decided by the data
            return torch.tanh(self.a(x))
        return self.b(x) * 0.5


class ItemLoop(torch.nn.Module):
    """`.item()` feeding Python control flow: a loop count read from the data."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, steps):
        for _ in range(int(steps.item())):
            x = torch.tanh(self.proj(x))
        return x


class _CausalTransformer(torch.nn.Module):
    """nn.Transformer with a causal `tgt_mask` (torch's `_detect_is_causal_mask` reads its values)."""

    def __init__(self) -> None:
        super().__init__()
        self.t = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                      dim_feedforward=64, dropout=0.0, batch_first=True)

    def forward(self, src, tgt, tgt_mask):
        return self.t(src, tgt, tgt_mask=tgt_mask)


def _transformer_inputs(gen):
    src = torch.randn(2, 7, 32, generator=gen)
    tgt = torch.randn(2, 5, 32, generator=gen)
    return src, tgt, torch.nn.Transformer.generate_square_subsequent_mask(5)


class _NestedEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


def _padded(gen):
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    return torch.randn(2, 6, 32, generator=gen), pad


def torch_nn_cases() -> list[Case]:
    return [
        Case("torch.nn/Transformer (causal tgt_mask)", "torch.nn", _CausalTransformer, _transformer_inputs),
        Case("torch.nn/TransformerEncoder (enable_nested_tensor, padding mask)", "torch.nn",
             _NestedEncoder, _padded),
        Case("own/data-dependent branch in a submodule", "own", DataDependentBranch,
             lambda gen: (torch.randn(3, 16, generator=gen),)),
        Case("own/.item() loop count", "own", ItemLoop,
             lambda gen: (torch.randn(3, 8, generator=gen), torch.tensor(3))),
    ]


def all_cases() -> list[Case]:
    return torch_nn_cases() + torchvision_cases() + timm_cases()


#: make test's subset (tests/test_model_zoo.py): a few minutes, every library.
FAST = (
    "torch.nn/Transformer (causal tgt_mask)",
    "torch.nn/TransformerEncoder (enable_nested_tensor, padding mask)",
    "own/data-dependent branch in a submodule",
    "own/.item() loop count",
    "torchvision/resnet18",
    "torchvision/mobilenet_v3_small",
    "torchvision/squeezenet1_1",
    "timm/vit_tiny_patch16_224",
    "timm/convnext_atto",
    "timm/mixer_s16_224",
)


def find_case(name: str) -> Case:
    """One case by name, without listing (or building) the others."""
    library, _, model = name.partition("/")
    if library == "torchvision":
        return _torchvision_case(import_torchvision(), model)
    if library == "timm":
        import_torchvision()
        import timm

        family = next(f for f, names in TIMM_MODELS.items() if model in names)
        return _timm_case(timm, family, model, {model})
    return next(c for c in torch_nn_cases() if c.name == name)
