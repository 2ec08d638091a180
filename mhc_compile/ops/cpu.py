"""The eager backend where the Triton kernels don't run (the CPU): the reference math in
fewer, cheaper ops.

Same functions and contracts as :mod:`mhc_compile.ops.reference` (the test oracle, which
stays the plain formulation), computed differently where eager PyTorch is slow on small
per-token tensors:

* Sinkhorn-Knopp runs on a token-last copy of the logits (``[n, n, M]``), where each row
  or column sum is a reduction over a leading axis of ``M``-long vectors instead of
  ``M * n`` reductions of length ``n``; its backward is one autograd node that walks the
  iterations in reverse from the saved row and column sums (``p_before = p_after * sum``),
  instead of a recorded graph of ``6 * iters`` nodes.
* ``u = H_pre X`` is a broadcast product summed over the stream axis; ``H_res X`` a
  batched matrix product.

Results agree with the reference within float32 rounding (``tests/test_reference.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference

_TINY = reference._TINY


class _SinkhornKnopp(torch.autograd.Function):
    """``exp(logits) -> doubly stochastic``; ``[n, n, M]`` float32 in and out."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:  # type: ignore[override]
        p = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        sums = []
        for _ in range(iters):
            rows = p.sum(dim=1, keepdim=True).clamp_min_(_TINY)
            p = p / rows
            cols = p.sum(dim=0, keepdim=True).clamp_min_(_TINY)
            p = p / cols
            sums += [rows, cols]
        ctx.save_for_backward(p, *sums)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        p, *sums = ctx.saved_tensors
        grad = grad.contiguous()  # arrives token-major; every step below is then a flat op
        for k in range(len(sums) - 1, -1, -1):
            s, dim = sums[k], (0 if k % 2 else 1)  # odd k: a column normalisation
            grad = (grad - (grad * p).sum(dim=dim, keepdim=True)) / s
            p = p * s
        # p is now exp(logits - rowmax); the row shift has no effect on the output (the
        # first row normalisation removes it), so its gradient term is zero.
        return grad * p, None


def sinkhorn_knopp(logits: Tensor, iters: int = 20) -> Tensor:
    """Same as :func:`mhc_compile.ops.reference.sinkhorn_knopp`: ``[..., n, n]`` -> float32."""
    batch = logits.shape[:-2]
    n = logits.shape[-1]
    token_last = logits.float().reshape(-1, n, n).permute(1, 2, 0).contiguous()  # [n, n, M]
    p = _SinkhornKnopp.apply(token_last, iters)
    return p.permute(2, 0, 1).contiguous().reshape(*batch, n, n)


def mhc_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """``u = H_pre @ X``: ``[M, n, C], [M, n] -> [M, C]`` in ``x.dtype``."""
    return (h_pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)


def mhc_pre(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, *, mode: str = "mhc",
            sinkhorn_iters: int = 20, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_pre`."""
    h_pre, h_post, h_res = reference.mhc_coefficients(
        x, phi, bias, alpha, mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps,
        sinkhorn=sinkhorn_knopp,
    )
    return mhc_aggregate(x, h_pre), h_post, h_res


def mhc_post(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_post`."""
    mixed = torch.bmm(h_res, x.float())
    return (mixed + h_post.unsqueeze(-1) * y.float().unsqueeze(-2)).to(x.dtype)


def mhc_post_pre(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    *, mode: str = "mhc", sinkhorn_iters: int = 20, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_post_pre`."""
    x_next = mhc_post(x, y, h_post, h_res)
    u, h_post2, h_res2 = mhc_pre(x_next, phi, bias, alpha, mode=mode,
                                 sinkhorn_iters=sinkhorn_iters, eps=eps)
    return x_next, u, h_post2, h_res2


__all__ = ["sinkhorn_knopp", "mhc_aggregate", "mhc_pre", "mhc_post", "mhc_post_pre"]
