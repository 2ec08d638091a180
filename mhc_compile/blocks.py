"""Turn one owning block into an n-stream block that stays a module that is called.

The block object is kept (so FSDP2's ``fully_shard(block)``, activation checkpointing and
per-block ``torch.compile`` keep working, and the state_dict keeps its keys). It gains a
child ``mhc`` (a ``ModuleList`` of :class:`~mhc_compile.layers.MHCConnection`) and an
instance ``forward`` with the original signature that dispatches to a rewritten graph.
One graph is kept per specialisation (``training`` flag, which arguments were ``None`` or
constants); a new specialisation is traced and rewritten on first use.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .capture import CallRecord, CaptureError
from .trace import BlockSignature, bind_call, classify, find_passthrough, make_key, split_signature, trace_block
from .config import MHCConfig
from .layers import MHCConnection
from .ops import functional
from .passes.find_residuals import CutAdd, ResidualAdd, find_residual_adds
from .passes.fuse import fuse_post_pre
from .passes.rewrite import StreamPlan, inline_identities, rewrite_block
from .recompute import holds_cache, run_with_recompute, warn_cache_once

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ConversionError(ValueError):
    """The model cannot be converted as asked; the message says which part and why."""


@dataclass
class ConnectionInfo:
    """One rewritten connection, for ``inspect()``."""

    block: str
    index: int
    branch: str
    hidden_size: int
    shape: tuple


@dataclass
class BlockAnalysis:
    """What tracing one block revealed, before anything is changed."""

    path: str
    values: dict
    signature: BlockSignature
    connections: list[ConnectionInfo]
    cuts: list[str]
    channel_dim: int
    stream_input: Optional[str]
    output_leaf: Optional[int]
    link_in: bool = False
    link_out: bool = False
    chain: int = -1


@dataclass
class BlockPlan:
    """Everything a block needs to (re)build its rewritten graphs at run time."""

    analysis: BlockAnalysis
    config: MHCConfig
    variants: dict = field(default_factory=dict)


def _block_is_param(gm: fx.GraphModule) -> Callable[[fx.Node], bool]:
    modules = dict(gm.named_modules())

    def is_param(node: fx.Node) -> bool:
        if node.op == "get_attr":
            target: Any = gm
            for atom in node.target.split("."):
                target = getattr(target, atom, None)
            return isinstance(target, nn.Parameter)
        if node.op == "call_module":
            mod = modules.get(node.target)
            return mod is not None and any(True for _ in mod.parameters())
        return False

    return is_param


def _trace_residuals(block: nn.Module, values: dict, signature: BlockSignature, training: bool):
    gm = trace_block(block, values, signature, training)
    inline_identities(gm)
    residuals, cuts = find_residual_adds(gm.graph, _block_is_param(gm))
    return gm, residuals, cuts


def _branch_summary(res: ResidualAdd) -> str:
    names = [str(n.target) for n in res.branch_nodes if n.op == "call_module"]
    return " -> ".join(dict.fromkeys(names)) or "(inline ops)"


def _channel_dim(gm: fx.GraphModule, residuals: list[ResidualAdd], config: MHCConfig) -> int:
    if config.channel_dim is not None:
        return config.channel_dim
    modules = dict(gm.named_modules())
    for res in residuals:
        for n in res.branch_nodes:
            if n.op == "call_module" and isinstance(modules.get(n.target), _CONV_TYPES):
                return 1
    return -1


def analyse_block(path: str, block: nn.Module, record: CallRecord, config: MHCConfig) -> BlockAnalysis:
    """Trace a block as it was called in the sample forward and describe its connections."""
    values, params, var_kw = bind_call(block, record.args, record.kwargs)
    signature = split_signature(values, params, var_kw)
    passthrough = find_passthrough(block, values, signature, block.training)
    signature = split_signature(values, params, var_kw, passthrough)
    gm, residuals, cuts = _trace_residuals(block, values, signature, block.training)
    if not residuals:
        raise ConversionError(
            f"the analysis placed residual adds in module {path or '(root)'!r} "
            f"({type(block).__name__}) but tracing its forward found none; "
            "its forward must contain the adds in traceable code"
        )
    channel_dim = _channel_dim(gm, residuals, config)
    infos = []
    for i, res in enumerate(residuals):
        if len(res.shape) < 2:
            raise ConversionError(f"residual add {res.add.name} in {path!r} has a scalar-like shape {res.shape}")
        infos.append(ConnectionInfo(path, i, _branch_summary(res), res.shape[channel_dim], res.shape))
    dry = rewrite_block(gm, residuals, StreamPlan(n=config.n_streams, channel_dim=channel_dim, link_in=True, link_out=True))
    return BlockAnalysis(
        path=path,
        values=values,
        signature=signature,
        connections=infos,
        cuts=[f"{path}: add {c.add.name}: {c.reason}" for c in cuts],
        channel_dim=channel_dim,
        stream_input=dry.stream_input,
        output_leaf=dry.stream_output_leaf,
    )


def stream_in_value(analysis: BlockAnalysis) -> Any:
    return analysis.values.get(analysis.stream_input) if analysis.stream_input else None


def stream_out_value(analysis: BlockAnalysis, record: CallRecord) -> Any:
    if analysis.output_leaf is None:
        return None
    leaves = tree_flatten(record.output)[0]
    return leaves[analysis.output_leaf] if analysis.output_leaf < len(leaves) else None


def _stream_plan(plan: BlockPlan) -> StreamPlan:
    a, c = plan.analysis, plan.config
    return StreamPlan(
        n=c.n_streams,
        channel_dim=a.channel_dim,
        link_in=a.link_in,
        link_out=a.link_out,
        mode=c.mode,
        sinkhorn_iters=c.sinkhorn_iters,
        eps=c.rms_eps,
        backend=c.backend,
        collapse=c.collapse,
        stream_dtype=c.stream_dtype,
    )


def build_variant(block: nn.Module, plan: BlockPlan, values: dict, training: bool) -> Callable:
    """Trace + rewrite one specialisation; returns ``fn(block, values_dict) -> output``."""
    a = plan.analysis
    trace_values = dict(values)
    if a.link_in and a.stream_input in trace_values:
        stream = trace_values[a.stream_input]
        trace_values[a.stream_input] = functional.collapse(
            stream, channel_dim=a.channel_dim, reduce="mean"
        )
    values_sig = split_signature(
        trace_values, a.signature.params, a.signature.var_keyword, a.signature.passthrough
    )
    gm, residuals, _ = _trace_residuals(block, trace_values, values_sig, training)
    sizes = [r.shape[a.channel_dim] for r in residuals]
    expected = [c.hidden_size for c in a.connections]
    if sizes != expected:
        raise ConversionError(
            f"block {a.path!r} traced with these arguments has residual connections of "
            f"sizes {sizes}, but it was converted with {expected}; call it as during "
            "conversion or convert again with example_inputs= of this form"
        )
    rewrite_block(gm, residuals, _stream_plan(plan))
    if plan.config.fuse_adjacent:
        fuse_post_pre(gm)
    graph_forward = type(gm).forward
    names = list(values_sig.dynamic)

    def run(self: nn.Module, vals: dict) -> Any:
        return graph_forward(self, *[vals[n] for n in names])

    return run


def _dispatch(self: nn.Module, vals: dict) -> Any:
    gc_func = getattr(self, "_gradient_checkpointing_func", None)
    if getattr(self, "gradient_checkpointing", False) and self.training and gc_func is not None:
        names = [n for n, v in vals.items() if isinstance(v, torch.Tensor)]

        def inner(*tensors: torch.Tensor) -> Any:
            return _run_variant(self, {**vals, **dict(zip(names, tensors))})

        return gc_func(inner, *[vals[n] for n in names])
    if self._mhc_plan.config.recompute == "mhc" and torch.is_grad_enabled():
        if not holds_cache(vals):
            # the variant is looked up (or built) outside the checkpointed region, which
            # must run the same ops when it is recomputed
            return run_with_recompute(_variant_for(self, vals), self, vals)
        warn_cache_once(type(self).__name__)
    return _run_variant(self, vals)


def _variant_for(self: nn.Module, vals: dict) -> Callable:
    plan: BlockPlan = self._mhc_plan
    key = make_key(self.training, vals, plan.analysis.signature.passthrough)
    fn = plan.variants.get(key)
    if fn is None:
        fn = _build_missing_variant(self, plan, vals, key)
    return fn


def _run_variant(self: nn.Module, vals: dict) -> Any:
    return _variant_for(self, vals)(self, vals)


@torch.compiler.disable
def _build_missing_variant(block: nn.Module, plan: BlockPlan, vals: dict, key: tuple) -> Callable:
    """First call with new constant/None arguments: trace and rewrite outside torch.compile.

    Under ``torch.compile`` this is one graph break (an error with ``fullgraph=True``);
    one eager call with the same arguments, or ``example_inputs=`` of that form at
    conversion, builds the graph ahead of time.
    """
    fn = build_variant(block, plan, vals, key[0])
    plan.variants[key] = fn
    return fn


def make_forward(block: nn.Module, params: list[inspect.Parameter]) -> Callable:
    """A forward with the block's own signature that collects its arguments by name."""
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
    lines = [f"def forward(self, {', '.join(parts)}):", f"    _vals = {{{', '.join(collect)}}}"]
    if var_pos:
        lines.append(f"    if {var_pos}: raise TypeError('rewritten block takes no extra positional arguments')")
    if var_kw:
        lines.append(f"    _vals.update({var_kw})")
    lines.append("    return _dispatch(self, _vals)")
    scope = {"_defaults": defaults, "_dispatch": _dispatch}
    exec(compile("\n".join(lines) + "\n", f"<mhc forward of {type(block).__name__}>", "exec"), scope)  # noqa: S102
    return functools.wraps(inspect.unwrap(type(block).forward), assigned=("__doc__",))(scope["forward"])


