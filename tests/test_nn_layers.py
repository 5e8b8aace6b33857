"""torch.nn layers and small networks nobody here wrote, translated to JAX.

Each case, in float32: forward parity under jax.jit (max relative error 1e-4
against torch eager), gradient parity of every parameter and the input (jax.grad
against torch.autograd, 1e-3) on inputs asserted to lie away from every kink
(ReLU, max-pool, ...) by ten times their float32 noise, and jax.vmap over an
extra batch axis matching a Python loop. And in float64 on both sides
(tests/numerics.py): the same gradients at 1e-9 (measured: <= 1e-15), where a
derivative is checked exactly."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import GRAD64_RTOL, KinkMonitor, assert_away_from_kinks, float64_gradients
from torch import nn

import bridge
from bridge.ops import LOWERINGS


class SDPA(nn.Module):
    def __init__(self, mask: str):
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.mask = mask

    def forward(self, x):
        q, k, v = self.proj(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        if self.mask == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = x.shape[1]
        if self.mask == "bool":
            m = torch.ones(t, t, dtype=torch.bool).tril()
            m[:, 0] = True
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        bias = torch.linspace(-1.0, 1.0, t * t).reshape(t, t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Recurrent(nn.Module):
    def __init__(self, cell: type):
        super().__init__()
        self.rnn = cell(6, 8, num_layers=2, batch_first=True)

    def forward(self, x):
        out, _ = self.rnn(x)
        return out


class Interp(nn.Module):
    def __init__(self, mode: str, **kw):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.mode, self.kw = mode, kw

    def forward(self, x):
        return F.interpolate(self.conv(x), scale_factor=2, mode=self.mode, **self.kw)


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


# name -> (module factory, input factory); inputs are float unless noted
CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3)), lambda: _r(4, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 2, stride=2)), lambda: _r(2, 3, 10)),
    "conv2d-groups-dilation": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), lambda: _r(2, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), lambda: _r(1, 2, 5, 5, 5)),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), lambda: _r(2, 3, 5, 5)),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(3, 2, 4, stride=2), lambda: _r(2, 3, 7)),
    "batchnorm-eval": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), lambda: _r(2, 3, 6, 6)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), lambda: _r(3, 5, 8)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(4, 6, 1), nn.GroupNorm(3, 6)), lambda: _r(2, 4, 5, 5)),
    "embedding": (lambda: nn.Embedding(20, 8, padding_idx=0), lambda: torch.tensor([[0, 3, 19], [7, 7, 1]])),
    "lstm": (lambda: Recurrent(nn.LSTM), lambda: _r(2, 5, 6)),
    "gru": (lambda: Recurrent(nn.GRU), lambda: _r(2, 5, 6)),
    "multihead-attention": (lambda: _MHA(), lambda: _r(2, 5, 16)),
    "transformer-encoder": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2), lambda: _r(2, 5, 16)),
    "transformer-decoder": (lambda: _Decoder(), lambda: _r(2, 5, 16)),
    "pooling": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2), nn.AvgPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(1)), lambda: _r(2, 2, 12, 12)),
    "maxpool1d-avgpool1d": (lambda: nn.Sequential(nn.Conv1d(2, 2, 1), nn.MaxPool1d(3, stride=2, padding=1), nn.AvgPool1d(2)), lambda: _r(2, 2, 11)),
    "interpolate-nearest": (lambda: Interp("nearest"), lambda: _r(1, 2, 4, 5)),
    "interpolate-bilinear": (lambda: Interp("bilinear", align_corners=False), lambda: _r(1, 2, 4, 5)),
    "interpolate-bilinear-aligned": (lambda: Interp("bilinear", align_corners=True), lambda: _r(1, 2, 4, 5)),
    "sdpa-causal": (lambda: SDPA("causal"), lambda: _r(2, 6, 16)),
    "sdpa-bool-mask": (lambda: SDPA("bool"), lambda: _r(2, 6, 16)),
    "sdpa-float-mask": (lambda: SDPA("float"), lambda: _r(2, 6, 16)),
}


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        mask[0, -1] = True  # key padding on the first sequence
        out, weights = self.attn(x, x, x, key_padding_mask=mask)
        return out, weights


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)

    def forward(self, x):
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        # tgt_is_causal=True: otherwise torch compares the mask with a causal one
        # (a data-dependent branch torch.export cannot capture).
        return self.dec(x, x.flip(1), tgt_mask=causal, tgt_is_causal=True)


def rel_err(got, expected: torch.Tensor) -> float:
    e = expected.detach().double().numpy()
    g = np.asarray(got, dtype=np.float64)
    assert g.shape == e.shape, (g.shape, e.shape)
    return float(np.abs(g - e).max() / max(np.abs(e).max(), 1e-6))


def leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree)]


def outputs(out) -> list:
    """A module's outputs as a list, torch's or JAX's."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


