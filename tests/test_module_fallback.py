"""Module-level fallback: submodules torch.export cannot capture run in torch.

A Python decision on a tensor's value (nn.Transformer's causal-mask check,
`if x.sum() > 0:`, `.item()` feeding control flow) stops torch.export; the
innermost submodule that makes it runs through a torch callback inside the
otherwise translated program (bridge/fallback.py). Forward parity in float32
(1e-5 relative), gradients against torch autograd in float64 on both sides.

Not marked `xla`: jax 0.7.1 (the torch_xla environment) aborts when a host
callback follows a matmul in one jitted CPU program (see test_hybrid.py).
"""

from __future__ import annotations

import copy
import warnings

import jax
import numpy as np
import pytest
import torch
from numerics import GRAD64_RTOL, enable_x64, relative_errors, to_double
from torch import nn

import bridge
from bridge.fallback import FallbackError
from bridge.ops.registry import DataDependentShapeError

FWD = dict(rtol=1e-5, atol=1e-6)


def transformer() -> nn.Transformer:
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
        dropout=0.0, activation="gelu", batch_first=True,
    ).eval()


def transformer_inputs():
    torch.manual_seed(1)
    return torch.randn(2, 5, 8), torch.randn(2, 4, 8), nn.Transformer.generate_square_subsequent_mask(4)


class Branchy(nn.Module):
    """A child whose forward branches on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return torch.tanh(self.lin(x))
        return -x


class Scaled(nn.Module):
    """A child that turns a tensor into a Python number and branches on it."""

    def forward(self, x):
        peak = x.abs().max().item()
        if peak > 1.0:
            return x / peak
        return x


class NumpyRead(nn.Module):
    """A child that reads a tensor's values through NumPy."""

    def forward(self, x):
        return x * float(np.asarray(x.detach()).max())


class Net(nn.Module):
    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), child)
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(torch.sin(self.block(self.pre(x))))


class RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        y = self.lin(x)
        if y.mean() > 0:
            return y * 2
        return torch.cos(y)


