"""Find residual adds in an FX graph and the module that owns each of them.

A residual add is ``add(skip, branch)`` where ``skip`` is an ancestor of ``branch`` in the
dataflow graph, both have the same shape, and the path from ``skip`` to ``branch`` holds
a trained computation (a parameter is used on it): ``x + F(x)``. The skip may reach the
add through value-preserving ops (``x.to(float32) + F(x)``) and through a scale or shift
that does not depend on the stream (``a * x + F(x)``, ``(x + b) * s + F(x)`` with ``a``,
``b``, ``s`` constants or tensors computed without ``x``), and the branch may be scaled
or subtracted (``x - F(x)``, ``torch.add(x, F(x), alpha=a)``). Adds that broadcast
(attention masks, position biases) are never connections, and neither are adds whose skip
is computed only from integer inputs and sizes (a mask). Adds of two values that
share an ancestor but where neither descends from the other (``shortcut(x) + F(x)`` with a
projection shortcut, ``attn(x) + mlp(x)``) are reported as *cuts*: not rewritten, the
chain ends there.

The functions work on torch-level graphs (``torch.fx`` traces of one block) and on
ATen-level graphs (``torch.export``) alike; callers say which nodes are parameters.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import fx

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_SUB_FUNCTIONS = {operator.sub, operator.isub, torch.sub}
_ADD_METHODS = {"add", "add_"}
_SUB_METHODS = {"sub", "sub_"}
# value-preserving ops that may stand on the skip (``residual.to(torch.float32)``)
_SKIP_METHODS = {"to", "float", "double", "half", "bfloat16", "type_as", "contiguous", "clone"}


# ``x * s``, ``s * x``, ``x / s``, ``x + b``, ``b + x``, ``x - b`` on the skip, with ``s`` and
# ``b`` computed without ``x``: the same affine map of every stream (out-of-place only)
_AFFINE_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
                     operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub"}
_AFFINE_METHODS = {"mul": "mul", "div": "div", "add": "add", "sub": "sub"}


def _aten_ops() -> tuple[set, set, set]:
    aten = torch.ops.aten
    adds = {aten.add.Tensor, aten.add_.Tensor}
    subs = {aten.sub.Tensor, aten.sub_.Tensor}
    keeps = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
             aten.contiguous.default, aten.clone.default, aten.alias.default}
    return adds, subs, keeps


def _aten_affine() -> dict:
    aten = torch.ops.aten
    return {aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div",
            aten.div.Scalar: "div", aten.add.Tensor: "add", aten.add.Scalar: "add",
            aten.sub.Tensor: "sub", aten.sub.Scalar: "sub"}


@dataclass
class ResidualAdd:
    """One ``skip + branch`` add found in a graph."""

    add: fx.Node
    skip: fx.Node
    branch: fx.Node
    shape: tuple[int, ...]
    branch_nodes: list[fx.Node] = field(default_factory=list)  # skip -> branch path, topo order
    skip_operand: Optional[fx.Node] = None  # the add's skip operand: ``skip`` or a cast of it
    branch_scale: float = 1.0  # ``x - f(x)``: -1; ``torch.add(x, f(x), alpha=a)``: a
    # ops between ``skip_operand`` and ``skip`` (casts, ``a * x``), each with the index of
    # its argument that carries the stream, from ``skip_operand`` down
    skip_ops: list[tuple[fx.Node, int]] = field(default_factory=list)
    skip_scale: float = 1.0  # ``torch.add(f(x), x, alpha=a)``: a; ``f(x) - x``: -1

    def __post_init__(self) -> None:
        if self.skip_operand is None:
            self.skip_operand = self.skip


@dataclass
class CutAdd:
    """An add of two same-shaped computed values that is not a residual connection."""

    add: fx.Node
    reason: str


def operand_scale(node: fx.Node) -> Optional[float]:
    """For ``a + s * b`` of two graph values, ``s``; ``None`` for any other node.

    ``+``, ``+=``, ``torch.add`` and ``aten.add`` give ``alpha`` (1 by default), ``-``,
    ``-=``, ``torch.sub`` and ``aten.sub`` give ``-alpha``.
    """
    adds, subs, _ = _aten_ops()
    if node.op == "call_function":
        sign = 1 if node.target in _ADD_FUNCTIONS or node.target in adds else (
            -1 if node.target in _SUB_FUNCTIONS or node.target in subs else 0)
    elif node.op == "call_method":
        sign = 1 if node.target in _ADD_METHODS else (-1 if node.target in _SUB_METHODS else 0)
    else:
        sign = 0
    if not sign or len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    alpha = node.args[2] if len(node.args) > 2 else node.kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None
    return float(sign * alpha)


def _is_value_preserving(node: fx.Node) -> bool:
    """A cast, ``contiguous`` or ``clone`` of its first argument."""
    _, _, keeps = _aten_ops()
    return isinstance(node.args[0] if node.args else None, fx.Node) and (
        (node.op == "call_method" and node.target in _SKIP_METHODS
         and not any(isinstance(a, fx.Node) for a in node.args[1:]))
        or (node.op == "call_function" and node.target in keeps)
    )


def affine_stream_arg(node: fx.Node, anc: Optional["Ancestry"] = None) -> Optional[int]:
    """For ``x * s``, ``s * x``, ``x / s``, ``x + b``, ``b + x`` or ``x - b`` where ``s`` / ``b``
    is a number or a value computed without ``x`` and the op keeps ``x``'s shape: the
    index of ``x`` in ``node.args``; ``None`` for any other node.

    Without ``anc`` the independence of the other operand is not checked (the caller
    knows it already).
    """
    if node.op == "call_function":
        kind = _AFFINE_FUNCTIONS.get(node.target) or _aten_affine().get(node.target)
    elif node.op == "call_method":
        kind = _AFFINE_METHODS.get(node.target)
    else:
        kind = None
    if kind is None or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    out_shape = node_shape(node)
    for idx in (0, 1) if kind in ("mul", "add") else (0,):
        x, other = node.args[idx], node.args[1 - idx]
        if not isinstance(x, fx.Node) or node_shape(x) is None or node_shape(x) != out_shape:
            continue
        if isinstance(other, fx.Node):
            if other is x or (anc is not None and anc.is_ancestor(x, other)):
                continue
        elif isinstance(other, bool) or not isinstance(other, (int, float)):
            continue
        return idx
    return None


def skip_chain(node: fx.Node, anc: Optional["Ancestry"] = None,
               until: Optional[fx.Node] = None) -> list[tuple[fx.Node, int]]:
    """The ops walked back from ``node`` to its skip source, as ``(op, index of the
    argument that carries the stream)`` from ``node`` down: value-preserving ops (casts,
    ``contiguous``, ``clone``) and, given ``anc``, stream-independent scales and shifts
    (:func:`affine_stream_arg`). With ``until`` the walk stops at the first value that is
    an ancestor of ``until``.
    """
    chain: list[tuple[fx.Node, int]] = []
    while not (until is not None and anc is not None and anc.is_ancestor(node, until)):
        idx = 0 if _is_value_preserving(node) else (affine_stream_arg(node, anc) if anc is not None else None)
        if idx is None:
            break
        chain.append((node, idx))
        node = node.args[idx]
    return chain


def node_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    """Static shape from ``meta['val']`` (export) or ``meta['tensor_meta']`` (ShapeProp)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    return None


