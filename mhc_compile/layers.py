"""The module that owns one mHC connection's parameters (``phi``, ``bias``, ``alpha``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import MHCConfig
from .ops import functional


class MHCConnection(nn.Module):
    """Parameters of one rewritten residual connection.

    Parameters (float32 whatever the model dtype; coefficients are computed in float32):
        phi:   ``[n*C, n^2 + 2n]`` projection of the flattened streams;
        bias:  ``[n^2 + 2n]`` static logits ``[b_pre | b_post | vec(b_res)]``;
        alpha: ``[3]`` gates of the dynamic parts (pre, post, res).

    ``init="preserve"`` (docs/design.md §2): ``alpha = 0``; mHC: ``b_pre = logit(1/n)``,
    ``b_post = 0`` (``H_post = 1``), ``b_res = 0`` (uniform doubly stochastic); HC:
    ``b_pre = 1/n``, ``b_post = 1``, ``b_res = I``. With replicated streams every stream
    then equals the original residual stream. ``phi`` is random so that ``alpha``
    receives gradient at step 0 and the streams diverge once it moves.

    ``init="paper"``: ``alpha = 0.01``, ``b_pre = b_post = 0``, ``b_res = 0`` (mHC) or
    ``I`` (HC), random ``phi``: the dynamic parts are on from the first step.
    """

    def __init__(self, hidden_size: int, config: MHCConfig) -> None:
        super().__init__()
        n = config.n_streams
        self.hidden_size = hidden_size
        self.n_streams = n
        self.mode = config.mode
        self.init_kind = config.init
        self.phi = nn.Parameter(torch.empty(n * hidden_size, config.n_coeffs))
        self.bias = nn.Parameter(torch.empty(config.n_coeffs))
        self.alpha = nn.Parameter(torch.empty(3))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise ``phi``, ``bias`` and ``alpha`` as ``init`` says.

        Works on plain, meta (nothing to write) and DTensor (FSDP2-sharded) parameters;
        the latter is a collective: call it on every rank in the same order.
        """
        for name, value in self.initial_values().items():
            _assign(getattr(self, name), value)

    def initial_values(self) -> dict[str, Tensor]:
        """Fresh float32 CPU tensors ``{"phi", "bias", "alpha"}`` of this connection's init."""
        n = self.n_streams
        phi = torch.empty(self.phi.shape).normal_(0.0, 1.0 / math.sqrt(self.phi.shape[0]))
        bias = torch.zeros(self.bias.shape)
        b_pre, b_post, b_res = bias[:n], bias[n : 2 * n], bias[2 * n :].view(n, n)
        if self.mode == "mhc":
            b_pre.fill_(_logit(1.0 / n) if self.init_kind == "preserve" else 0.0)
        else:
            b_pre.fill_(1.0 / n if self.init_kind == "preserve" else 0.0)
            b_post.fill_(1.0)
            b_res.copy_(torch.eye(n))
        alpha = torch.full(self.alpha.shape, 0.0 if self.init_kind == "preserve" else 0.01)
        return {"phi": phi, "bias": bias, "alpha": alpha}

    def forward(self, streams: Tensor, *, channel_dim: int = -1, sinkhorn_iters: int = 20,
                eps: float = 1e-6, backend: str = "torch") -> tuple[Tensor, Tensor, Tensor]:
        """Pre side for direct use: ``streams [..., n, C] -> (u [..., C], H_post, H_res)``."""
        return functional.mhc_pre(
            streams, self.phi, self.bias, self.alpha, mode=self.mode,
            sinkhorn_iters=sinkhorn_iters, eps=eps, channel_dim=channel_dim, backend=backend,
        )

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, n_streams={self.n_streams}, mode={self.mode!r}"


def _logit(p: float) -> float:
    """``logit(p)``, saturated for ``p = 1`` (n = 1) so that ``sigmoid`` gives exactly 1.0."""
    if p >= 1.0:
        return 30.0
    return math.log(p / (1.0 - p))


def _assign(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` for plain, meta (nothing to write) and DTensor parameters."""
    if param.is_meta:
        return
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        DTensor = ()
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)
