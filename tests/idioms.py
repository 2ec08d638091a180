"""Block code that uses Python's own ``assert`` statement (pytest rewrites the asserts of
test files, so code whose tracing depends on the plain statement lives here)."""

from __future__ import annotations

import torch
from torch import nn


class PositionTable(nn.Module):
    """XLM: an assertion on sizes, and a buffer sliced to the sequence length."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Linear(dim, dim)
        self.register_buffer("pos", torch.randn(1, 32, dim), persistent=False)

    def forward(self, x):
        length = x.shape[1]
        assert length <= self.pos.shape[1], "sequence too long"
        return x + self.f(x + self.pos[:, :length])
