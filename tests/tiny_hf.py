"""Tiny Hugging Face Llama models for the lifecycle tests (random weights, no downloads)."""

from __future__ import annotations

import torch

VOCAB = 1000


def llama_config(layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(layers))


def token_ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_steps(model, ids: torch.Tensor, steps: int = 2, lr: float = 1e-2) -> None:
    """A few AdamW steps on ``ids`` (as inputs and labels), so the mHC parameters move."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
