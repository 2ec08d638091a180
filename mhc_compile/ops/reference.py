"""Plain-PyTorch mHC math: the ground truth for every test and the ``backend="torch"`` ops.

Canonical layout: the streams of M tokens are ``x: [M, n, C]`` (C contiguous). Per token,
with ``v = vec(x)`` of length ``nC`` (docs/design.md §1)::

    v'      = v / rms(v)
    h_pre   = alpha[0] * (v' @ phi[:, :n])        + bias[:n]
    h_post  = alpha[1] * (v' @ phi[:, n:2n])      + bias[n:2n]
    h_res   = alpha[2] * mat(v' @ phi[:, 2n:])    + mat(bias[2n:])
    mhc: H_pre = sigmoid(h_pre), H_post = 2 sigmoid(h_post), H_res = Sinkhorn(exp(h_res))
    hc:  H_pre = alpha[0] tanh(v' @ phi_pre) + b_pre (likewise post and res; unconstrained)

Coefficients are always computed in float32, whatever the stream dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

_TINY = 1e-30  # keeps an all-underflowed row or column finite instead of 0/0


def sinkhorn_knopp(logits: Tensor, iters: int = 20) -> Tensor:
    """Project ``exp(logits)`` towards the doubly stochastic matrices.

    Args:
        logits: ``[..., n, n]`` float tensor.
        iters: number of (row, column) normalisation rounds.

    Returns:
        ``[..., n, n]`` float32 matrix; columns sum to 1 exactly, rows to 1 within the
        convergence of ``iters`` rounds. Large logits give no NaN or inf: each row is
        shifted by its maximum before ``exp``.
    """
    logits = logits.float()
    p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    for _ in range(iters):
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(_TINY)
        p = p / p.sum(dim=-2, keepdim=True).clamp_min(_TINY)
    return p


def split_coefficients(proj: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``[..., n^2 + 2n]`` into pre ``[..., n]``, post ``[..., n]``, res ``[..., n, n]``."""
    pre = proj[..., :n]
    post = proj[..., n : 2 * n]
    res = proj[..., 2 * n :].reshape(*proj.shape[:-1], n, n)
    return pre, post, res


def mhc_coefficients(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    mode: str = "mhc",
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
    sinkhorn: Callable[[Tensor, int], Tensor] = sinkhorn_knopp,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token mixing coefficients.

    Args:
        x: streams ``[M, n, C]``, any float dtype.
        phi: ``[n*C, n^2 + 2n]`` float32 projection.
        bias: ``[n^2 + 2n]`` float32 static part.
        alpha: ``[3]`` float32 gates for the pre, post and res dynamic parts.
        sinkhorn: the Sinkhorn-Knopp implementation (``ops.cpu`` passes its own).

    Returns:
        ``H_pre [M, n]``, ``H_post [M, n]``, ``H_res [M, n, n]``, all float32.
    """
    m, n, c = x.shape
    v = x.reshape(m, n * c).float()
    rstd = torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + eps)
    proj = (v @ phi.float()) * rstd  # [M, n^2 + 2n]; == (v * rstd) @ phi
    d_pre, d_post, d_res = split_coefficients(proj, n)
    b_pre, b_post, b_res = split_coefficients(bias.float(), n)
    alpha = alpha.float()
    if mode == "mhc":
        h_pre = torch.sigmoid(alpha[0] * d_pre + b_pre)
        h_post = 2.0 * torch.sigmoid(alpha[1] * d_post + b_post)
        h_res = sinkhorn(alpha[2] * d_res + b_res, sinkhorn_iters)
    elif mode == "hc":
        h_pre = alpha[0] * torch.tanh(d_pre) + b_pre
        h_post = alpha[1] * torch.tanh(d_post) + b_post
        h_res = alpha[2] * torch.tanh(d_res) + b_res
    else:
        raise ValueError(f"mhc_coefficients: unknown mode {mode!r}; use 'mhc' or 'hc'")
    return h_pre, h_post, h_res


def mhc_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """Branch input ``u = H_pre @ X``: ``[M, n, C], [M, n] -> [M, C]`` in ``x.dtype``."""
    return torch.einsum("mn,mnc->mc", h_pre, x.float()).to(x.dtype)


def mhc_pre(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    mode: str = "mhc",
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pre side of a connection.

    Args:
        x: streams ``[M, n, C]``.

    Returns:
        ``u [M, C]`` (dtype of ``x``), ``H_post [M, n]`` and ``H_res [M, n, n]`` (float32).
    """
    h_pre, h_post, h_res = mhc_coefficients(
        x, phi, bias, alpha, mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps
    )
    return mhc_aggregate(x, h_pre), h_post, h_res


def mhc_post(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """Post side: ``X_next = H_res @ X + H_post^T y``.

    Args:
        x: streams ``[M, n, C]``; y: branch output ``[M, C]``;
        h_post: ``[M, n]`` float32; h_res: ``[M, n, n]`` float32.

    Returns:
        ``[M, n, C]`` in ``x.dtype`` (accumulated in float32).
    """
    mixed = torch.einsum("mij,mjc->mic", h_res, x.float())
    out = mixed + h_post.unsqueeze(-1) * y.float().unsqueeze(-2)
    return out.to(x.dtype)


def mhc_post_pre(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    *, mode: str = "mhc", sinkhorn_iters: int = 20, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Post of one connection followed by the pre of the next (what the fused kernel computes).

    Returns ``X_next [M, n, C]`` and the next connection's ``u [M, C]``,
    ``H_post [M, n]``, ``H_res [M, n, n]``.
    """
    x_next = mhc_post(x, y, h_post, h_res)
    u, h_post2, h_res2 = mhc_pre(x_next, phi, bias, alpha, mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps)
    return x_next, u, h_post2, h_res2


def expand_streams(x: Tensor, n: int, stream_dim: int) -> Tensor:
    """Replicate one stream ``n`` times along a new axis at ``stream_dim`` (a copy).

    ``[..., C] -> [..., n, C]`` for ``stream_dim=-2``; ``[B, C, H, W] -> [B, n, C, H, W]``
    for ``stream_dim=1``.
    """
    d = stream_dim if stream_dim >= 0 else x.dim() + 1 + stream_dim
    return x.unsqueeze(d).expand(*x.shape[:d], n, *x.shape[d:]).contiguous()


def collapse_streams(x: Tensor, stream_dim: int, reduce: str = "mean") -> Tensor:
    """Merge the n streams at ``stream_dim`` by their ``"mean"`` or ``"sum"``."""
    if reduce == "mean":
        return x.mean(dim=stream_dim)
    if reduce == "sum":
        return x.sum(dim=stream_dim)
    raise ValueError(f"collapse_streams: unknown reduce {reduce!r}; use 'mean' or 'sum'")
