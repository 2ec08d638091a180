"""Conversion checks its own result before it returns.

The converted model runs on the sample inputs and on probes one batch row and one position
longer, in eval mode; with ``init="preserve"`` its outputs must equal the original model's
(computed before the rewrite) within rounding. A failure raises
:class:`~mhc_compile.blocks.ConversionError` and the caller restores the model, so a wrong
layout or a graph that only fits the sample's sizes never reaches the user.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .errors import ConversionError, first_line
from .capture import side_effect_free, without_cache

Probe = tuple[tuple, dict]


def probes(args: tuple, kwargs: dict) -> list[Probe]:
    """The sample call; where every tensor input shares its leading size, the same call
    with one more batch row; and the call with one more position along axis 1 of every
    input of two or more axes (a longer sequence). Probes the original model rejects
    (an image with a fourth channel) are skipped by :func:`run_probes`."""
    leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    out = [(args, kwargs)]
    if len({int(t.shape[0]) for t in leaves}) == 1:
        out.append(tree_map(lambda t: _grow(t, 0), (args, kwargs)))
    if leaves and all(t.dim() >= 2 for t in leaves):
        out.append(tree_map(lambda t: _grow(t, 1), (args, kwargs)))
    return out


def _grow(value: object, axis: int) -> object:
    """A tensor with its first slice along ``axis`` repeated once more at the end."""
    if isinstance(value, torch.Tensor) and value.dim() > axis:
        return torch.cat([value, value.narrow(axis, 0, 1)], dim=axis)
    return value


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, each module's own flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _float_outputs(model: nn.Module, call: Probe) -> list[torch.Tensor]:
    """The float output tensors of one eval-mode call that changes no buffer or RNG state."""
    args, kwargs = call
    with eval_mode(model), side_effect_free(model):
        out = model(*args, **without_cache(model, kwargs))
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def run_probes(model: nn.Module, calls: list[Probe]) -> list[Optional[list[torch.Tensor]]]:
    """Float output tensors of each probe call (``None`` where the call fails)."""
    outs: list[Optional[list[torch.Tensor]]] = []
    for call in calls:
        try:
            outs.append(_float_outputs(model, call))
        except Exception:  # noqa: BLE001 - a probe the model itself does not accept
            outs.append(None)
    return outs


def _tolerance(dtype: torch.dtype, stream_dtype: Optional[torch.dtype], device_type: str = "cpu") -> float:
    """Relative error allowed at init: rounding of the outputs' and the streams' dtype.

    float32 matmuls on CUDA under ``torch.set_float32_matmul_precision("high")`` run in
    TF32 (10 mantissa bits): the streams' float32 rounding (1e-7) then moves some TF32
    roundings, and over tens of layers the outputs differ by ~1e-3, so TF32 gets the
    half-precision bound of 2e-2 rather than float32's 1e-4."""
    exact = (None, torch.float32, torch.float64)
    if dtype not in (torch.float32, torch.float64) or stream_dtype not in exact:
        return 5e-2
    if device_type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return 2e-2
    return 1e-4


def check(model: nn.Module, calls: list[Probe], reference: list[Optional[list[torch.Tensor]]],
          compare: bool, stream_dtype: Optional[torch.dtype] = None) -> None:
    """Run the converted ``model`` on every probe the original accepted; with ``compare``
    its outputs must equal ``reference`` within the rounding of their dtype and of
    ``stream_dtype``. Raises ConversionError otherwise."""
    for i, (call, ref) in enumerate(zip(calls, reference)):
        if ref is None:
            continue
        what = ("the sample inputs", "the sample inputs with one more batch row",
                "the sample inputs one position longer")[i]
        try:
            got = _float_outputs(model, call)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ConversionError(
                f"the converted {type(model).__name__} fails on {what} ({type(err).__name__}: "
                f"{first_line(err)}); the model was left unchanged"
            ) from err
        if not compare:
            continue
        for a, b in zip(ref, got):
            if a.shape != b.shape or a.device.type == "meta":  # meta: shapes are all there is
                if a.shape == b.shape:
                    continue
                raise ConversionError(
                    f"the converted {type(model).__name__} returns shape {list(b.shape)} where the "
                    f"original returns {list(a.shape)} on {what}; the model was left unchanged"
                )
            scale = a.detach().abs().max().float().clamp_min(1e-12)
            err = ((a.detach().float() - b.detach().float()).abs().max() / scale).item()
            if not err <= _tolerance(a.dtype, stream_dtype, a.device.type):
                raise ConversionError(
                    f"the converted {type(model).__name__} differs from the original at init on "
                    f"{what} (max relative error {err:.3g}); a connection was rewritten with the "
                    "wrong stream layout (try channel_dim=) or a block's structure was misread; "
                    "the model was left unchanged"
                )


__all__ = ["probes", "run_probes", "check", "eval_mode", "Probe"]