def install(block: nn.Module, analysis: BlockAnalysis, config: MHCConfig) -> None:
    """Give ``block`` its ``mhc`` parameters and the rewritten forward (train and eval graphs)."""
    device = next((p.device for p in block.parameters()), torch.device("cpu"))
    block.mhc = nn.ModuleList(
        [MHCConnection(c.hidden_size, config).to(device) for c in analysis.connections]
    )
    plan = BlockPlan(analysis, config)
    block._mhc_plan = plan
    for training in (block.training, not block.training):
        key = make_key(training, analysis.values, analysis.signature.passthrough)
        plan.variants[key] = build_variant(block, plan, _as_stream_values(analysis, config), training)
    forward = make_forward(block, analysis.signature.params)
    block.forward = types.MethodType(forward, block)


def _as_stream_values(analysis: BlockAnalysis, config: MHCConfig) -> dict:
    """Recorded call values, with the stream input expanded when the block is linked in."""
    values = dict(analysis.values)
    if analysis.link_in and analysis.stream_input:
        values[analysis.stream_input] = functional.expand(
            values[analysis.stream_input], config.n_streams, channel_dim=analysis.channel_dim
        )
    return values


__all__ = [
    "BlockAnalysis",
    "ConnectionInfo",
    "ConversionError",
    "CaptureError",
    "CutAdd",
    "analyse_block",
    "install",
    "classify",
]
