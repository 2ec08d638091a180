"""Rewrite one block's residual adds into n-stream mHC connections (graph -> graph).

For each residual ``add(skip, branch)`` of the block, in order:

* the skip value becomes (or already is) the n-stream tensor ``X``;
* the branch's uses of the skip get ``u = H_pre X`` from ``mhc_pre`` instead;
* the add becomes ``mhc_post(X, branch, H_post, H_res) = H_res X + H_post^T branch``.

Between connections the stream passes through per-stream-safe ops unchanged (post-norm
LayerNorm, dropout, activations: they act on each stream alike). Any other consumer of a
stream gets the collapsed single stream. Where a chain starts inside the block (or the
block is not fed by a linked predecessor) the single stream is expanded; where the block
output is not consumed by a linked successor the streams are collapsed.

Only graph structure and module types are read; kernels are reached through the
``ops.functional`` calls the pass emits.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ..heuristics import is_per_position_norm
from ..ops import functional
from .find_residuals import ResidualAdd, affine_stream_arg, branch_users, is_shape_query, node_shape

_ELEMENTWISE_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Hardswish, nn.Hardtanh,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.gelu, F.silu, torch.tanh, torch.sigmoid, F.dropout, F.leaky_relu,
    torch.nn.functional.mish,
}
_ELEMENTWISE_METHODS = {"to", "contiguous", "float", "half", "bfloat16", "type_as", "relu", "clone"}
# ``x * s`` / ``x / s`` with ``s`` a constant or a tensor computed without the streams
# (drop-path's per-sample mask, a layer scale): the same scaling of every stream
_SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
_SCALE_METHODS = {"mul", "div", "mul_", "div_"}


@dataclass
class StreamPlan:
    """How one block is rewritten.

    Attributes:
        n: number of streams; channel_dim: channel axis of the single stream (-1 or 1);
        link_in: the block's stream input (``stream_input`` placeholder) already carries
            n streams from the previous block; link_out: the block returns n streams at
            flattened output leaf ``output_leaf`` for the next block.
        op_kwargs: static arguments of the emitted ``mhc_pre`` calls (mode, sinkhorn
            iterations, eps, backend); collapse: ``"mean"`` or ``"sum"``.
        param_prefix: attribute of the block holding the ``MHCConnection`` list.
        stream_dtype: dtype the expanded streams are cast to (``None``: decided at run time by
            ``functional.resolve_stream_dtype``: the autocast dtype or the input's).
        deterministic: the emitted ``mhc_post`` calls ask for bitwise-reproducible backward.
    """

    n: int
    channel_dim: int
    link_in: bool = False
    link_out: bool = False
    stream_input: Optional[str] = None
    output_leaf: Optional[int] = None
    mode: str = "mhc"
    sinkhorn_iters: int = 20
    eps: float = 1e-6
    backend: str = "auto"
    collapse: str = "mean"
    param_prefix: str = "mhc"
    stream_dtype: Optional[torch.dtype] = None
    deterministic: bool = False


@dataclass
class RewriteResult:
    """What the rewrite found: which placeholder and output leaf carry the stream."""

    stream_input: Optional[str]
    stream_output_leaf: Optional[int]


def inline_identities(gm: fx.GraphModule) -> None:
    """Replace calls of ``nn.Identity`` children by their input (identity shortcuts)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def is_stream_safe(node: fx.Node, modules: dict[str, nn.Module], channel_dim: int) -> bool:
    """True for ops that act on each stream alike when given ``[..., n, C]`` streams."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return True
        if channel_dim != -1 or mod is None:
            return False
        if isinstance(mod, nn.LayerNorm):
            return len(mod.normalized_shape) == 1
        return is_per_position_norm(mod)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        if node.target == "to":
            return all(not isinstance(a, fx.Node) for a in node.args[1:])
        return node.target in _ELEMENTWISE_METHODS
    return False


def rewrite_block(gm: fx.GraphModule, residuals: list[ResidualAdd], plan: StreamPlan) -> RewriteResult:
    """Rewrite ``gm``'s graph in place; see the module docstring. Recompiles ``gm``."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    by_skip: dict[fx.Node, list[int]] = {}
    for i, res in enumerate(residuals):
        by_skip.setdefault(res.skip, []).append(i)
    by_add = {res.add: i for i, res in enumerate(residuals)}
    users_of_branch = [branch_users(res) for res in residuals]  # before any rewiring
    all_branch_users = {u for users in users_of_branch for u in users}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last_placeholder = placeholders[-1] if placeholders else None
    stream: dict[fx.Node, fx.Node] = {}  # node -> node holding its value as n streams
    replaced: dict[fx.Node, fx.Node] = {}  # erased add -> its mhc_post
    coeffs: dict[int, tuple[fx.Node, fx.Node]] = {}
    inserted: set[fx.Node] = set()
    skip_ops = {op: idx for res in residuals for op, idx in res.skip_ops}
    first_skip = residuals[0].skip if residuals else None
    # a placeholder's target is the argument's name (its node name may differ: ``input_1``)
    stream_input = first_skip.target if first_skip is not None and first_skip.op == "placeholder" else None

    def emit(fn, args, kwargs=None, after=None, before=None):
        if after is not None and after.op == "placeholder":
            after = last_placeholder
        ctx = graph.inserting_after(after) if after is not None else graph.inserting_before(before)
        with ctx:
            new = graph.call_function(fn, tuple(args), kwargs or {})
        inserted.add(new)
        return new

    for node in list(graph.nodes):
        current = node
        if node.op == "placeholder" and node.target == stream_input and plan.link_in:
            stream[node] = node
        elif node in skip_ops and node.args[skip_ops[node]] in stream:
            # ``x.to(float32)`` or ``a * x`` standing on the skip: the same op on the streams
            copy = _skip_op_on_streams(graph, node, skip_ops[node], stream, plan, inserted)
            stream[node] = stream[copy] = copy
        elif node in by_add:
            i = by_add[node]
            res = residuals[i]
            skip = replaced.get(res.skip_operand, res.skip_operand)
            streams = stream[skip]
            if res.skip_scale != 1.0:  # f(x) - x, torch.add(f(x), x, alpha=a)
                streams = emit(operator.mul, (streams, res.skip_scale), before=node)
            branch = res.branch
            if res.branch_scale != 1.0:  # x - f(x), torch.add(x, f(x), alpha=a)
                branch = emit(operator.mul, (branch, res.branch_scale), before=node)
            post = emit(
                functional.mhc_post,
                (streams, branch, *coeffs[i]),
                {"channel_dim": plan.channel_dim, "backend": plan.backend, "deterministic": plan.deterministic},
                before=node,
            )
            node.replace_all_uses_with(post)
            graph.erase_node(node)
            replaced[node] = post
            stream[post] = post
            current = post
        elif (
            node.op != "placeholder"
            and node not in all_branch_users
            and node.args
            and isinstance(node.args[0], fx.Node)
            and stream.get(node.args[0]) is node.args[0]
            and not any(a in stream for a in node.all_input_nodes[1:])
        ):
            if is_stream_safe(node, modules, plan.channel_dim):
                stream[node] = node
            elif _is_stream_scale(node, stream):
                _align_scale(graph, node, plan, inserted)
                stream[node] = node
        for i in by_skip.get(node, ()):
            _emit_pre(graph, emit, current, i, users_of_branch[i], plan, stream, coeffs)

    for op in skip_ops:  # the single-stream originals where now unused, from the add down
        if not op.users:
            graph.erase_node(op)
            stream.pop(op, None)
    output = next(n for n in graph.nodes if n.op == "output")
    stream_values = [k for k, v in stream.items() if k is v]
    out_leaf = _stream_output_leaf(output, stream_values)
    kept = tree_flatten(output.args[0])[0][out_leaf] if plan.link_out and out_leaf is not None else None
    _collapse_other_uses(emit, stream_values, inserted, output, kept, plan)
    gm.recompile()
    return RewriteResult(stream_input, out_leaf)


def _is_stream_scale(node: fx.Node, stream: dict) -> bool:
    """``stream * s`` or ``stream / s`` where ``s`` does not depend on any stream value."""
    is_scale = (node.op == "call_function" and node.target in _SCALE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _SCALE_METHODS
    )
    if not is_scale or len(node.args) != 2 or node.kwargs:
        return False
    other = node.args[1]
    return not isinstance(other, fx.Node) or not _depends_on(other, stream)


def _depends_on(node: fx.Node, values: dict) -> bool:
    """``node``'s value is computed from one of ``values`` (shape queries do not count)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in values:
            return True
        if n in seen or is_shape_query(n):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _align_scale(graph: fx.Graph, node: fx.Node, plan: StreamPlan, inserted: set, stream_arg: int = 0,
                 single: Optional[tuple] = None) -> None:
    """Give a tensor operand of the single stream's rank (``[B, 1, 1]``) a stream axis, so
    it broadcasts over ``[B, T, n, C]`` as it did over ``[B, T, C]``; ``stream_arg`` is
    the index of ``node``'s argument that carries the streams, ``single`` the single
    stream's shape where ``node`` carries none."""
    other = node.args[1 - stream_arg]
    if not isinstance(other, fx.Node):
        return
    single = single or node_shape(node.args[stream_arg]) or node_shape(node)
    scale = node_shape(other)
    if single is None or scale is None or len(scale) != len(single):
        return
    axis = functional.stream_dim_of(plan.channel_dim)
    with graph.inserting_before(node):
        aligned = graph.call_function(torch.unsqueeze, (other, axis))
    inserted.add(aligned)
    node.replace_input_with(other, aligned)


def _skip_op_on_streams(graph: fx.Graph, node: fx.Node, idx: int, stream: dict, plan: StreamPlan,
                        inserted: set) -> fx.Node:
    """A copy of the skip op ``node`` (a cast, ``a * x``, ``x + b``) that takes the streams
    of its argument ``idx``; ``node`` itself keeps computing the single stream.

    The op is stream-independent (``find_residuals.affine_stream_arg``), so it acts on
    every stream alike; under mHC's doubly stochastic ``H_res`` (rows summing to 1) it
    also commutes with the mixing, and at ``init="preserve"`` the collapse returns the
    original ``a * x + F(x)``.
    """
    args = list(node.args)
    args[idx] = stream[node.args[idx]]
    with graph.inserting_after(node):
        copy = graph.create_node(node.op, node.target, tuple(args), dict(node.kwargs))
    inserted.add(copy)
    if affine_stream_arg(node) is not None:  # not for a cast
        _align_scale(graph, copy, plan, inserted, stream_arg=idx, single=node_shape(node))
    return copy


def _emit_pre(graph, emit, skip, i, users, plan, stream, coeffs) -> None:
    """Insert ``mhc_pre`` for connection ``i`` right after its skip value."""
    if skip in stream:
        x = stream[skip]
    else:
        x = emit(functional.expand, (skip, plan.n), {"channel_dim": plan.channel_dim, "dtype": plan.stream_dtype},
                 after=skip)
        stream[skip] = x
        stream[x] = x
    anchor = x
    params = []
    for name in ("phi", "bias", "alpha"):
        # The targets live on the block the graph's code is bound to, not on this
        # GraphModule, so FX's existence check does not apply.
        with graph.inserting_after(anchor), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            anchor = graph.get_attr(f"{plan.param_prefix}.{i}.{name}")
        params.append(anchor)
    pre = emit(
        functional.mhc_pre,
        (x, *params),
        {
            "mode": plan.mode,
            "sinkhorn_iters": plan.sinkhorn_iters,
            "eps": plan.eps,
            "channel_dim": plan.channel_dim,
            "backend": plan.backend,
        },
        after=anchor,
    )
    u = emit(operator.getitem, (pre, 0), after=pre)
    h_post = emit(operator.getitem, (pre, 1), after=u)
    h_res = emit(operator.getitem, (pre, 2), after=h_post)
    coeffs[i] = (h_post, h_res)
    for user in users:
        user.replace_input_with(skip, u)


def _stream_output_leaf(output: fx.Node, stream_values: list[fx.Node]) -> Optional[int]:
    leaves, _ = tree_flatten(output.args[0])
    for idx, leaf in enumerate(leaves):
        if isinstance(leaf, fx.Node) and leaf in stream_values:
            return idx
    return None


def _collapse_other_uses(emit, stream_values, inserted, output, kept, plan) -> None:
    """Every consumer of an n-stream value that does not expect streams gets the collapse."""
    stream_set = set(stream_values)
    for value in stream_values:
        collapsed = None
        for user in list(value.users):
            if user in inserted or user in stream_set or (user is output and value is kept):
                continue
            if collapsed is None:
                collapsed = emit(
                    functional.collapse,
                    (value,),
                    {"channel_dim": plan.channel_dim, "reduce": plan.collapse},
                    after=value,
                )
            user.replace_input_with(value, collapsed)