def converted(module, *args, **kwargs):
    """torch_to_jax(module) and its first jitted output; the fallback warning's text."""
    apply, params = bridge.torch_to_jax(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.jit(apply)(params, *bridge.to_jax(args), **bridge.to_jax(kwargs))
    messages = [str(w.message) for w in caught if "cannot capture" in str(w.message)]
    assert len(messages) == 1, messages
    return apply, params, out, messages[0]


def check_float64_gradients(module, args, kwargs=None, wrt_args=(0,)):
    """jax.grad (under jit, x64) of a random projection of the output against torch autograd, float64."""
    kwargs = kwargs or {}
    m64 = copy.deepcopy(module).double()
    args64 = [a.clone().double().requires_grad_(i in wrt_args) for i, a in enumerate(to_double(list(args)))]
    kwargs64 = to_double(kwargs)
    out = m64(*args64, **kwargs64)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out * weight).sum().backward()
    expected = {n: p.grad for n, p in m64.named_parameters()}
    expected.update({f"arg{i}": args64[i].grad for i in wrt_args})
    with enable_x64(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply, params = bridge.torch_to_jax(m64)
        jargs = [bridge.to_jax(a.detach()) for a in args64]
        jkwargs = bridge.to_jax(kwargs64)

        def loss(p, diff):
            full = list(jargs)
            for i, a in zip(wrt_args, diff, strict=True):
                full[i] = a
            return (apply(p, *full, **jkwargs) * bridge.to_jax(weight)).sum()

        pgrads, agrads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, [jargs[i] for i in wrt_args])
    got = {n: np.asarray(g) for n, g in pgrads.items()}
    got.update({f"arg{i}": np.asarray(g) for i, g in zip(wrt_args, agrads, strict=True)})
    assert all(g.dtype == np.float64 for g in got.values())
    errors = relative_errors(got, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD64_RTOL, (worst, errors[worst])


def test_transformer_with_a_causal_mask_falls_back_for_its_decoder_only():
    m = transformer()
    src, tgt, mask = transformer_inputs()
    apply, params, out, message = converted(m, src, tgt, tgt_mask=mask)
    # the decoder's forward compares the mask with a causal one: only it runs in torch
    assert "'decoder' (TransformerDecoder)" in message and "_detect_is_causal_mask" in message
    assert "'encoder'" not in message
    np.testing.assert_allclose(np.asarray(out), m(src, tgt, tgt_mask=mask).detach().numpy(), **FWD)
    hlo = jax.jit(apply).lower(params, *bridge.to_jax((src, tgt)), tgt_mask=bridge.to_jax(mask)).as_text()
    assert hlo.count("custom_call") == 1  # the encoder is translated, the decoder one callback
    check_float64_gradients(m, (src, tgt), {"tgt_mask": mask}, wrt_args=(0, 1))
    # vmap over examples: the decoder runs once, batched by torch.func.vmap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-example capture warns again
        batched = jax.vmap(lambda s, t: apply(params, s, t, tgt_mask=bridge.to_jax(mask)))(
            bridge.to_jax(src[:, None]), bridge.to_jax(tgt[:, None])
        )
    np.testing.assert_allclose(np.asarray(batched)[:, 0], m(src, tgt, tgt_mask=mask).detach().numpy(), **FWD)


LINES = {Branchy: "if x.sum() > 0", Scaled: "if peak > 1.0", NumpyRead: "np.asarray(x.detach()).max()"}


@pytest.mark.parametrize("child", [Branchy, Scaled, NumpyRead], ids=["if-sum", "item", "numpy"])
def test_a_branching_child_is_the_only_part_in_torch(child):
    torch.manual_seed(0)
    m = Net(child())
    x = torch.randn(5, 3)
    apply, params, out, message = converted(m, x)
    assert "'block.1'" in message and "test_module_fallback.py" in message
    assert "'block' (" not in message  # the smallest submodule, not its parent
    assert LINES[child] in message
    np.testing.assert_allclose(np.asarray(out), m(x).detach().numpy(), **FWD)
    # both branches, on inputs that take the other one
    for scale in (-3.0, 3.0):
        np.testing.assert_allclose(
            np.asarray(jax.jit(apply)(params, bridge.to_jax(x * scale))), m(x * scale).detach().numpy(), **FWD
        )
    check_float64_gradients(m, (x,))


class PassesAValue(nn.Module):
    """Computes a Python number from a tensor and hands it to a child that branches on it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.child = Doubler()

    def forward(self, x):
        return self.child(self.lin(x), x.abs().max().item())


class Doubler(nn.Module):
    def forward(self, x, n):
        if n > 1:
            return x * 2
        return x


def test_a_child_branching_on_a_value_its_caller_computed_falls_back_with_the_caller():
    torch.manual_seed(0)
    m = nn.Sequential(PassesAValue(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    apply, params, out, message = converted(m, x)
    assert "'0' (PassesAValue): passes submodule '0.child' a value computed from a tensor" in message
    assert "if n > 1" in message
    np.testing.assert_allclose(np.asarray(out), m(x).detach().numpy(), **FWD)


def test_vmap_through_a_value_dependent_branch_is_a_clear_error():
    torch.manual_seed(0)
    m = Net(Branchy())
    apply, params = bridge.torch_to_jax(m)
    xs = bridge.to_jax(torch.randn(3, 5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (a CallbackError, raised inside the jitted program)
        with pytest.raises(Exception, match="torch.func.vmap could not batch submodule 'block.1'"):
            jax.vmap(apply, in_axes=(None, 0))(params, xs)


def test_the_root_itself_runs_in_torch_with_the_same_warning():
    torch.manual_seed(0)
    m = RootBranch()
    x = torch.randn(4, 3)
    apply, params, out, message = converted(m, x)
    assert "'<root>' (RootBranch)" in message and "if y.mean() > 0" in message
    np.testing.assert_allclose(np.asarray(out), m(x).detach().numpy(), **FWD)
    check_float64_gradients(m, (x,))


def test_strict_raises_the_capture_error_naming_the_submodule_and_the_fix():
    apply, params = bridge.torch_to_jax(Net(Branchy()), strict=True)
    with pytest.raises(bridge.CaptureError) as info:
        apply(params, jax.numpy.ones((5, 3)))
    message = str(info.value)
    assert "if x.sum() > 0" in message and "submodule 'block.1'" in message
    assert "strict=False" in message and "mode='callback'" in message


class NormBranch(nn.Module):
    """A branching submodule with a BatchNorm: train mode updates its statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.norm(x) * 2
        return self.norm(x)


@pytest.mark.parametrize("where", ["child", "root"])
def test_buffer_updates_of_a_fallen_back_submodule_come_back_as_state(where):
    torch.manual_seed(0)
    m = (Net(NormBranch()) if where == "child" else NormBranch()).train()
    x = torch.randn(6, 3 if where == "child" else 4)
    apply, params = bridge.torch_to_jax(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="torch_to_jax_with_state"):
            apply(params, bridge.to_jax(x))
        apply, params, state = bridge.torch_to_jax_with_state(m)
        out, new_state = jax.jit(apply)(params, state, bridge.to_jax(x))
    reference = copy.deepcopy(m)
    expected = reference(x)
    np.testing.assert_allclose(np.asarray(out), expected.detach().numpy(), **FWD)
    for name, buffer in reference.named_buffers():
        np.testing.assert_allclose(np.asarray(new_state[name]), buffer.numpy(), **FWD)
    # the module and the state passed in are unchanged
    prefix = "block.1.norm." if where == "child" else "norm."
    assert int(m.get_buffer(prefix + "num_batches_tracked")) == 0
    np.testing.assert_array_equal(np.asarray(state[prefix + "running_mean"]), np.zeros(4))


def test_gradients_through_a_fallen_back_train_mode_batchnorm_match_torch_in_float64():
    torch.manual_seed(0)
    m = Net(NormBranch()).train().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    reference = copy.deepcopy(m)
    out = reference(x)
    (out**2).sum().backward()
    with enable_x64(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply, params, state = bridge.torch_to_jax_with_state(m)

        def loss(p):
            o, new_state = apply(p, state, bridge.to_jax(x))
            return (o**2).sum(), new_state

        grads, new_state = jax.jit(jax.grad(loss, has_aux=True))(params)
    errors = relative_errors(grads, {n: p.grad for n, p in reference.named_parameters()})
    assert max(errors.values()) <= GRAD64_RTOL, errors
    for name, buffer in reference.named_buffers():
        np.testing.assert_allclose(np.asarray(new_state[name]), buffer.numpy(), rtol=1e-12)


def test_modules_with_nothing_to_fall_back_are_unchanged():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    apply, params = bridge.torch_to_jax(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply(params, jax.numpy.ones((2, 3)))
    assert all(not c.opaque for c in apply.converted.captures.values())


class ReturnsANumber(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x, 1.0
        return x, 2.0


class UsesTheNumber(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = ReturnsANumber()

    def forward(self, x):
        y, k = self.child(x)
        return y * k


def test_a_submodule_returning_a_python_number_cannot_fall_back_and_says_why():
    apply, params = bridge.torch_to_jax(UsesTheNumber())
    with pytest.raises(FallbackError, match="'child'.*returns a Python float computed in torch"):
        apply(params, jax.numpy.ones((2, 3)))


class Prefix(nn.Module):
    """Output shape set by values: as many rows as x has nonzero entries."""

    def forward(self, x):
        return x[: int((x != 0).sum())]


def test_a_submodule_whose_output_shape_depends_on_values_is_a_clear_error():
    torch.manual_seed(0)
    apply, params = bridge.torch_to_jax(nn.Sequential(nn.Linear(3, 3), Prefix()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataDependentShapeError, match="output shapes of submodule '1' .Prefix. depend on the values"):
            apply(params, jax.numpy.ones((4, 3)))


class ScaleBy(nn.Module):
    """A child that branches on a value and multiplies an int tensor by a static scale."""

    def forward(self, ids, scale):
        if ids.sum() > 0:
            return ids * scale
        return -ids * scale


class TwoScales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = ScaleBy()

    def forward(self, ids):
        # 2 and 2.0 are equal and hash alike, but torch gives int32 for one and float32 for the other.
        return self.child(ids, 2), self.child(ids, 2.0)


def test_a_fallen_back_child_keeps_apart_static_arguments_of_another_type():
    ids = torch.arange(1, 4, dtype=torch.int32)
    apply, params, out, _ = converted(TwoScales(), ids)
    for got, expected in zip(out, TwoScales()(ids), strict=True):
        assert got.dtype == bridge.dtypes.to_jax_dtype(expected.dtype)
        np.testing.assert_array_equal(np.asarray(got), expected.numpy())
