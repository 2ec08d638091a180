"""Diagnostics of a converted model: the paper's Amax gain magnitude, the doubly
stochastic error of every ``H_res`` and per-stream RMS.

Cheap enough to call every k training steps::

    with mhc.diagnostics.observe() as rec:
        model(batch)
    stats = mhc.diagnostics.summarize(rec)   # {"forward_gain": ..., "backward_gain": ...}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .ops import functional


@dataclass
class Recording:
    """What one observed forward saw, one entry per connection in call order.

    ``h_res[l]``: ``[M, n, n]`` float32; ``stream_rms[l]``: ``[n]`` RMS of each stream
    entering connection l.
    """

    h_res: list[Tensor] = field(default_factory=list)
    stream_rms: list[Tensor] = field(default_factory=list)

    def __call__(self, kind: str, tensors: dict) -> None:
        if kind != "pre":
            return
        self.h_res.append(tensors["h_res"].detach().float())
        x = tensors["streams"].detach().float()  # [M, n, C]
        self.stream_rms.append(x.pow(2).mean(dim=(0, 2)).sqrt())


@contextlib.contextmanager
def observe() -> Iterator[Recording]:
    """Record the coefficients of every connection during the forwards run inside."""
    rec = Recording()
    functional.OBSERVERS.append(rec)
    try:
        with torch.no_grad():
            yield rec
    finally:
        functional.OBSERVERS.remove(rec)


def composite_gains(h_res: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Amax gain magnitude of ``H_res_l @ ... @ H_res_1`` for every depth l.

    Args:
        h_res: per-layer ``[M, n, n]`` matrices of one chain (same M and n).

    Returns:
        ``(forward, backward)``, each ``[L]``: the max over tokens of the composite's max
        absolute row sum (forward) and max absolute column sum (backward).
    """
    fwd, bwd = [], []
    composite = None
    for h in h_res:
        composite = h if composite is None else h @ composite
        fwd.append(composite.abs().sum(dim=-1).amax())
        bwd.append(composite.abs().sum(dim=-2).amax())
    if not fwd:
        return torch.zeros(0), torch.zeros(0)
    return torch.stack(fwd), torch.stack(bwd)


def doubly_stochastic_error(h_res: Tensor) -> Tensor:
    """Max deviation of row and column sums from 1 (and of negative entries) of ``[..., n, n]``."""
    rows = (h_res.sum(dim=-1) - 1).abs().amax()
    cols = (h_res.sum(dim=-2) - 1).abs().amax()
    neg = (-h_res).clamp_min(0).amax()
    return torch.stack([rows, cols, neg]).amax()


def chains(h_res: Sequence[Tensor]) -> list[list[Tensor]]:
    """Split a call-ordered list into runs of equal shape (a conv net's stages differ in M)."""
    runs: list[list[Tensor]] = []
    for h in h_res:
        if runs and runs[-1][-1].shape == h.shape:
            runs[-1].append(h)
        else:
            runs.append([h])
    return runs


def summarize(rec: Recording) -> dict:
    """Scalars for logging: max forward/backward gain, max DS error, stream RMS spread."""
    fwd_max, bwd_max = 0.0, 0.0
    per_depth_fwd: list[float] = []
    for run in chains(rec.h_res):
        fwd, bwd = composite_gains(run)
        fwd_max = max(fwd_max, float(fwd.max()))
        bwd_max = max(bwd_max, float(bwd.max()))
        per_depth_fwd.extend(float(v) for v in fwd)
    ds = max((float(doubly_stochastic_error(h)) for h in rec.h_res), default=0.0)
    rms = torch.stack(rec.stream_rms) if rec.stream_rms else torch.zeros(0, 1)
    return {
        "forward_gain": fwd_max,
        "backward_gain": bwd_max,
        "forward_gain_per_depth": per_depth_fwd,
        "ds_error": ds,
        "stream_rms_min": float(rms.min()) if rms.numel() else 0.0,
        "stream_rms_max": float(rms.max()) if rms.numel() else 0.0,
    }