# Bridge bugs the float64 check finds (strict: a fix turns the xfail into a failure).
FLOAT64_BUGS: dict[str, str] = {}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_torch(name):
    make_module, make_input = CASES[name]
    torch.manual_seed(0)
    module = make_module()
    x = make_input()
    apply, params = bridge.torch_to_jax(module, strict=True)
    xj = bridge.to_jax(x)

    out = jax.jit(apply)(params, xj)
    expected = module(x)
    expected_leaves = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got_leaves = leaves(out)
    assert len(got_leaves) == len(expected_leaves)
    for g, e in zip(got_leaves, expected_leaves, strict=True):
        assert rel_err(g, e) <= 1e-4

    # gradients of a random projection, w.r.t. params and the (float) input; in float32
    # only on inputs away from kinks, where rounding cannot flip a derivative
    assert_away_from_kinks(module, x)
    w = [torch.randn(e.shape, generator=torch.Generator().manual_seed(i)) for i, e in enumerate(expected_leaves)]
    differentiable_input = x.is_floating_point()

    def loss(p, xin):
        return sum((o * bridge.to_jax(wi)).sum() for o, wi in zip(leaves(apply(p, xin)), w, strict=True))

    argnums = (0, 1) if differentiable_input else 0
    grads = jax.jit(jax.grad(loss, argnums=argnums))(params, xj)
    pgrads = grads[0] if differentiable_input else grads
    xt = x.clone().requires_grad_(differentiable_input)
    sum((e * wi).sum() for e, wi in zip([module(xt)] if isinstance(expected, torch.Tensor) else list(module(xt)), w, strict=True)).backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None
        assert rel_err(pgrads[pname], p.grad) <= 1e-3, pname
    if differentiable_input:
        assert rel_err(grads[1], xt.grad) <= 1e-3

    # vmap over an extra batch axis matches a loop
    xs = torch.stack([x, x.flip(0)])
    batched = jax.vmap(apply, in_axes=(None, 0))(params, bridge.to_jax(xs))
    for i in range(2):
        exp_i = module(xs[i])
        exp_i = [exp_i] if isinstance(exp_i, torch.Tensor) else list(exp_i)
        for g, e in zip(leaves(batched), exp_i, strict=True):
            assert rel_err(g[i], e) <= 1e-4


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=FLOAT64_BUGS[n])) if n in FLOAT64_BUGS else n
     for n in CASES],
)
def test_layer_gradients_match_torch_in_float64(name):
    make_module, make_input = CASES[name]
    torch.manual_seed(0)
    module, x = make_module(), make_input()
    result = float64_gradients(module, args=(x,), outputs=outputs, wrt_args=(0,) if x.is_floating_point() else ())
    assert not result.float32_ops  # these layers compute in float64 throughout: the exact tolerance
    result.check(floor_frac=0.01)


def _wrong_silu_derivative(factor: float):
    """A silu lowering with the right values and its derivative off by `factor`."""

    @jax.custom_jvp
    def silu(x):
        return x * jax.nn.sigmoid(x)

    @silu.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        s = jax.nn.sigmoid(x)
        return silu(x), t * s * (1 + x * (1 - s)) * factor

    return lambda ctx, x: silu(x).astype(ctx.dtype)


def test_float64_check_rejects_a_slightly_wrong_derivative(monkeypatch):
    """A derivative off by 1e-6 relative, invisible to a float32 check at 1e-3, fails the float64 one."""
    torch.manual_seed(0)
    module, x = CASES["mlp"][0](), CASES["mlp"][1]()
    assert float64_gradients(module, args=(x,), wrt_args=(0,)).check() <= GRAD64_RTOL
    monkeypatch.setitem(LOWERINGS, torch.ops.aten.silu.default, _wrong_silu_derivative(1 + 1e-6))
    result = float64_gradients(module, args=(x,), wrt_args=(0,))
    assert 1e-8 < max(result.errors().values()) < 1e-5
    with pytest.raises(AssertionError):
        result.check()


def test_kink_guard_rejects_inputs_within_float32_noise():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    x = _r(4, 8)
    assert_away_from_kinks(relu, x)
    with torch.no_grad():  # move one pre-activation to 1e-7 above zero (in float64)
        pre = relu[0].double()(x.double())[2, 5]
        relu[0].float().bias[5] -= float(pre) - 1e-7
    with pytest.raises(AssertionError, match="aten.relu"):
        assert_away_from_kinks(relu, x)

    pool = nn.MaxPool1d(2)
    assert_away_from_kinks(pool, torch.tensor([[[1.0, 2.0, 0.0, 0.0]]]))  # exact tie of exact zeros: no hazard
    with pytest.raises(AssertionError, match="max_pool"):
        assert_away_from_kinks(pool, torch.tensor([[[1.0, 1.0 + 1e-7, 3.0, 4.0]]]))

    with KinkMonitor() as monitor:
        torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64).topk(2)
    assert [name for name, *_ in monitor.records] == ["aten.topk.default"]


def test_batchnorm_train_mode_matches_torch_statistics():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)).train()
    x = _r(5, 3, 7)
    apply, params, state = bridge.torch_to_jax_with_state(module)
    out, new_state = jax.block_until_ready(jax.jit(apply)(params, state, bridge.to_jax(x)))
    expected = module(x)  # writes the running stats JAX read: only after JAX is done
    assert rel_err(out, expected) <= 1e-4
    assert rel_err(new_state["1.running_mean"], module[1].running_mean) <= 1e-5
    assert rel_err(new_state["1.running_var"], module[1].running_var) <= 1e-5
