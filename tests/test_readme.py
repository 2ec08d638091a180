"""Every ```python block of README.md runs, given a small prelude for its placeholders
(``cfg``, ``input_ids``, ``labels``, ``out_dir``, ``train_dataset``, ``MyModel``, ``x``).
A block whose fence line says ``no-run`` (multi-GPU ones) is skipped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
BLOCKS = [(info.strip(), code) for info, code in FENCE.findall(README.read_text())]
RUNNABLE = [code for info, code in BLOCKS if "no-run" not in info.split()]


class MyModel(nn.Module):
    """A residual MLP: ``x + f(x)`` twice."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.LayerNorm(10), nn.Linear(10, 10))
        self.g = nn.Sequential(nn.LayerNorm(10), nn.Linear(10, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.f(x)
        return x + self.g(x)


def _prelude(tmp_path) -> dict:
    from transformers import LlamaConfig

    ids = torch.randint(0, 97, (2, 8))
    return {
        "cfg": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=97, max_position_embeddings=64),
        "input_ids": ids,
        "labels": ids,
        "out_dir": str(tmp_path),
        "train_dataset": [{"input_ids": row, "labels": row} for row in torch.randint(0, 97, (4, 8))],
        "MyModel": MyModel,
        "x": torch.randn(2, 10),
    }


def test_readme_has_the_snippets():
    assert len(RUNNABLE) >= 7 and len(BLOCKS) - len(RUNNABLE) <= 1  # only the FSDP block is skipped


@pytest.mark.parametrize("code", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_snippet_runs(code, tmp_path):
    if "from peft" in code:
        pytest.importorskip("peft")
    if "Trainer" in code:
        pytest.importorskip("accelerate")
    exec(compile(code, "README.md snippet", "exec"), _prelude(tmp_path))  # noqa: S102
