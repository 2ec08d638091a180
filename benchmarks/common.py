"""Pieces the benchmark scripts share: the Llama-style shape they measure and the way they
report (the markdown printed, and written to ``--out`` when given)."""

from __future__ import annotations

from typing import Optional


def llama_config(hidden: int, layers: int, vocab: int, max_positions: int):
    """A Llama-7B-style ``LlamaConfig``: heads of 128, MLP 8/3 wide (rounded to 256), SDPA."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 256 * 256,
                       num_hidden_layers=layers, num_attention_heads=hidden // 128,
                       num_key_value_heads=hidden // 128, vocab_size=vocab,
                       max_position_embeddings=max_positions, attn_implementation="sdpa")


def report(text: str, out: Optional[str], mode: str = "w") -> None:
    """Print ``text`` and write it to ``out`` (``mode="a"`` appends)."""
    print(text)
    if out:
        with open(out, mode) as f:
            f.write(text)
