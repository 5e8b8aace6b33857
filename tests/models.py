"""Small random-init transformers models (no weights downloaded) and their inputs.

Shared by tests/test_transformers_models.py, the examples and the benchmarks.
Each builder returns `(model, inputs)` where `inputs` is a dict of torch
tensors to pass as keyword arguments, in the way users call these models
(attention masks with padding where the model takes one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

B, T = 2, 8
VOCAB = 96


def _ids(batch: int = B, length: int = T, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _mask(batch: int = B, length: int = T) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0  # padding on the first sequence
    return mask


def _pixels(batch: int = B, channels: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, channels, size, size, generator=g)


_LM = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def gpt2(attn: str):
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **_LM)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask()}


def llama(attn: str):  # rotary embeddings, grouped-query attention
    cfg = tf.LlamaConfig(num_key_value_heads=2, **_DEC, **_LM)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask()}


def mistral(attn: str):
    cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **_DEC, **_LM)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask()}


def qwen2(attn: str):
    cfg = tf.Qwen2Config(num_key_value_heads=2, **_DEC, **_LM)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask()}


def gpt_neox(attn: str):
    cfg = tf.GPTNeoXConfig(**_DEC, **_LM)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask()}


def opt(attn: str):
    cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, **_LM)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask()}


def bert(attn: str):
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask(),
                         "token_type_ids": torch.zeros(B, T, dtype=torch.long)}


def t5(attn: str):
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask(), "decoder_input_ids": _ids(length=5)}


def bart(attn: str):
    cfg = tf.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64, **_LM)
    return cfg, lambda: {"input_ids": _ids(), "attention_mask": _mask(), "decoder_input_ids": _ids(length=5)}


def whisper(attn: str):
    cfg = tf.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
                           max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1)
    g = torch.Generator().manual_seed(3)
    return cfg, lambda: {"input_features": torch.randn(B, 16, 32, generator=g), "decoder_input_ids": _ids(length=5)}


def vit(attn: str):
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=5)
    return cfg, lambda: {"pixel_values": _pixels()}


def resnet(attn: str):
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
    return cfg, lambda: {"pixel_values": _pixels()}


def convnext(attn: str):
    cfg = tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5, image_size=32)
    return cfg, lambda: {"pixel_values": _pixels()}


def swin(attn: str):
    cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                        window_size=4, num_labels=5)
    return cfg, lambda: {"pixel_values": _pixels()}


_HEADS: dict[str, type] = {
    "gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM, "gpt_neox": tf.GPTNeoXForCausalLM, "opt": tf.OPTForCausalLM,
    "bert": tf.BertForMaskedLM, "t5": tf.T5ForConditionalGeneration,
    "bart": tf.BartForConditionalGeneration, "whisper": tf.WhisperForConditionalGeneration,
    "vit": tf.ViTForImageClassification, "resnet": tf.ResNetForImageClassification,
    "convnext": tf.ConvNextForImageClassification, "swin": tf.SwinForImageClassification,
}
BUILDERS: dict[str, Callable] = {
    "gpt2": gpt2, "llama": llama, "mistral": mistral, "qwen2": qwen2, "gpt_neox": gpt_neox, "opt": opt,
    "bert": bert, "t5": t5, "bart": bart, "whisper": whisper, "vit": vit, "resnet": resnet,
    "convnext": convnext, "swin": swin,
}
#: Models whose attention has both an eager and an sdpa implementation.
ATTENTION = {"gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "bert", "bart", "whisper", "vit"}


def build(name: str, attn: str = "sdpa", seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A small random-init model in eval mode and its example inputs."""
    cfg, inputs = BUILDERS[name](attn)
    if name in ATTENTION:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = _HEADS[name](cfg).eval()
    return model, inputs()


def main_output(out) -> torch.Tensor:
    """The tensor users look at first: logits, else the last hidden state."""
    for key in ("logits", "last_hidden_state"):
        value = out[key] if key in out else None
        if value is not None:
            return value
    raise KeyError(f"no logits in {list(out.keys())}")
