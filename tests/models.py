"""The model catalogue: small models built from configs with random weights (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F


class NanoBlock(nn.Module):
    """nanoGPT-style pre-norm block: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    """A small decoder: token + position embedding, blocks, final norm, tied head."""

    def __init__(self, vocab: int = 97, dim: int = 32, depth: int = 3, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(0.1)
        self.blocks = nn.ModuleList(NanoBlock(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class DeepMLP(nn.Module):
    """``x = x + f(x)`` in a loop, written in the model's own forward."""

    def __init__(self, dim: int = 24, depth: int = 6, n_out: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(10, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
            for _ in range(depth)
        )
        self.out = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for f in self.layers:
            x = x + f(x)
        return self.out(x)


@dataclass
class CatalogueEntry:
    """How to build one model, make inputs for it and read its main output."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], dict]  # (batch, length) -> kwargs
    connections: int
    blocks: list[str]
    main_output: Callable[[Any], torch.Tensor]
    example_inputs: bool = False  # pass the inputs to mhc_compile explicitly
    has_labels: bool = False


def _ids(vocab: int) -> Callable[[int, int], dict]:
    return lambda b, t: {"input_ids": torch.randint(0, vocab, (b, t))}


def _pixels(size: int) -> Callable[[int, int], dict]:
    return lambda b, t: {"pixel_values": torch.randn(b, 3, size, size)}


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64))


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=97, max_position_embeddings=64))


def _vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=16, patch_size=4, num_channels=3))


def _resnet():
    from transformers import ResNetConfig, ResNetModel

    return ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic",
                                    num_channels=3, downsample_in_first_stage=False))


def _llama_eager():
    model = _llama()
    model.config._attn_implementation = "eager"  # [B,H,T,T] + [B,1,T,T] mask adds in every block
    return model


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, vocab_size=97, max_position_embeddings=64,
                                          sliding_window=4))


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=97))


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    # residual_in_fp32: the skip is ``residual.to(float32)``
    return MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=97, state_size=4,
                                        residual_in_fp32=True))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=97,
                                               decoder_start_token_id=0))


def _seq2seq_ids(vocab: int) -> Callable[[int, int], dict]:
    return lambda b, t: {"input_ids": torch.randint(0, vocab, (b, t)),
                         "decoder_input_ids": torch.randint(0, vocab, (b, max(1, t - 2)))}


def _whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=97, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def _audio(mels: int, frames: int, vocab: int) -> Callable[[int, int], dict]:
    return lambda b, t: {"input_features": torch.randn(b, mels, frames),
                         "decoder_input_ids": torch.randint(0, vocab, (b, t))}


def _swin():
    from transformers import SwinConfig, SwinModel

    return SwinModel(SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=2))


CATALOGUE = [
    CatalogueEntry("gpt2", _gpt2, _ids(97), 4, ["transformer.h.0", "transformer.h.1"], lambda o: o.logits, has_labels=True),
    CatalogueEntry("llama", _llama, _ids(97), 4, ["model.layers.0", "model.layers.1"], lambda o: o.logits, has_labels=True),
    CatalogueEntry("qwen2", _qwen2, _ids(97), 4, ["model.layers.0", "model.layers.1"], lambda o: o.logits, has_labels=True),
    CatalogueEntry("bert", _bert, _ids(97), 4, ["encoder.layer.0", "encoder.layer.1"], lambda o: o.last_hidden_state),
    CatalogueEntry("vit", _vit, _pixels(16), 4, ["layers.0", "layers.1"], lambda o: o.last_hidden_state),
    # stage 0: two identity-shortcut blocks; stage 1: a projection block (cut) + one identity block
    CatalogueEntry("resnet", _resnet, _pixels(16), 3, ["encoder.stages.0.layers.0", "encoder.stages.0.layers.1",
                                                       "encoder.stages.1.layers.1"], lambda o: o.last_hidden_state),
    CatalogueEntry("nanogpt", NanoGPT, lambda b, t: {"idx": torch.randint(0, 97, (b, t))}, 6,
                   ["blocks.0", "blocks.1", "blocks.2"], lambda o: o, example_inputs=True),
    CatalogueEntry("llama_eager", _llama_eager, _ids(97), 4, ["model.layers.0", "model.layers.1"], lambda o: o.logits,
                   has_labels=True),
    CatalogueEntry("gemma2", _gemma2, _ids(97), 4, ["model.layers.0", "model.layers.1"], lambda o: o.logits, has_labels=True),
    CatalogueEntry("falcon", _falcon, _ids(97), 2, ["transformer.h.0", "transformer.h.1"], lambda o: o.logits,
                   has_labels=True),
    CatalogueEntry("mamba", _mamba, _ids(97), 2, ["backbone.layers.0", "backbone.layers.1"], lambda o: o.logits,
                   has_labels=True),
    CatalogueEntry("t5", _t5, _seq2seq_ids(97), 10,
                   [f"{part}.block.{i}.layer.{j}" for part, layers in (("encoder", 2), ("decoder", 3))
                    for i in range(2) for j in range(layers)], lambda o: o.logits, example_inputs=True),
    CatalogueEntry("whisper", _whisper, _audio(8, 32, 97), 10,
                   [f"model.{part}.layers.{i}" for part in ("encoder", "decoder") for i in range(2)],
                   lambda o: o.logits),
    CatalogueEntry("swin", _swin, _pixels(16), 8,
                   [f"encoder.layers.{s}.blocks.{b}" for s in range(2) for b in range(2)], lambda o: o.last_hidden_state),
    CatalogueEntry("deep_mlp", DeepMLP, lambda b, t: {"x": torch.randn(b, t, 10)}, 6, [""], lambda o: o, example_inputs=True),
]

BY_NAME = {e.name: e for e in CATALOGUE}
