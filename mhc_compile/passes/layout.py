"""Which axis of a block's residual stream holds the channels (graph -> axis).

A stream ``[..., C]`` (transformers, MLPs) has its channels last; a conv net's
``[B, C, *S]`` has them at axis 1. The axis follows from the block's structure, not from
the sample's sizes: the channel count is the feature count of the trained layers that
write the branch (``Linear.out_features``, ``Conv.out_channels``, a norm's or a layer
scale's width). Where both axes fit (``C == W`` by coincidence) the trained layer nearest
the add decides: a convolution or batch norm means axis 1.
"""

from __future__ import annotations

from typing import Optional

from torch import fx, nn

from .find_residuals import ResidualAdd

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def module_widths(module: nn.Module) -> set[int]:
    """The feature counts a layer writes: out features/channels, a norm's width, or the
    leading size of every 1-D parameter of a module without children."""
    if isinstance(module, nn.Linear):
        return {module.out_features}
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return {module.out_channels}
    if isinstance(module, nn.LayerNorm):
        return {module.normalized_shape[-1]} if module.normalized_shape else set()
    if isinstance(module, nn.GroupNorm):
        return {module.num_channels}
    return {int(p.shape[0]) for p in module.parameters() if p.dim() == 1}


def branch_widths(gm: fx.GraphModule, res: ResidualAdd) -> set[int]:
    """Feature counts written by the trained layers and parameters on ``res``'s branch."""
    modules = dict(gm.named_modules())
    widths: set[int] = set()
    for node in res.branch_nodes:
        if node.op == "call_module" and node.target in modules:
            widths |= module_widths(modules[node.target])
        for inp in node.all_input_nodes:
            if inp.op == "get_attr":
                try:
                    value = gm.get_parameter(str(inp.target))
                except (AttributeError, TypeError):
                    continue
                if value.dim() >= 1:
                    widths.add(int(value.shape[0]))
    return widths


def ends_in_conv(gm: fx.GraphModule, res: ResidualAdd) -> bool:
    """The trained layer nearest the add on ``res``'s branch is a convolution or batch norm."""
    modules = dict(gm.named_modules())
    for n in reversed(res.branch_nodes):
        mod = modules.get(n.target) if n.op == "call_module" else None
        if mod is not None and any(True for _ in mod.parameters()):
            return isinstance(mod, _CONV_TYPES)
    return False


def channel_axis(gm: fx.GraphModule, residuals: list[ResidualAdd], requested: Optional[int] = None) -> int:
    """``-1`` (channels last) or ``1`` (channels first) for all of ``gm``'s connections."""
    if requested is not None:
        return requested
    fits = []
    for axis in (-1, 1):
        if all(len(r.shape) > 2 or axis == -1 for r in residuals) and all(
            r.shape[axis] in branch_widths(gm, r) for r in residuals
        ):
            fits.append(axis)
    conv = all(ends_in_conv(gm, r) for r in residuals)
    if len(fits) == 1:
        return fits[0]
    return 1 if conv and all(len(r.shape) > 2 for r in residuals) else -1
