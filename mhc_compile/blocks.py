"""One owning block: what tracing reveals (analysis) and its rewritten graphs (variants).

:func:`analyse_block` traces a block as it was called in the sample forward and describes
its connections, stream layout and stream input/output; :func:`build_variant` traces and
rewrites the block for one specialisation of its call. How a converted block runs these
variants is :mod:`mhc_compile.runtime`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import fx, nn
from torch.utils._pytree import tree_flatten

from .capture import CallRecord
from .errors import CaptureError, ConversionError
from .trace import BlockSignature, bind_call, find_passthrough, passthrough_holds, split_signature, trace_block
from .config import MHCConfig
from .ops import functional
from .passes.find_residuals import CutAdd, ResidualAdd, find_residual_adds
from .passes.fuse import fuse_post_pre
from .passes.layout import channel_axis
from .passes.rewrite import RewriteResult, StreamPlan, inline_identities, rewrite_block


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
    calls: int = 1  # > 1: a weight-shared block, called that often per forward
    opaque: list[str] = field(default_factory=list)  # children kept as single calls, and why


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


def analyse_block(path: str, block: nn.Module, record: CallRecord, config: MHCConfig) -> BlockAnalysis:
    """Trace a block as it was called in the sample forward and describe its connections."""
    values, params, var_kw = bind_call(block, record.args, record.kwargs)
    signature = split_signature(values, params, var_kw)
    passthrough = find_passthrough(block, values, signature, block.training)
    signature = split_signature(values, params, var_kw, passthrough)
    gm, residuals, cuts = _trace_residuals(block, values, signature, block.training)
    opaque = [f"{child} ({why})" for child, why in gm.meta.get("mhc_opaque", {}).items()]
    if not residuals:
        return BlockAnalysis(path, values, signature, [], [], -1, None, None, opaque=opaque)
    channel_dim = channel_axis(gm, residuals, config.channel_dim)
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
        opaque=opaque,
    )


def stream_in_value(analysis: BlockAnalysis) -> Any:
    return analysis.values.get(analysis.stream_input) if analysis.stream_input else None


def stream_out_value(analysis: BlockAnalysis, record: CallRecord) -> Any:
    if analysis.output_leaf is None:
        return None
    leaves = tree_flatten(record.output)[0]
    return leaves[analysis.output_leaf] if analysis.output_leaf < len(leaves) else None


def _stream_plan(a: BlockAnalysis, c: MHCConfig) -> StreamPlan:
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


@dataclass
class Variant:
    """One rewritten graph of a block: ``variant(block, values) -> output``.

    ``forward`` is the generated forward of the rewritten ``GraphModule``, called with the
    block itself as ``self`` (its ``get_attr``/``call_module`` paths are the block's own);
    ``names`` are the arguments it takes, in order.
    """

    forward: Callable
    names: tuple[str, ...]

    def __call__(self, block: nn.Module, values: dict) -> Any:
        return self.forward(block, *[values[n] for n in self.names])


def _single_stream(a: BlockAnalysis, values: dict) -> dict:
    """``values`` with n streams at a linked-in stream input collapsed to the one stream the
    original block sees."""
    trace_values = dict(values)
    if a.link_in and a.stream_input in trace_values:
        stream = trace_values[a.stream_input]
        trace_values[a.stream_input] = functional.collapse(
            stream, channel_dim=a.channel_dim, reduce="mean"
        )
    return trace_values


def keeps_passthrough(block: nn.Module, analysis: BlockAnalysis, values: dict, training: bool) -> bool:
    """The sample call's passthrough arguments leave this call's graph unchanged too
    (:func:`~mhc_compile.trace.passthrough_holds`)."""
    return passthrough_holds(block, _single_stream(analysis, values), analysis.signature, training)


def build_variant(
    block: nn.Module, analysis: BlockAnalysis, config: MHCConfig, values: dict, training: bool,
    passthrough: bool = True,
) -> Variant:
    """Trace + rewrite one specialisation of ``block`` for the call ``values``.

    ``values`` carry n streams at the stream input where the block is linked in; they are
    collapsed for the trace (the original block sees one stream). ``passthrough=False``
    bakes in the values of the sample call's passthrough arguments as well.
    """
    a = analysis
    trace_values = _single_stream(a, values)
    values_sig = split_signature(
        trace_values, a.signature.params, a.signature.var_keyword,
        a.signature.passthrough if passthrough else frozenset(),
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
    result = rewrite_block(gm, residuals, _stream_plan(a, config))
    _check_interface(a, result, training)
    if config.fuse_adjacent:
        fuse_post_pre(gm)
    return Variant(type(gm).forward, tuple(values_sig.dynamic))


def _check_interface(a: BlockAnalysis, result: RewriteResult, training: bool) -> None:
    """Every variant takes and returns streams where the block is linked to its neighbours."""
    mode = "training" if training else "eval"
    if a.link_in and result.stream_input != a.stream_input:
        raise ConversionError(
            f"block {a.path!r} in {mode} mode takes its stream from {result.stream_input!r}, "
            f"but the chain feeds it through {a.stream_input!r}; its {mode}-mode forward "
            "differs in structure (convert with the model in this mode to compare)"
        )
    if a.link_out and result.stream_output_leaf != a.output_leaf:
        raise ConversionError(
            f"block {a.path!r} in {mode} mode cannot pass its n streams on to the next block "
            "(an op after the last residual add does not act on each stream alike); "
            "convert with channel_dim= set, or report the op"
        )


__all__ = [
    "BlockAnalysis",
    "ConnectionInfo",
    "ConversionError",
    "CaptureError",
    "CutAdd",
    "Variant",
    "analyse_block",
    "build_variant",
]
