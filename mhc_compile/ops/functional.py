"""The ops the rewritten graphs call: stream layout handling plus backend dispatch.

A stream tensor keeps the layout of the single stream it replaced, with the stream axis
inserted just before the channel axis:

* channels-last (``channel_dim=-1``): ``[..., C] -> [..., n, C]`` (transformers);
* channels-first (``channel_dim=1``): ``[B, C, *S] -> [B, n, C, *S]`` (conv nets).

Both are viewed as ``[M, n, C]`` token-major for the math (a copy for channels-first).
The per-token coefficients ``H_post [M, n]`` and ``H_res [M, n, n]`` travel between
``mhc_pre`` and ``mhc_post`` in that token order.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from . import cpu, reference

# Callables ``obs(kind, tensors)`` told about every eager ``mhc_pre`` call (diagnostics).
OBSERVERS: list[Callable[[str, dict], None]] = []
# RMSNorm classes checked to compute the Llama-style norm (``passes.norm``): a pre side
# given one as ``norm=`` may compute it in its own kernel launch.
FUSABLE_NORMS: set[type] = set()


def stream_dim_of(channel_dim: int) -> int:
    """Stream axis of a stream tensor for a given channel axis of the single stream."""
    return -2 if channel_dim == -1 else channel_dim


def streams_to_tokens(x: Tensor, channel_dim: int) -> Tensor:
    """``[..., n, C]`` or ``[B, n, C, *S]`` -> ``[M, n, C]``."""
    if channel_dim == -1:
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    moved = x.movedim((1, 2), (-2, -1))  # [B, *S, n, C]
    return moved.reshape(-1, moved.shape[-2], moved.shape[-1])


def tokens_to_streams(t: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """Inverse of :func:`streams_to_tokens`; ``like`` is a stream tensor of the target shape."""
    if channel_dim == -1:
        return t.reshape(like.shape)
    b, n, c, *spatial = like.shape
    return t.reshape(b, *spatial, n, c).movedim((-2, -1), (1, 2))


def tokens_to_single(t: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """``[M, C]`` -> the single-stream layout of the stream tensor ``like``."""
    if channel_dim == -1:
        return t.reshape(*like.shape[:-2], like.shape[-1])
    b, _, c, *spatial = like.shape
    return t.reshape(b, *spatial, c).movedim(-1, 1)


def single_to_tokens(y: Tensor, channel_dim: int) -> Tensor:
    """A single-stream tensor ``[..., C]`` or ``[B, C, *S]`` -> ``[M, C]``."""
    if channel_dim == -1:
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _use_kernels(x: Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return x.is_cuda and _kernels_available()


def _kernels_available() -> bool:
    return _library().KERNELS_AVAILABLE


def _impl(name: str, backend: str, x: Tensor, **kernel_options) -> Callable:
    """``ops.library.<name>`` (the fused kernels, given ``kernel_options``),
    ``ops.reference.<name>`` (``backend="torch"``) or ``ops.cpu.<name>`` (``"auto"`` where the
    kernels don't run: the same math in fewer ops)."""
    if _use_kernels(x, backend):
        op = getattr(_library(), name)
        return functools.partial(op, **kernel_options) if kernel_options else op
    return getattr(reference if backend == "torch" else cpu, name)


def _library():
    """``ops.library``, imported on first use (it imports Triton)."""
    from . import library

    return library


def _observe(streams: Tensor, h_post: Tensor, h_res: Tensor) -> None:
    for observer in OBSERVERS:
        observer("pre", {"streams": streams, "h_post": h_post, "h_res": h_res})


def mhc_pre(
    x: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    mode: str,
    sinkhorn_iters: int,
    eps: float,
    channel_dim: int,
    backend: str,
    norm: Optional[nn.Module] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pre side of one connection on a stream tensor.

    Returns the branch input ``u`` in the single-stream layout, ``H_post [M, n]`` and
    ``H_res [M, n, n]`` (float32, token-major). ``norm``: an RMSNorm module that follows
    (channels-last only, see :mod:`mhc_compile.passes.norm`); ``norm(u)`` is returned in
    ``u``'s place, computed by the kernels where :func:`_norm_in_kernel` allows.
    """
    tokens = streams_to_tokens(x, channel_dim)
    if norm is not None and _norm_in_kernel(norm, tokens, backend, phi, bias, alpha):
        u, h_post, h_res = _library().mhc_pre_normed(
            tokens, phi, bias, alpha, norm.weight, rms_norm_eps(norm), mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps)
    else:
        u, h_post, h_res = _impl("mhc_pre", backend, tokens)(
            tokens, phi, bias, alpha, mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps
        )
        if norm is not None:
            u = norm(tokens_to_single(u, x, channel_dim))
    if OBSERVERS:
        _observe(tokens, h_post, h_res)
    return tokens_to_single(u, x, channel_dim), h_post, h_res


def rms_norm_eps(module: nn.Module) -> Optional[float]:
    """The epsilon an RMSNorm module keeps (``variance_epsilon`` or ``eps``), if a float."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _norm_in_kernel(norm: nn.Module, tokens: Tensor, backend: str, *tensors: Tensor) -> bool:
    """Whether the kernels compute ``norm`` after the pre side over ``tokens [M, n, C]``:
    a checked class (:data:`FUSABLE_NORMS`) with no hooks to run, and a call the kernels can
    serve that way (``ops.library.norm_fusable``)."""
    if type(norm) not in FUSABLE_NORMS or norm._forward_hooks or norm._forward_pre_hooks:
        return False
    if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks:
        return False
    return _use_kernels(tokens, backend) and _library().norm_fusable(tokens, norm.weight, *tensors)


def mhc_post(
    x: Tensor,
    y: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    *,
    channel_dim: int,
    backend: str,
    deterministic: bool = False,
    source: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None,
) -> Tensor:
    """Post side of one connection: ``X_next = H_res X + H_post^T y`` in the stream layout.

    ``deterministic``: the kernels' backward gives bitwise-reproducible gradients (the
    reference ops are as deterministic as PyTorch's own). ``source``: ``(x_prev, y_prev,
    H_post_prev, H_res_prev)`` where ``x`` is the ``X_next`` of ``mhc_post_pre(x_prev,
    y_prev, H_post_prev, H_res_prev, ..., keep_next=False)`` (layouts as there): the
    kernels' backward then recomputes ``x`` from those instead of keeping it
    (:mod:`mhc_compile.passes.streams`); the other backends keep ``x``, and so do calls
    that record no gradient or whose ``x_prev`` is not contiguous in the token view."""
    tokens = streams_to_tokens(x, channel_dim)
    y_tokens = single_to_tokens(y, channel_dim).to(x.dtype)
    options = {"deterministic": deterministic}
    if source is not None and torch.is_grad_enabled():  # no backward, nothing to keep: skip its host work
        x_prev, y_prev, h_post_prev, h_res_prev = source
        x_prev_tokens = streams_to_tokens(x_prev, channel_dim)
        if x_prev_tokens.is_contiguous():  # else keeping it would mean a copy as large as x: keep x
            options["source"] = (x_prev_tokens, single_to_tokens(y_prev, channel_dim), h_post_prev, h_res_prev)
    out = _impl("mhc_post", backend, tokens, **options)(tokens, y_tokens, h_post, h_res)
    return tokens_to_streams(out, x, channel_dim)


def mhc_post_pre(
    x: Tensor,
    y: Tensor,
    h_post: Tensor,
    h_res: Tensor,
    phi: Tensor,
    bias: Tensor,
    alpha: Tensor,
    *,
    mode: str,
    sinkhorn_iters: int,
    eps: float,
    channel_dim: int,
    backend: str,
    deterministic: bool = False,
    norm: Optional[nn.Module] = None,
    keep_next: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Post of one connection fused with the pre of the next (one kernel on the GPU).

    Same results as ``mhc_post`` then ``mhc_pre``: returns ``X_next`` in the stream layout,
    the next connection's ``u`` in the single-stream layout, its ``H_post [M, n]`` and
    ``H_res [M, n, n]``. ``norm``: as in :func:`mhc_pre`, on the next connection's ``u``.
    ``keep_next=False``: the kernels' backward recomputes ``X_next`` instead of keeping it
    (see ``mhc_post``'s ``source``).
    """
    tokens = streams_to_tokens(x, channel_dim)
    y_tokens = single_to_tokens(y, channel_dim).to(x.dtype)
    if norm is not None and _norm_in_kernel(norm, tokens, backend, y_tokens, h_post, h_res, phi, bias, alpha):
        x_next, u, h_post2, h_res2 = _library().mhc_post_pre_normed(
            tokens, y_tokens, h_post, h_res, phi, bias, alpha, norm.weight, rms_norm_eps(norm),
            mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps)
    else:
        x_next, u, h_post2, h_res2 = _impl("mhc_post_pre", backend, tokens, deterministic=deterministic,
                                           keep_next=keep_next)(
            tokens, y_tokens, h_post, h_res, phi, bias, alpha,
            mode=mode, sinkhorn_iters=sinkhorn_iters, eps=eps,
        )
        if norm is not None:
            u = norm(tokens_to_single(u, x, channel_dim))
    if OBSERVERS:
        _observe(x_next, h_post2, h_res2)
    return tokens_to_streams(x_next, x, channel_dim), tokens_to_single(u, x, channel_dim), h_post2, h_res2


def resolve_stream_dtype(x: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of the n streams that replace the single stream ``x``.

    An explicit ``dtype`` wins. Otherwise (``stream_dtype=None``, the default) a float32
    residual under autocast becomes streams of the autocast dtype (bf16 streams move half
    the bytes; Hugging Face models keep a float32 residual under autocast), and any other
    residual keeps its dtype. Outside autocast the streams are exactly the residual's dtype,
    so ``init="preserve"`` stays exact.
    """
    if dtype is not None:
        return dtype
    device = x.device.type
    if (x.dtype == torch.float32 and device in cpu.AUTOCAST_DEVICES
            and torch.is_autocast_enabled(device)):
        return torch.get_autocast_dtype(device)
    return x.dtype


def expand(x: Tensor, n: int, *, channel_dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Start of a chain: one stream ``[..., C]`` (or ``[B, C, *S]``) -> n identical streams
    ``[..., n, C]`` (or ``[B, n, C, *S]``), of the dtype :func:`resolve_stream_dtype` picks."""
    x = x.to(resolve_stream_dtype(x, dtype))
    return reference.expand_streams(x, n, stream_dim_of(channel_dim))


def collapse(x: Tensor, *, channel_dim: int, reduce: str) -> Tensor:
    """End of a chain: n streams -> one, by ``"mean"`` or ``"sum"``."""
    return reference.collapse_streams(x, stream_dim_of(channel_dim), reduce)


__all__ = ["mhc_pre", "mhc_post", "mhc_post_pre", "expand", "collapse", "stream_dim_of"]
