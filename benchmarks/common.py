"""Pieces the benchmark scripts share: the Llama-style shape they measure, the way they
report (the markdown printed, and written to ``--out`` when given) and the ``ops.library``
settings they compare (the fused post+pre backward's forms)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

# The fused post+pre backward's forms, as ops.library settings (the default: three-pass).
BACKWARD_FORMS = {
    "three-pass": {"POST_PRE_ONE_PASS": False},
    "one-pass-matmul": {"POST_PRE_ONE_PASS": True, "POST_PRE_DPHI_IN_PASS": False},  # dphi by matmul after it
    "one-pass-dphi": {"POST_PRE_ONE_PASS": True, "POST_PRE_DPHI_IN_PASS": True},  # dphi in the pass
}


@contextlib.contextmanager
def library_settings(settings: dict) -> Iterator[None]:
    """``mhc_compile.ops.library`` constants set to ``settings`` inside the block, restored
    after it. The ops read them when their bodies run or are traced: under ``torch.compile``
    only the compile sees them."""
    from mhc_compile.ops import library

    saved = {name: getattr(library, name, None) for name in settings}  # None: an older package
    for name, value in settings.items():
        setattr(library, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(library, name, value)


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
