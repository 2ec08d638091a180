"""The CPU connection sides through the compiled kernels of :mod:`.native`.

Same functions and contracts as :mod:`mhc_compile.ops.reference` (as :mod:`.cpu`, which
calls these where :func:`.native.usable` holds). Each side is one autograd node whose
per-token work (the coefficient activations, Sinkhorn-Knopp and its backward, the
aggregate, the stream mix, the projection onto ``phi`` and its two backward products) is
one compiled pass per side and direction, on tiles of tokens that stay in the L1 cache;
the pre side's backward recomputes Sinkhorn-Knopp from the saved ``d``. The fused post +
pre side is one node too, whose backward is one pass where the post mix ran in the streams'
dtype (y of that dtype, or cast to it): per tile, the pre side's ``dX`` plus ``X_next``'s
own gradient, then the post side's backward of that sum; otherwise (y of another dtype) the
sum goes through memory to a second pass of the post side.

Shapes: ``x [M, n, C]`` (float32, float64, bfloat16 or float16), ``y [M, C]``,
``h_post [M, n]``, ``h_res [M, n, n]``, ``phi [nC, n^2 + 2n]``, ``bias [n^2 + 2n]``,
``alpha [3]``; coefficients in float32 (float64 for float64 streams), autocast off.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu, native


def _contiguous(g: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if g is None else g.to(dtype).contiguous()


# --------------------------------------------------------------------------- the two sides


def _pre_forward(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, mode: str, iters: int,
                 eps: float) -> tuple[tuple[Tensor, Tensor, Tensor], tuple]:
    """``(u [M, C] x.dtype, h_post [M, n], h_res [M, n, n])`` and the tensors its backward reads
    (not H_res: the backward recomputes Sinkhorn-Knopp from ``d``)."""
    n = x.shape[1]
    acc = cpu._accumulation_dtype(x)
    x = x.contiguous()
    gate = cpu._gate_per_column(alpha.to(acc), n).contiguous()
    bias = bias.to(acc).contiguous()
    u, rstd, d, act, h_pre, h_post, h_res = native.ops().pre_forward(
        x, phi.to(acc).contiguous(), bias, gate, mode == "mhc", iters, eps, cpu._TINY)
    return (u, h_post, h_res), (x, phi, bias, gate, rstd, d, act, h_pre)


def _pre_backward(saved: tuple, mode: str, iters: int, g_u: Optional[Tensor], g_post: Optional[Tensor],
                  g_res: Optional[Tensor], need_x: bool, need_phi: bool,
                  g_x_more: Optional[Tensor] = None, post: Optional[tuple] = None) -> tuple:
    """``(dX, dphi, dbias, dalpha)`` in one pass over the tokens; ``g_x_more``: a gradient of X
    from elsewhere, added to dX. ``post``: ``(post_saved, post_needs)`` of the post side that
    made X (the fused node, streams and y of one dtype): dX goes on through that side's backward
    in the same pass, and ``(dX_prev, dy, dH_post_prev, dH_res_prev, dphi, dbias, dalpha)`` come
    back instead."""
    if g_u is None and g_post is None and g_res is None and post is None:  # no gradient reached the outputs
        return g_x_more if need_x else None, None, None, None
    x, phi, bias, gate, rstd, d, act, h_pre = saved
    acc = d.dtype
    x_prev = y = h_post_prev = h_res_prev = None
    post_needs: list = []
    if post is not None:
        (x_prev, y, h_post_prev, h_res_prev), needs = post
        post_needs = [int(bool(need)) for need in needs]
    grads = native.ops().pre_backward(
        x, phi.to(acc).t().contiguous(), bias, gate, rstd, d, act, h_pre, _contiguous(g_u, x.dtype),
        _contiguous(g_post, acc), _contiguous(g_res, acc), _contiguous(g_x_more, x.dtype) if need_x else None,
        mode == "mhc", iters, cpu._TINY, need_x, need_phi, x_prev, y, h_post_prev, h_res_prev, post_needs)
    g_x, g_phi, g_bias, g_alpha, *post_grads = grads
    g_phi = None if g_phi is None else g_phi.to(phi.dtype)
    if post is not None:
        return (*post_grads, g_phi, g_bias, g_alpha)
    return g_x, g_phi, g_bias, g_alpha


def _post_forward(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> tuple[Tensor, tuple]:
    """``X_next [M, n, C]`` (x.dtype) and the tensors its backward reads. The mix runs in x's
    dtype where y has it too, else both in the accumulation dtype."""
    acc = cpu._accumulation_dtype(x)
    work = x.dtype if y.dtype == x.dtype else acc
    h_post, h_res = h_post.to(acc).contiguous(), h_res.to(acc).contiguous()
    x_work, y_work = x.to(work).contiguous(), y.to(work).contiguous()
    out = native.ops().post_forward(x_work, y_work, h_post, h_res)
    return out.to(x.dtype), (x_work, y_work, h_post, h_res)


def _post_backward(grad: Tensor, saved: tuple, needs: tuple, x_dtype: torch.dtype, y_dtype: torch.dtype) -> tuple:
    """``(dX, dy, dH_post, dH_res)``, None where ``needs`` says so."""
    x, y, h_post, h_res = saved
    g_x, g_y, g_post, g_res = native.ops().post_backward(
        grad.to(x.dtype).contiguous(), x, y, h_post, h_res, *needs)
    return (None if g_x is None else g_x.to(x_dtype), None if g_y is None else g_y.to(y_dtype), g_post, g_res)


# --------------------------------------------------------------------------- autograd nodes


class _PreSide(torch.autograd.Function):
    """``X [M, n, C] -> u [M, C] (X's dtype), H_post [M, n], H_res [M, n, n]``."""

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, mode, iters, eps):  # type: ignore[override]
        with cpu._autocast_off(x.device):
            outs, saved = _pre_forward(x, phi, bias, alpha, mode, iters, eps)
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (no zeros to read)
        ctx.mode, ctx.iters = mode, iters
        return outs

    @staticmethod
    @cpu.backward_without_autocast
    @once_differentiable
    def backward(ctx, g_u, g_post, g_res):  # type: ignore[override]
        need_x, need_phi = ctx.needs_input_grad[:2]
        grads = _pre_backward(ctx.saved_tensors, ctx.mode, ctx.iters, g_u, g_post, g_res, need_x, need_phi)
        return (*grads, None, None, None)


