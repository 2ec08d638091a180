"""The eager backend where the Triton kernels don't run (the CPU): the reference math in
few, whole-tensor ops, each connection side one autograd node.

Same functions and contracts as :mod:`mhc_compile.ops.reference` (the test oracle, which
stays the plain formulation), computed differently where eager PyTorch is slow on small
per-token tensors. At the demo's size (768 tokens, n = 4, C = 64) the cost of the
reference formulation is the number of ops and of recorded autograd nodes, not arithmetic:

* Each side of a connection (pre: coefficients and aggregate; post: the stream mix) is one
  ``torch.autograd.Function`` whose backward is the chain rule written out in a few
  whole-tensor ops (the formulas of ``docs/design.md`` §4), instead of a recorded graph of
  about twenty nodes for the coefficient math alone.
* Sinkhorn-Knopp runs in place on a token-last copy of the logits (``[n, n, M]``), where a
  row or column sum is a reduction over a leading axis of ``M``-long vectors; its backward
  walks the iterations in reverse from the saved row and column sums
  (``p_before = p_after * sum``), three ops a normalisation.

Coefficients are computed in float32 whatever the stream dtype (float64 for float64
streams), with autocast off (the Triton kernels do the same). Results agree with the
reference within float32 rounding (``tests/test_reference.py``). These functions are once
differentiable.

Where the compiled CPU kernels are built (:mod:`.native`) and the call is eager, the public
functions here hand over to :mod:`.cpu_compiled`: the same math with each side's per-token
work in one compiled pass, and the post + pre pair one autograd node. Under tracing
(``torch.compile``, fake or meta tensors) the whole-tensor formulation below runs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native, reference

_TINY = reference._TINY


AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")  # the device types with an autocast state
MODES = ("mhc", "hc")


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device`` where it is on (any device: meta tensors too)."""
    if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def backward_without_autocast(backward):
    """A Function's ``backward`` run with autocast off on the gradients' device: a backward
    called inside an autocast region would otherwise run its products in the autocast dtype."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next((g.device for g in grads if g is not None), torch.device("cpu"))
        with _autocast_off(device):
            return backward(ctx, *grads)
    return run


def _rstd(v: Tensor, eps: float) -> Tensor:
    """``(mean(v^2) + eps)^-1/2`` over the last axis, keepdim: one reduction, no ``v^2`` copy."""
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_().div_(v.shape[-1]).add_(eps).rsqrt_()


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    """float32 for 16- and 32-bit streams, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


# --------------------------------------------------------------------------- Sinkhorn-Knopp


def _sinkhorn_forward(logits: Tensor, iters: int) -> tuple[Tensor, list[Tensor]]:
    """``[n, n, M]`` float32 logits -> the doubly stochastic ``p`` (same layout) and the
    ``2 * iters`` row and column sums (``[n, 1, M]``, ``[1, n, M]``) its backward needs.

    Only the column sums are clamped (to ``_TINY``, as the reference does): a row sum never
    needs it. The first row of ``exp(logits - rowmax)`` sums to at least 1, and after a row
    normalisation each row holds an entry of at least ``1/n``, whose column sums to at most
    ``n`` (entries are at most 1) and at least ``1/n``, so the next row sums to at least
    ``1/n^2``. So the clamp would never act on a row sum: dropping it changes no bit."""
    p = logits - logits.amax(dim=1, keepdim=True)
    p.exp_()
    sums = []
    for _ in range(iters):
        rows = p.sum(dim=1, keepdim=True)
        p.div_(rows)
        cols = p.sum(dim=0, keepdim=True).clamp_min_(_TINY)
        p.div_(cols)
        sums += [rows, cols]
    return p, sums


