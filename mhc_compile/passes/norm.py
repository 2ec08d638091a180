"""Lowering pass: hand a pre side the RMSNorm that follows it (graph -> graph).

In a pre-norm transformer block the branch input ``u`` of each connection goes straight
into an RMSNorm (``input_layernorm``, ``post_attention_layernorm``). Where that norm is a
Llama-style one (``w * (u * rsqrt(mean(u^2) + eps))``, the normalised row rounded to
``u``'s dtype before the weight multiplies it; checked numerically on the module itself)
and ``u`` has no other user, the norm's call moves into the ``mhc_pre`` / ``mhc_post_pre``
call (its ``norm=`` argument), which then returns the norm's output in ``u``'s place.

At run time the op computes the norm in its own coefficient launch where it can (a no-grad
call with few tokens: batch-1 decode, where an eager RMSNorm is several kernel launches of
host time and a compiled one a kernel of its own) and calls the module on ``u`` everywhere
else, so the results are the module's own (:func:`mhc_compile.ops.functional.mhc_pre`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..ops import functional

_FUSED = (functional.mhc_pre, functional.mhc_post_pre)
PROBE_SCALES = (1.0, 1e-3)  # the second makes mean(u^2) comparable to eps: a wrong eps shows


def fuse_pre_norms(gm: fx.GraphModule) -> int:
    """Move each Llama-style RMSNorm that is the only user of a pre side's ``u`` into the
    pre side's call. Recompiles ``gm``; returns the number of norms moved."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _FUSED or node.kwargs.get("norm") is not None:
            continue
        if node.kwargs.get("channel_dim") != -1:
            continue
        index = 0 if node.target is functional.mhc_pre else 1
        u = next((user for user in node.users if user.target is operator.getitem and user.args[1] == index), None)
        if u is None or len(u.users) != 1:
            continue
        norm = next(iter(u.users))
        if norm.op != "call_module" or norm.args != (u,) or norm.kwargs:
            continue
        module = modules.get(norm.target)
        if module is None or not llama_style_rms_norm(module):
            continue
        with graph.inserting_before(node):
            reference = graph.get_attr(norm.target)
        node.kwargs = {**node.kwargs, "norm": reference}
        norm.replace_all_uses_with(u)
        graph.erase_node(norm)
        moved += 1
    if moved:
        gm.recompile()
    return moved


def llama_style_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` (a class named ``*RMSNorm*``, without buffers or children)
    computes a Llama-style RMSNorm over its input's last axis, with the weight
    ``module.weight [C]`` and the epsilon :func:`functional.rms_norm_eps` reads: compared
    with that formula on random rows of two magnitudes. A module that passes is remembered
    by class (:data:`functional.FUSABLE_NORMS`)."""
    weight = getattr(module, "weight", None)
    eps = functional.rms_norm_eps(module)
    if (not isinstance(weight, nn.Parameter) or weight.dim() != 1 or weight.is_meta or eps is None
            or "rmsnorm" not in type(module).__name__.lower()
            or any(True for _ in module.children()) or any(True for _ in module.buffers())):
        return False  # only RMSNorm classes, and none with state a probe call could change
    if type(module) in functional.FUSABLE_NORMS:
        return True
    generator = torch.Generator(device=weight.device).manual_seed(0)
    for scale in PROBE_SCALES:
        rows = torch.randn(3, weight.shape[0], generator=generator, device=weight.device) * scale
        rows = rows.to(weight.dtype)
        try:
            with torch.no_grad():
                out = module(rows)
        except Exception:  # noqa: BLE001 - a module that cannot take plain rows is not one
            return False
        expected = _llama_rms_norm(rows, weight.detach(), eps)
        if not isinstance(out, torch.Tensor) or out.shape != rows.shape or out.dtype != rows.dtype:
            return False
        if not _close(out, expected):
            return False
    functional.FUSABLE_NORMS.add(type(module))
    return True


def _llama_rms_norm(u: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = u.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(u.dtype)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to one rounding of the dtype (relative, over the whole tensor)."""
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 8e-3
    diff = (a.float() - b.float()).norm()
    return bool(torch.isfinite(diff)) and diff.item() <= tol * max(b.float().norm().item(), 1e-30)


__all__ = ["fuse_pre_norms", "llama_style_rms_norm"]
