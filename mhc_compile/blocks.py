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
from .codeshare import shared_function
from .errors import CaptureError, ConversionError
from .trace import BlockSignature, bind_call, constants_of, is_dynamic, find_passthrough, split_signature, trace_block
from .config import MHCConfig
from .ops import functional
from .passes.find_residuals import CutAdd, ResidualAdd, find_residual_adds
from .passes.fuse import fuse_post_pre
from .passes.norm import fuse_pre_norms
from .passes.streams import recompute_inner_streams
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
    constants: tuple = ()  # the sample call's constants and object types (trace.constants_of)
    unused: tuple = ()  # positions of traced residual adds left plain: their result reaches no output
    output_type: Optional[type] = None  # a dict subclass the block returns (an HF ModelOutput)


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


def _trace_residuals(
    block: nn.Module, values: dict, signature: BlockSignature, training: bool, unused: tuple = ()
):
    gm = trace_block(block, values, signature, training)
    inline_identities(gm)
    residuals, cuts = find_residual_adds(gm.graph, _block_is_param(gm))
    residuals = [r for i, r in enumerate(residuals) if i not in unused]
    return gm, residuals, cuts


def _branch_summary(res: ResidualAdd) -> str:
    names = [str(n.target) for n in res.branch_nodes if n.op == "call_module"]
    return " -> ".join(dict.fromkeys(names)) or "(inline ops)"


def analyse_block(
    path: str, block: nn.Module, record: CallRecord, config: MHCConfig, unused: tuple = ((), -1)
) -> BlockAnalysis:
    """Trace a block as it was called in the sample forward and describe its connections.

    ``unused``: the positions (in graph order) of the block's residual adds whose result
    the whole-model capture saw reach no output, and how many adds it saw in the block;
    where the block's own trace finds as many, those adds are left plain."""
    values, params, var_kw = bind_call(block, record.args, record.kwargs)
    signature = split_signature(values, params, var_kw)
    passthrough = find_passthrough(block, values, signature, block.training)
    signature = split_signature(values, params, var_kw, passthrough)
    gm, residuals, cuts = _trace_residuals(block, values, signature, block.training)
    trace_block(block, values, signature, not block.training, shapes=False)  # both modes must trace
    skip = unused[0] if unused[0] and len(residuals) == unused[1] else ()
    notes = [f"{path}: add {residuals[i].add.name}: its result reaches no output of the model; left a plain add"
             for i in skip]
    residuals = [r for i, r in enumerate(residuals) if i not in skip]
    opaque = [f"{child} ({why})" for child, why in gm.meta.get("mhc_opaque", {}).items()]
    if not residuals:
        return BlockAnalysis(
            path, values, signature, [], [], -1, None, None, opaque=opaque, constants=constants_of(values)
        )
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
        cuts=[f"{path}: add {c.add.name}: {c.reason}" for c in cuts] + notes,
        channel_dim=channel_dim,
        stream_input=dry.stream_input,
        output_leaf=dry.stream_output_leaf,
        opaque=opaque,
        constants=constants_of(values),
        unused=skip,
        output_type=_dict_type(record.output),
    )


def _dict_type(output: Any) -> Optional[type]:
    """The class of a dict-like output (torch.fx turns it into a plain ``dict``)."""
    return type(output) if isinstance(output, dict) and type(output) is not dict else None


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
        deterministic=c.deterministic,
    )


@dataclass
class Variant:
    """One rewritten graph of a block: ``variant(block, values) -> output``.

    ``forward`` is the generated forward of the rewritten ``GraphModule``, called with the
    block itself as ``self`` (its ``get_attr``/``call_module`` paths are the block's own);
    ``names`` are the arguments it takes, in order; ``passthrough`` the constant arguments
    it takes as placeholders (those of the analysis that still pass through in this call).
    A block that returns a ``ModelOutput`` gets one back (``output_type``): a traced graph
    returns a plain ``dict`` in its place.
    """

    forward: Callable
    names: tuple[str, ...]
    passthrough: frozenset = frozenset()
    output_type: Optional[type] = None

    def __call__(self, block: nn.Module, values: dict) -> Any:
        out = self.forward(block, *[values[n] for n in self.names])
        if self.output_type is not None and type(out) is dict:
            return self.output_type(**out)
        return out


def build_variant(block: nn.Module, analysis: BlockAnalysis, config: MHCConfig, values: dict, training: bool) -> Variant:
    """Trace + rewrite one specialisation of ``block`` for the call ``values``.

    ``values`` carry n streams at the stream input where the block is linked in; they are
    collapsed for the trace (the original block sees one stream).
    """
    a = analysis
    trace_values = dict(values)
    if a.link_in and a.stream_input in trace_values:
        stream = trace_values[a.stream_input]
        trace_values[a.stream_input] = functional.collapse(
            stream, channel_dim=a.channel_dim, reduce="mean"
        )
    passthrough = _passthrough_here(block, a, trace_values, training)
    values_sig = split_signature(trace_values, a.signature.params, a.signature.var_keyword, passthrough)
    gm, residuals, _ = _trace_residuals(block, trace_values, values_sig, training, a.unused)
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
        fuse_pre_norms(gm)
        if config.recompute_streams:
            recompute_inner_streams(gm)
    return Variant(shared_function(type(gm).forward), tuple(values_sig.dynamic), passthrough,
                   a.output_type)  # the forward is shared by equal blocks: compiled once


def _passthrough_here(block: nn.Module, a: BlockAnalysis, values: dict, training: bool) -> frozenset:
    """The analysis's passthrough arguments that still do not change the graph in this call.

    Passthrough is found for the sample call's constants: an encoder mask handed to a child
    that did not trace there (its cache path branches on the cache) can be read by the
    same child's inlined code when the call's other constants differ (no cache). Such an
    argument is then specialised again (``runtime`` drops it from the key's passthrough).
    """
    passthrough = a.signature.passthrough
    if not passthrough or constants_of(values) == a.constants:
        return passthrough
    constant = frozenset(n for n in passthrough if n in values and not is_dynamic(values[n]))
    plain = split_signature(values, a.signature.params, a.signature.var_keyword)
    return (passthrough - constant) | find_passthrough(block, values, plain, training, candidates=constant)


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
