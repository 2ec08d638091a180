"""How a converted block runs: the block runtime.

A converted block is the user's own module object, kept so that everything that holds
it keeps working: FSDP2's ``fully_shard(block)``, activation checkpointing (HF's
``gradient_checkpointing_enable()`` wraps the block's call), ``block.compile()``,
``train()``/``eval()`` and the state_dict keys. Conversion changes three things on it:

* ``block.mhc``: a ``ModuleList`` of :class:`~mhc_compile.layers.MHCConnection`, the new
  parameters (ordinary children, so optimisers, FSDP2 and ``state_dict`` see them);
* ``block._mhc_plan``: a :class:`BlockPlan`, what the block needs to build its rewritten
  graphs (the analysis and the options) and a cache of the graphs built so far;
* ``block.forward``: a :class:`BlockForward` instance attribute. It has the block's own
  signature (a small generated function binds the call's arguments to their names),
  picks the rewritten graph for this call and runs it with the block as ``self``.

Which graph: one rewritten graph (a :class:`~mhc_compile.blocks.Variant`) exists per
*specialisation* of the call, keyed by :func:`~mhc_compile.trace.make_key`: the
``training`` flag, the value of every ``None``/constant argument and the dtype/device of
every tensor argument (arguments that leave the graph unchanged, ``passthrough``, are left
out of the key where that was checked for the call's specialisation, see
:func:`variant_for`). Both training flags of the sample call are built at conversion;
any other key is traced and rewritten on its first call, outside ``torch.compile``
(one graph break; an error under ``fullgraph=True``, where one eager call first helps).

``recompute="mhc"`` runs the chosen graph under selective activation checkpointing
(:mod:`mhc_compile.recompute`); the graph is chosen outside the checkpointed region so
that the recomputation replays the same ops.

Pickling, ``copy.deepcopy`` and ``torch.save(model)`` work: the plan drops its graph cache
and the forward drops its generated binder when pickled; both are rebuilt on load (the
graphs on first use).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from .blocks import BlockAnalysis, Variant, build_variant, keeps_passthrough
from .config import MHCConfig
from .heuristics import MHC_ATTRIBUTE
from .layers import MHCConnection
from .ops import functional
from .recompute import holds_cache, run_with_recompute, warn_cache_once
from .trace import make_key

PLAN_ATTRIBUTE = "_mhc_plan"


@dataclass
class BlockPlan:
    """What a converted block needs at run time: its analysis (without the sample call's
    values), the conversion options and the rewritten graphs built so far."""

    analysis: BlockAnalysis
    config: MHCConfig
    variants: dict = field(default_factory=dict)

    def __getstate__(self) -> dict:
        return {"analysis": self.analysis, "config": self.config, "variants": {}}


class BlockForward:
    """The ``forward`` of a converted block: the block's own signature, dispatching to the
    rewritten graph of this call (see the module docstring)."""

    def __init__(self, block: nn.Module, params: list[inspect.Parameter]) -> None:
        self.block = block
        self.params = params
        self._bind = _make_binder(params, type(block).__name__)
        self.__doc__ = type(block).forward.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.Signature(self.params)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._bind(self.block, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {"block": self.block, "params": self.params}

    def __setstate__(self, state: dict) -> None:
        self.block, self.params = state["block"], state["params"]
        self._bind = _make_binder(self.params, type(self.block).__name__)


def _make_binder(params: list[inspect.Parameter], name: str) -> Callable:
    """``bind(block, <the block's parameters>) -> dispatch(block, {name: value})``.

    Generated so that a call binds its arguments at Python speed and ``torch.compile``
    traces it without graph breaks (``inspect.Signature.bind`` would cost both).
    """
    parts, collect, var_kw, var_pos = [], [], None, None
    defaults = {}
    saw_kw_only_marker = False
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            var_pos = p.name
            saw_kw_only_marker = True
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = p.name
            continue
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not saw_kw_only_marker:
            parts.append("*")
            saw_kw_only_marker = True
        text = p.name
        if p.default is not inspect.Parameter.empty:
            defaults[p.name] = p.default
            text += f"=_defaults[{p.name!r}]"
        parts.append(text)
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and not any(
            q.kind is inspect.Parameter.POSITIONAL_ONLY for q in params[params.index(p) + 1 :]
        ):
            parts.append("/")
        collect.append(f"{p.name!r}: {p.name}")
    if var_kw:
        parts.append(f"**{var_kw}")
    lines = [f"def forward(_block, {', '.join(parts)}):", f"    _vals = {{{', '.join(collect)}}}"]
    if var_pos:
        lines.append(f"    if {var_pos}: raise TypeError('rewritten block takes no extra positional arguments')")
    if var_kw:
        lines.append(f"    _vals.update({var_kw})")
    lines.append("    return dispatch(_block, _vals)")
    scope = {"_defaults": defaults, "dispatch": dispatch}
    exec(compile("\n".join(lines) + "\n", f"<mhc forward of {name}>", "exec"), scope)  # noqa: S102
    return scope["forward"]


def dispatch(block: nn.Module, values: dict) -> Any:
    """Run the rewritten graph of this call (under recomputation where configured)."""
    plan: BlockPlan = getattr(block, PLAN_ATTRIBUTE)
    variant = variant_for(block, values)
    if plan.config.recompute == "mhc" and torch.is_grad_enabled():
        if not holds_cache(values):
            return run_with_recompute(variant, block, values)
        warn_cache_once(type(block).__name__)
    return variant(block, values)


def variant_for(block: nn.Module, values: dict) -> Variant:
    """The rewritten graph for this call's specialisation; built on first use.

    A graph is filed under the key that leaves the passthrough arguments unspecialised
    where they were checked to leave its graph unchanged, else under the key of every
    constant (see :func:`_build_missing_variant`); both are looked up.
    """
    plan: BlockPlan = getattr(block, PLAN_ATTRIBUTE)
    passthrough = plan.analysis.signature.passthrough
    variant = plan.variants.get(make_key(block.training, values, passthrough))
    if variant is None and passthrough:
        variant = plan.variants.get(make_key(block.training, values))
    if variant is None:
        variant = _build_missing_variant(block, plan, values, block.training)
    return variant


@torch.compiler.disable
def _build_missing_variant(block: nn.Module, plan: BlockPlan, values: dict, training: bool) -> Variant:
    """First call with a new specialisation: trace and rewrite outside torch.compile.

    The passthrough arguments were found for the sample call; for this one they stay
    unspecialised only if they still leave the graph unchanged."""
    keep = keeps_passthrough(block, plan.analysis, values, training)
    variant = build_variant(block, plan.analysis, plan.config, values, training, passthrough=keep)
    passthrough = plan.analysis.signature.passthrough if keep else frozenset()
    plan.variants[make_key(training, values, passthrough)] = variant
    return variant


def install(block: nn.Module, analysis: BlockAnalysis, config: MHCConfig) -> None:
    """Give ``block`` its ``mhc`` parameters, its plan (graphs for both training flags of
    the sample call) and the dispatching forward. Raises before changing the block if a
    graph cannot be built."""
    device = next((p.device for p in block.parameters()), torch.device("cpu"))
    connections = nn.ModuleList([MHCConnection(c.hidden_size, config).to(device) for c in analysis.connections])
    plan = BlockPlan(replace(analysis, values={}), config)
    values = _as_stream_values(analysis, config)
    setattr(block, MHC_ATTRIBUTE, connections)  # the graphs read the parameters from here
    try:
        key = make_key(block.training, values, analysis.signature.passthrough)
        plan.variants[key] = build_variant(block, analysis, config, values, block.training)
        _build_missing_variant(block, plan, values, not block.training)
    except Exception:
        delattr(block, MHC_ATTRIBUTE)
        raise
    setattr(block, PLAN_ATTRIBUTE, plan)
    block.forward = BlockForward(block, analysis.signature.params)


def uninstall(block: nn.Module) -> None:
    """Undo :func:`install`: the block runs its own forward again, without ``mhc``."""
    for name in ("forward", PLAN_ATTRIBUTE):
        block.__dict__.pop(name, None)
    if MHC_ATTRIBUTE in block._modules:
        delattr(block, MHC_ATTRIBUTE)


def _as_stream_values(analysis: BlockAnalysis, config: MHCConfig) -> dict:
    """Recorded call values, with the stream input expanded when the block is linked in."""
    values = dict(analysis.values)
    if analysis.link_in and analysis.stream_input:
        values[analysis.stream_input] = functional.expand(
            values[analysis.stream_input], config.n_streams, channel_dim=analysis.channel_dim
        )
    return values


def is_converted_block(module: nn.Module) -> bool:
    """True for a block that :func:`install` converted."""
    return PLAN_ATTRIBUTE in module.__dict__


__all__ = ["BlockPlan", "BlockForward", "dispatch", "install", "uninstall", "is_converted_block"]