class _PostSide(torch.autograd.Function):
    """``X [M, n, C], y [M, C], H_post [M, n], H_res [M, n, n] -> X_next [M, n, C]`` (X's dtype)."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res):  # type: ignore[override]
        with cpu._autocast_off(x.device):
            out, saved = _post_forward(x, y, h_post, h_res)
        ctx.save_for_backward(*saved)
        ctx.dtypes = (x.dtype, y.dtype)
        return out

    @staticmethod
    @cpu.backward_without_autocast
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        return _post_backward(grad, ctx.saved_tensors, ctx.needs_input_grad, *ctx.dtypes)


class _PostPreSide(torch.autograd.Function):
    """The post side of one connection and the pre side of the next, one node:
    ``X, y, H_post, H_res, phi, bias, alpha -> X_next, u, H_post', H_res'``."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res, phi, bias, alpha, mode, iters, eps):  # type: ignore[override]
        with cpu._autocast_off(x.device):
            x_next, post_saved = _post_forward(x, y, h_post, h_res)
            outs, pre_saved = _pre_forward(x_next, phi, bias, alpha, mode, iters, eps)
        ctx.save_for_backward(*post_saved, *pre_saved)
        ctx.set_materialize_grads(False)  # X_next alone used downstream: no pre-side gradients at all
        ctx.mode, ctx.iters, ctx.dtypes = mode, iters, (x.dtype, y.dtype)
        return (x_next, *outs)

    @staticmethod
    @cpu.backward_without_autocast
    @once_differentiable
    def backward(ctx, g_x_next, g_u, g_post, g_res):  # type: ignore[override]
        saved = ctx.saved_tensors
        post_saved, pre_saved = saved[:4], saved[4:]
        post_needs = tuple(ctx.needs_input_grad[:4])
        pre_side_used = g_u is not None or g_post is not None or g_res is not None  # else X_next alone
        if pre_side_used and any(post_needs) and post_saved[0].dtype == pre_saved[0].dtype:  # mix in X's dtype
            *post_grads, g_phi, g_bias, g_alpha = _pre_backward(
                pre_saved, ctx.mode, ctx.iters, g_u, g_post, g_res, True, ctx.needs_input_grad[4],
                g_x_more=g_x_next, post=(post_saved, post_needs))
            if post_grads[1] is not None:  # dy in y's own dtype (y was cast to X's for the mix)
                post_grads[1] = post_grads[1].to(ctx.dtypes[1])
        else:
            g_mid, g_phi, g_bias, g_alpha = _pre_backward(
                pre_saved, ctx.mode, ctx.iters, g_u, g_post, g_res, any(post_needs), ctx.needs_input_grad[4],
                g_x_more=g_x_next)
            post_grads = (None,) * 4
            if any(post_needs) and g_mid is not None:
                post_grads = _post_backward(g_mid, post_saved, post_needs, *ctx.dtypes)
        return (*post_grads, g_phi, g_bias, g_alpha, None, None, None)


def mhc_pre(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, *, mode: str = "mhc",
            sinkhorn_iters: int = 20, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_pre` (``mode``: ``"mhc"`` or ``"hc"``)."""
    return _PreSide.apply(x, phi, bias, alpha, mode, sinkhorn_iters, eps)


def mhc_post(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_post`."""
    return _PostSide.apply(x, y, h_post, h_res)


def mhc_post_pre(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    *, mode: str = "mhc", sinkhorn_iters: int = 20, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as :func:`mhc_compile.ops.reference.mhc_post_pre`."""
    return _PostPreSide.apply(x, y, h_post, h_res, phi, bias, alpha, mode, sinkhorn_iters, eps)


__all__ = ["mhc_pre", "mhc_post", "mhc_post_pre"]