_SHAPE_METHODS = {"size", "dim", "numel", "new_zeros", "new_ones", "new_empty"}
_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like, torch.randn_like}


@functools.lru_cache(maxsize=None)
def _like_ops() -> frozenset:
    aten = torch.ops.aten
    return frozenset({aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                      aten.rand_like.default, aten.randn_like.default, aten.new_zeros.default,
                      aten.new_ones.default, aten.new_empty.default})


def is_shape_query(node: fx.Node) -> bool:
    """True for a node that reads only its input's metadata (``x.size(-1)``, ``aten.sym_size``,
    ``torch.zeros_like(x)``, ``x.new_zeros(...)``).

    Its users depend on the input's shape, dtype or device, not on its values: a mask sliced
    to the key length is not computed *from* the keys, and token-type ids made by
    ``zeros_like(embeddings)`` do not carry the embeddings.
    """
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device")
        if node.target in _LIKE_FUNCTIONS or node.target in _like_ops():
            return True
        name = getattr(node.target, "__name__", "") or ""
        return name.startswith(("sym_size", "sym_numel", "sym_stride")) or node.target is torch.ops.aten.sym_size.int
    return False


_LIKE_METHODS = {"expand_as", "view_as", "reshape_as", "type_as"}  # the second operand gives a shape or dtype


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``node`` computes from: ``pos.expand_as(x)`` reads only
    ``x``'s shape, so ``x + emb(pos).expand_as(x)`` adds no value computed from ``x``."""
    if node.op == "call_method" and node.target in _LIKE_METHODS and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return node.all_input_nodes