def _sinkhorn_backward(grad: Tensor, p: Tensor, sums: list[Tensor]) -> Tensor:
    """Gradient of the logits from that of ``p`` (all ``[n, n, M]`` float32); ``grad`` and
    ``p`` are not modified.

    Walks the normalisations back in terms of ``g = dL/dp * p``: for ``p' = p / s`` with ``s``
    the sum along one axis, ``g = g' - p' * sum(g')`` along it, and ``p = p' * s``. At the end
    ``g`` is the logits' gradient itself (``d exp(l) / dl = exp(l)``; the row shift has no
    effect on the output, its gradient term is zero). Two ops a step and one to undo it,
    no division."""
    g = torch.mul(grad, p, out=torch.empty_like(p))  # contiguous whatever grad's strides (a permuted view)
    p = p.clone()
    for k in range(len(sums) - 1, -1, -1):
        dim = 0 if k % 2 else 1  # odd k: a column normalisation
        g.addcmul_(p, g.sum(dim=dim, keepdim=True), value=-1.0)
        if k:
            p.mul_(sums[k])
    return g


class _SinkhornKnopp(torch.autograd.Function):
    """``exp(logits) -> doubly stochastic``; ``[n, n, M]`` float32 in and out."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:  # type: ignore[override]
        p, sums = _sinkhorn_forward(logits, iters)
        ctx.save_for_backward(p, *sums)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        p, *sums = ctx.saved_tensors
        return _sinkhorn_backward(grad, p, sums), None


def sinkhorn_knopp(logits: Tensor, iters: int = 20) -> Tensor:
    """Same as :func:`mhc_compile.ops.reference.sinkhorn_knopp`: ``[..., n, n]`` -> float32."""
    batch = logits.shape[:-2]
    n = logits.shape[-1]
    token_last = logits.float().reshape(-1, n, n).permute(1, 2, 0).contiguous()  # [n, n, M]
    p = _SinkhornKnopp.apply(token_last, iters)
    return p.permute(2, 0, 1).contiguous().reshape(*batch, n, n)


# --------------------------------------------------------------------------- pre side


_SEGMENTS: dict = {}


def _segment_of_column(n: int, device: torch.device) -> Tensor:
    """``[n^2 + 2n]`` int64: 0, 1, 2 for the pre, post and res projection columns (cached)."""
    key = (n, device)
    if key not in _SEGMENTS:
        _SEGMENTS[key] = torch.tensor([0] * n + [1] * n + [2] * (n * n), device=device)
    return _SEGMENTS[key]


def _gate_per_column(alpha: Tensor, n: int) -> Tensor:
    """``alpha [3] -> [n^2 + 2n]``: the gate of each projection column (pre, post, res)."""
    return alpha.index_select(0, _segment_of_column(n, alpha.device))


def _segment_sums(per_column: Tensor, n: int) -> Tensor:
    """``[n^2 + 2n] -> [3]``: the sums over the pre, post and res columns."""
    segments = _segment_of_column(n, per_column.device)
    return per_column.new_zeros(3).index_add_(0, segments, per_column)


def _aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """``u = sum_j H_pre[:, j] X[:, j]``: ``[M, n, C] float32, [M, n] -> [M, C]`` float32."""
    u = x[:, 0] * h_pre[:, :1]
    for j in range(1, x.shape[1]):
        u.addcmul_(x[:, j], h_pre[:, j : j + 1])
    return u


class _PreSide(torch.autograd.Function):
    """``X [M, n, C] -> u [M, C] (X's dtype), H_post [M, n], H_res [M, n, n] (float32)``."""

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,  # type: ignore[override]
                mode: str, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        m, n, c = x.shape
        acc = _accumulation_dtype(x)
        with _autocast_off(x.device):
            xf = x.to(acc)
            v = xf.reshape(m, n * c)
            rstd = _rstd(v, eps)  # [M, 1]
            # [M, K], the dynamic parts; not in place: recompute='mhc' keeps (and checks) mm's output
            d = torch.mm(v, phi.to(acc)) * rstd
            gate = _gate_per_column(alpha.to(acc), n)  # [K]
            bias = bias.to(acc)
            if mode == "mhc":
                s = torch.addcmul(bias[: 2 * n], d[:, : 2 * n], gate[: 2 * n]).sigmoid_()  # [M, 2n]
                h_pre = s[:, :n]
                h_post = s[:, n:] * 2.0
                logits = torch.addcmul(bias[2 * n :], d[:, 2 * n :], gate[2 * n :])  # [M, n^2]
                token_last = logits.t().reshape(n, n, m).contiguous()  # [n, n, M]
                p, sums = _sinkhorn_forward(token_last, iters)
                h_res = p.permute(2, 0, 1).contiguous()  # [M, n, n]
                ctx.save_for_backward(x, phi, rstd, d, gate, s, p, *sums)
            elif mode == "hc":
                t = torch.tanh(d)
                h = torch.addcmul(bias, t, gate)  # [M, K]
                h_pre, h_post = h[:, :n], h[:, n : 2 * n].contiguous()
                h_res = h[:, 2 * n :].reshape(m, n, n)
                ctx.save_for_backward(x, phi, rstd, d, gate, t)
            else:
                raise ValueError(f"mhc_pre: unknown mode {mode!r}; use 'mhc' or 'hc'")
            u = _aggregate(xf, h_pre)
            ctx.h_pre = h_pre  # a view of the saved s (mhc) or of the coefficients h (hc)
        ctx.mode, ctx.n = mode, n
        return u.to(x.dtype), h_post, h_res

    @staticmethod
    @backward_without_autocast
    @once_differentiable
    def backward(ctx, g_u: Optional[Tensor], g_post: Optional[Tensor],  # type: ignore[override]
                 g_res: Optional[Tensor]):
        x, phi, rstd, d, gate, *rest = ctx.saved_tensors
        n, h_pre = ctx.n, ctx.h_pre
        m, _, c = x.shape
        acc = d.dtype
        xf = x.to(acc)
        v = xf.reshape(m, n * c)
        g_cols = torch.zeros_like(d)  # gradient of the K coefficient columns, [M, K]
        if g_u is not None:
            g_u = g_u.to(acc)
            g_cols[:, :n] = (xf * g_u.unsqueeze(1)).sum(dim=-1)  # dL/dH_pre (no out=: Dynamo refuses a strided one)
        if g_post is not None:
            g_cols[:, n : 2 * n] = g_post
        if ctx.mode == "mhc":
            s, p, *sums = rest
            if g_post is not None:
                g_cols[:, n : 2 * n].mul_(2.0)
            g_cols[:, : 2 * n].mul_(s * (1.0 - s))  # through the sigmoids: dL/d logits
            if g_res is not None:
                g_token_last = g_res.to(acc).permute(1, 2, 0)  # [n, n, M]
                g_logits = _sinkhorn_backward(g_token_last, p, sums)
                g_cols[:, 2 * n :] = g_logits.reshape(n * n, m).t()
            g_bias = g_cols.sum(dim=0)
            g_alpha = _segment_sums((g_cols * d).sum(dim=0), n)
            g_d = g_cols.mul_(gate)
        else:
            (t,) = rest
            if g_res is not None:
                g_cols[:, 2 * n :] = g_res.to(acc).reshape(m, n * n)
            g_bias = g_cols.sum(dim=0)
            g_alpha = _segment_sums((g_cols * t).sum(dim=0), n)
            g_d = g_cols.mul_(gate).mul_(1.0 - t * t)
        # d = (v @ phi) * rstd with rstd = (mean(v^2) + eps)^-1/2
        g_proj = g_d * rstd
        g_phi = torch.mm(v.t(), g_proj).to(phi.dtype) if ctx.needs_input_grad[1] else None
        g_v = None
        if ctx.needs_input_grad[0]:
            per_token = (g_d * d).sum(dim=-1, keepdim=True).mul_(rstd.square()).div_(-(n * c))
            g_v = torch.addmm(v * per_token, g_proj, phi.to(acc).t()).view(m, n, c)  # through the projection
            if g_u is not None:
                g_v.addcmul_(h_pre.unsqueeze(-1), g_u.unsqueeze(1))  # through the aggregate
            g_v = g_v.to(x.dtype)
        return g_v, g_phi, g_bias, g_alpha, None, None, None


def _check_iterations(mode: str, iters: int) -> None:
    if mode == "mhc" and (not isinstance(iters, int) or iters < 1):
        raise ValueError(f"mhc_pre: sinkhorn_iters must be a positive int, got {iters!r}")


def _exact_pre(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor) -> bool:
    """The compiled kernels read whole operands: phi ``[nC, K]``, bias ``[K]``, alpha ``[3]``."""
    _, n, c = x.shape
    k = n * n + 2 * n
    return tuple(phi.shape) == (n * c, k) and tuple(bias.shape) == (k,) and tuple(alpha.shape) == (3,)


def _exact_post(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> bool:
    """y ``[M, C]``, H_post ``[M, n]``, H_res ``[M, n, n]`` exactly (no broadcasting)."""
    m, n, c = x.shape
    return tuple(y.shape) == (m, c) and tuple(h_post.shape) == (m, n) and tuple(h_res.shape) == (m, n, n)


def mhc_aggregate(x: Tensor, h_pre: Tensor) -> Tensor:
    """``u = H_pre @ X``: ``[M, n, C], [M, n] -> [M, C]`` in ``x.dtype`` (what the pre side computes)."""
    acc = _accumulation_dtype(x)
    return _aggregate(x.to(acc), h_pre.to(acc)).to(x.dtype)


def mhc_pre(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, *, mode: str = "mhc",
            sinkhorn_iters: int = 20, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_pre`."""
    _check_iterations(mode, sinkhorn_iters)
    if mode in MODES and native.usable(x) and _exact_pre(x, phi, bias, alpha):
        return cpu_compiled.mhc_pre(x, phi, bias, alpha, mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps)
    return _PreSide.apply(x, phi, bias, alpha, mode, sinkhorn_iters, eps)


# --------------------------------------------------------------------------- post side


class _PostSide(torch.autograd.Function):
    """``X [M, n, C], y [M, C], H_post [M, n], H_res [M, n, n] -> X_next [M, n, C]`` (X's dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:  # type: ignore[override]
        acc = _accumulation_dtype(x)
        with _autocast_off(x.device):
            xf, yf = x.to(acc), y.to(acc)
            h_post, h_res = h_post.to(acc), h_res.to(acc)
            out = torch.baddbmm(h_post.unsqueeze(-1) * yf.unsqueeze(1), h_res, xf)
        ctx.save_for_backward(x, y, h_post, h_res)
        return out.to(x.dtype)

    @staticmethod
    @backward_without_autocast
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, y, h_post, h_res = ctx.saved_tensors
        g = grad.to(h_res.dtype)
        need_x, need_y, need_post, need_res = ctx.needs_input_grad
        g_x = torch.bmm(h_res.transpose(1, 2), g).to(x.dtype) if need_x else None
        g_y = _aggregate(g, h_post).to(y.dtype) if need_y else None
        g_post = torch.bmm(g, y.to(g.dtype).unsqueeze(-1)).squeeze(-1) if need_post else None
        g_res = torch.bmm(g, x.to(g.dtype).transpose(1, 2)) if need_res else None
        return g_x, g_y, g_post, g_res


def mhc_post(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_post`."""
    if native.usable(x) and _exact_post(x, y, h_post, h_res):
        return cpu_compiled.mhc_post(x, y, h_post, h_res)
    return _PostSide.apply(x, y, h_post, h_res)


def mhc_post_pre(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    *, mode: str = "mhc", sinkhorn_iters: int = 20, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_post_pre`."""
    _check_iterations(mode, sinkhorn_iters)
    if mode in MODES and native.usable(x) and _exact_post(x, y, h_post, h_res) and _exact_pre(x, phi, bias, alpha):
        return cpu_compiled.mhc_post_pre(x, y, h_post, h_res, phi, bias, alpha, mode=mode,
                                         sinkhorn_iters=sinkhorn_iters, eps=eps)
    x_next = mhc_post(x, y, h_post, h_res)
    u, h_post2, h_res2 = mhc_pre(x_next, phi, bias, alpha, mode=mode,
                                 sinkhorn_iters=sinkhorn_iters, eps=eps)
    return x_next, u, h_post2, h_res2


from . import cpu_compiled  # noqa: E402 (it builds on the helpers above)

__all__ = ["sinkhorn_knopp", "mhc_aggregate", "mhc_pre", "mhc_post", "mhc_post_pre"]
