"""Port torch models to JAX and leave torch behind: bridge.export, then run without torch.

Part 1 (this process, with torch): export a small random-init GPT-2 and a ResNet
(transformers; no weights are downloaded) with bridge.export(format="stablehlo"),
and save torch's own outputs beside them.

Part 2 (a fresh subprocess in which torch, transformers and bridge cannot be
imported): load each exported model.py, check parity against the saved torch
outputs, fine-tune with optax for a few steps (the ResNet in train mode, its
BatchNorm statistics coming back as new state), and generate tokens with GPT-2.

Run: .venv/bin/python examples/port_to_jax.py [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

BATCH, WINDOW, VOCAB = 2, 16, 96
PROMPT, NEW_TOKENS = 5, 6


def export_models(out: pathlib.Path) -> None:
    import torch
    import transformers

    import bridge
    from bridge.export import export

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)).eval()
    ids = torch.randint(3, VOCAB, (BATCH, WINDOW), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    export(gpt2, input_ids=ids, attention_mask=mask, use_cache=False, path=out / "gpt2", format="stablehlo")
    with torch.no_grad():
        logits = gpt2(input_ids=ids, attention_mask=mask).logits
        # torch's greedy continuation of each prompt, without padding, for the JAX side to match
        tokens = ids[:, :PROMPT]
        for _ in range(NEW_TOKENS):
            tokens = torch.cat([tokens, gpt2(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)], 1)
    np.savez(out / "gpt2" / "torch.npz", input_ids=ids.numpy(), logits=logits.numpy(), generated=tokens.numpy())

    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)).train()
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    export(resnet, pixel_values=pixels, path=out / "resnet", format="stablehlo")
    stepped = copy.deepcopy(resnet)  # train mode: one forward updates the running statistics
    with torch.no_grad():
        logits = stepped(pixel_values=pixels).logits
    state = bridge.torch_to_jax_with_state(stepped)[2]  # torch's running statistics, as JAX arrays
    np.savez(out / "resnet" / "torch.npz", pixel_values=pixels.numpy(), logits=logits.numpy(),
             **{"state/" + k: np.asarray(v) for k, v in state.items()})
    print(f"exported GPT-2 and ResNet to {out}")


def load(folder: pathlib.Path):
    """Import folder/model.py as a module (it finds its weights and program beside it)."""
    spec = importlib.util.spec_from_file_location(f"port_{folder.name}", folder / "model.py")
    return spec.loader.exec_module(model := importlib.util.module_from_spec(spec)) or model


def rel_err(got, expected) -> float:
    return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


def run_without_torch(out: pathlib.Path) -> None:
    for name in ("torch", "transformers", "bridge"):
        sys.modules[name] = None  # `import torch` (and torch.*) now raises ImportError
    import jax
    import jax.numpy as jnp
    import optax

    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch cannot be imported here")
    else:
        raise AssertionError("torch was importable")

    # ---- GPT-2: parity, fine-tuning, generation
    gpt2 = load(out / "gpt2")
    ref = np.load(out / "gpt2" / "torch.npz")
    params, _ = gpt2.load()
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    mask = jnp.ones_like(ids)
    logits = jax.jit(lambda p, i, m: gpt2.apply(p, input_ids=i, attention_mask=m, use_cache=False)["logits"])
    err = rel_err(logits(params, ids, mask), ref["logits"])
    print(f"GPT-2 logits {ref['logits'].shape}: max relative error vs torch {err:.1e}")
    assert err < 1e-4

    def lm_loss(p):
        out = logits(p, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], ids[:, 1:]).mean()

    opt = optax.adamw(3e-3)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(lm_loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    trained, opt_state, losses = params, opt.init(params), []
    for _ in range(5):
        trained, opt_state, loss = step(trained, opt_state)
        losses.append(float(loss))
    print(f"GPT-2 fine-tuning loss: {losses[0]:.3f} -> {losses[-1]:.3f} in 5 steps")
    assert losses[-1] < losses[0]

    # Greedy generation with the fixed-shape program: the exported program takes
    # (BATCH, WINDOW) token ids, so each step re-runs it on the window padded on the
    # right. Attention is causal, so the padding after position n-1 cannot change the
    # logits at n-1; the attention mask marks the padding too. (No KV cache: the
    # program has static shapes, see docs/export.md.)
    tokens = np.zeros((BATCH, WINDOW), np.int32)
    tokens[:, :PROMPT] = ref["input_ids"][:, :PROMPT]
    for n in range(PROMPT, PROMPT + NEW_TOKENS):
        window_mask = (np.arange(WINDOW) < n).astype(np.int32)[None].repeat(BATCH, 0)
        next_logits = logits(params, jnp.asarray(tokens), jnp.asarray(window_mask))[:, n - 1]
        tokens[:, n] = np.asarray(next_logits.argmax(-1))
    generated = tokens[:, : PROMPT + NEW_TOKENS]
    print(f"GPT-2 greedy tokens (prompt + {NEW_TOKENS}): {generated[0].tolist()}")
    assert (generated == ref["generated"]).all(), (generated, ref["generated"])

    # ---- ResNet, exported in train mode: parity, new BatchNorm statistics, fine-tuning
    resnet = load(out / "resnet")
    ref = np.load(out / "resnet" / "torch.npz")
    params, state = resnet.load()
    pixels = jnp.asarray(ref["pixel_values"])
    fwd = jax.jit(lambda p, s, x: resnet.apply_with_state(p, s, pixel_values=x))
    out_, new_state = fwd(params, state, pixels)
    err = rel_err(out_["logits"], ref["logits"])
    state_err = max(rel_err(new_state[k], ref["state/" + k]) for k in state)
    print(f"ResNet logits {ref['logits'].shape}: max relative error vs torch {err:.1e}; "
          f"new BatchNorm statistics {state_err:.1e}")
    assert err < 1e-4 and state_err < 1e-5

    labels = jnp.arange(pixels.shape[0]) % 5

    def cls_loss(p, s):
        out, new_s = resnet.apply_with_state(p, s, pixel_values=pixels)
        return optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean(), new_s

    opt = optax.adam(1e-2)

    @jax.jit
    def train_step(p, s, o):
        (loss, s), grads = jax.value_and_grad(cls_loss, has_aux=True)(p, s)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), s, o, loss

    opt_state, losses = opt.init(params), []
    for _ in range(5):
        params, state, opt_state, loss = train_step(params, state, opt_state)
        losses.append(float(loss))
    print(f"ResNet training loss: {losses[0]:.3f} -> {losses[-1]:.3f} in 5 steps "
          f"(num_batches_tracked {int(state['resnet.embedder.embedder.normalization.num_batches_tracked'])})")
    assert losses[-1] < losses[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="folder for the exports (default: a temp folder)")
    parser.add_argument("--torch-free", type=pathlib.Path, help=argparse.SUPPRESS)  # part 2, in the subprocess
    args = parser.parse_args()
    if args.torch_free:
        run_without_torch(args.torch_free)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or pathlib.Path(tmp)
        export_models(out)
        subprocess.run([sys.executable, __file__, "--torch-free", str(out)], check=True)


if __name__ == "__main__":
    main()