def _is_float(node: fx.Node) -> bool:
    """``node`` holds a floating-point tensor (from ``meta['val']`` or ``meta['tensor_meta']``)."""
    val = node.meta.get("val")
    meta = val if isinstance(val, torch.Tensor) else node.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    return dtype is not None and dtype.is_floating_point


class Ancestry:
    """Value-ancestor sets of every node of a graph as integer bitmasks (fast for big graphs).

    Edges out of shape queries (:func:`is_shape_query`) carry no values and are left out.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.mask: dict[fx.Node, int] = {}
        for n in self.nodes:
            m = 0
            if not is_shape_query(n):
                for inp in value_inputs(n):
                    m |= self.mask[inp] | (1 << self.index[inp])
            self.mask[n] = m

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        return bool(self.mask[b] >> self.index[a] & 1)

    def between(self, a: fx.Node, b: fx.Node) -> list[fx.Node]:
        """Nodes on some path from ``a`` to ``b`` (excluding ``a``, including ``b``), topo order."""
        bits = self.mask[b] | (1 << self.index[b])
        ia = self.index[a]
        return [
            n
            for n in self.nodes[ia + 1 : self.index[b] + 1]
            if bits >> self.index[n] & 1 and self.is_ancestor(a, n)
        ]


def _uses_params(node: fx.Node, is_param: Callable[[fx.Node], bool], source: fx.Node) -> bool:
    """``node`` is trained (a module call with parameters) or reads a parameter other than
    ``source``, the value the path starts from."""
    return is_param(node) or any(is_param(a) for a in node.all_input_nodes if a is not source)


def find_residual_adds(
    graph: fx.Graph, is_param: Callable[[fx.Node], bool]
) -> tuple[list[ResidualAdd], list[CutAdd]]:
    """Residual adds of ``graph`` in topological order, and the same-shape adds that are cut.

    Args:
        graph: any FX graph whose nodes carry shapes (``val`` or ``tensor_meta`` meta).
        is_param: says whether a node is (or directly yields) a trained parameter.
    """
    anc = Ancestry(graph)
    carries_data = _data_test(anc, is_param)
    found: list[ResidualAdd] = []
    cuts: list[CutAdd] = []
    for node in anc.nodes:
        scale = operand_scale(node)
        if scale is None:
            continue
        a, b = node.args[0], node.args[1]
        shape_a, shape_b = node_shape(a), node_shape(b)
        if shape_a is None or shape_b is None or len(shape_a) < 2:
            continue
        if shape_a != shape_b:
            continue  # a broadcasting add (attention mask, position bias) is no connection
        pair = _skip_and_branch(anc, a, b)
        if pair is None:
            if scale == 1.0 and _parallel_trained_paths(anc, a, b, is_param):
                cuts.append(
                    CutAdd(
                        node,
                        "both operands are computed from a common input but neither is the "
                        "other's input (a projection shortcut or parallel branches); "
                        "not rewritten, the stream chain is cut here",
                    )
                )
            continue
        skip, skip_operand, branch, chain = pair
        if not carries_data(skip):
            continue  # a mask made from token ids and sizes, added to each layer's scores
        path = anc.between(skip, branch)
        if not any(_uses_params(n, is_param, skip) for n in path):
            continue  # e.g. ``x + 0.04 * x**3`` inside an activation: no trained branch
        if _enters_only_as_addend(skip, path):
            cuts.append(CutAdd(node, "its skip enters the branch only as an addend (a position bias shared "
                                     "by the layers' attention scores), so it is no residual stream; not rewritten"))
            continue
        on_skip = skip_operand is b  # ``f(x) + a * x``: ``alpha`` scales the skip
        found.append(ResidualAdd(node, skip, branch, shape_a, path, skip_operand,
                                 1.0 if on_skip else scale, chain, scale if on_skip else 1.0))
    on_branches = {n for res in found for n in res.branch_nodes}
    return found, [c for c in cuts if c.add not in on_branches]  # ``x + (attn(x) + mlp(x))``


def _enters_only_as_addend(skip: fx.Node, path: list[fx.Node]) -> bool:
    """Every op that reads ``skip`` on the way to the branch adds it to another value of its
    own shape: the skip is a bias added inside each layer (T5's position bias, returned by
    the first layer and added to every later layer's scores), not the input the branch
    computes from. (``x + F(x + pos)`` with a ``pos`` that broadcasts stays a connection.)"""
    on_path = set(path)
    entries = [u for u in skip.users if u in on_path]
    return bool(entries) and all(
        operand_scale(u) is not None and node_shape(u.args[0]) == node_shape(u.args[1]) for u in entries
    )


def _data_test(anc: Ancestry, is_param: Callable[[fx.Node], bool]) -> Callable[[fx.Node], bool]:
    """``carries(node)``: ``node`` is computed from a floating-point input of the graph or a
    trained parameter (anything a stream can be), not only from integer inputs, sizes and
    constants (an additive attention mask made from the token mask, ProphetNet's)."""
    sources = 0
    for n in anc.nodes:
        if is_param(n) or (n.op in ("placeholder", "get_attr") and not _is_integral(n)):
            sources |= 1 << anc.index[n]
    return lambda node: bool((anc.mask[node] | 1 << anc.index[node]) & sources)


def _is_integral(node: fx.Node) -> bool:
    """``node`` holds a tensor of integers or booleans (token ids, a padding mask)."""
    val = node.meta.get("val")
    meta = val if isinstance(val, torch.Tensor) else node.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex


def _skip_and_branch(anc: Ancestry, a: fx.Node, b: fx.Node):
    """``(skip, skip_operand, branch, skip_ops)`` of ``a + s * b``, or ``None`` if it is no ``x + F(x)``.

    The skip may reach the add through value-preserving ops (``residual.to(float32)``) and
    stream-independent scales and shifts (``a * residual``); ``alpha`` or ``-`` may scale
    either operand (``x - f(x)``, ``f(x) - x``).
    """
    orders = ((a, b), (b, a))
    for operand, branch in orders:
        if anc.is_ancestor(operand, branch):
            return operand, operand, branch, []
    for operand, branch in orders:
        chain = skip_chain(operand, anc, until=branch)
        source = chain[-1][0].args[chain[-1][1]] if chain else operand
        if chain and anc.is_ancestor(source, branch):
            return source, operand, branch, chain
    return None


def _parallel_trained_paths(anc: Ancestry, a: fx.Node, b: fx.Node, is_param) -> bool:
    """Both operands are trained computations forked from their latest common ancestor,
    a floating-point value (sums of embeddings of the same token ids are no stream)."""
    common = anc.mask[a] & anc.mask[b]
    if not common:
        return False
    fork = anc.nodes[common.bit_length() - 1]
    if not _is_float(fork):
        return False
    return all(any(_uses_params(n, is_param, fork) for n in anc.between(fork, x)) for x in (a, b))


def branch_users(res: ResidualAdd) -> list[fx.Node]:
    """Users of ``res.skip`` that feed the branch (they get the aggregated input ``u``)."""
    on_path = set(res.branch_nodes)
    return [u for u in res.skip.users if u in on_path and u is not res.add]


def lowest_common_module(paths: Sequence[str]) -> str:
    """Deepest dotted module path that is a prefix of all ``paths`` (``""`` is the root)."""
    split = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            common.append(parts[0])
        else:
            break
    return ".".join(common)


def reaches_output(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose value reaches the graph's output (a residual add outside this set is
    dead code: its connection parameters would never receive a gradient)."""
    live: set[fx.Node] = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


def owner_module(res: ResidualAdd, module_path: Callable[[fx.Node], str]) -> str:
    """Module that owns a residual connection: the lowest module containing the add and
    every place where the skip value enters the branch (BERT's add lives in
    ``attention.output`` while the branch starts in ``attention.self``: the owner is
    ``attention``)."""
    paths = [module_path(res.add)] + [module_path(u) for u in branch_users(res)]
    return lowest_common_module(paths)


def topmost(paths: Sequence[str]) -> list[str]:
    """Drop every path that lies inside another path of the list; keep first-seen order."""
    out: list[str] = []
    for p in paths:
        if p in out:
            continue
        if any(inside(p, q) for q in paths if q != p):
            continue
        out.append(p)
    return out


def inside(p: str, q: str) -> bool:
    """True when module ``p`` lies strictly inside module ``q``."""
    return q == "" and p != "" or p.startswith(q + ".")
