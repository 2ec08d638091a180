"""Lowering pass: fuse the post of one connection with the pre of the next (graph -> graph).

Wherever ``mhc_post``'s result is the stream input of an ``mhc_pre`` (in every
transformer block: the attention's post feeds the MLP's pre), the pair becomes one
``mhc_post_pre`` call. On the GPU that is one kernel that reads ``X_l`` and ``y_l``,
writes ``X_{l+1}`` and computes the next connection's coefficients and ``u`` from the same
on-chip values; on the reference backend it is the same two ops in sequence.
"""

from __future__ import annotations

import operator

from torch import fx

from ..ops import functional


def _fusable(pre: fx.Node) -> bool:
    if pre.op != "call_function" or pre.target is not functional.mhc_pre:
        return False
    post = pre.args[0]
    if not (isinstance(post, fx.Node) and post.op == "call_function" and post.target is functional.mhc_post):
        return False
    same_layout = all(post.kwargs[k] == pre.kwargs[k] for k in ("channel_dim", "backend"))
    return same_layout and all(u.op == "call_function" and u.target is operator.getitem for u in pre.users)


def fuse_post_pre(gm: fx.GraphModule) -> int:
    """Replace each fusable ``mhc_post`` -> ``mhc_pre`` pair of ``gm`` by ``mhc_post_pre``.

    ``mhc_pre``'s results ``(u, H_post, H_res)`` are items 1..3 of the fused call and
    ``mhc_post``'s result is item 0. Recompiles ``gm``; returns the number of pairs fused.
    """
    graph = gm.graph
    fused_count = 0
    for pre in list(graph.nodes):
        if not _fusable(pre):
            continue
        post = pre.args[0]
        params = pre.args[1:]
        for p in params:  # get_attr nodes have no inputs: hoist them above the post
            if isinstance(p, fx.Node) and p.op == "get_attr":
                post.prepend(p)
        with graph.inserting_after(post):
            kwargs = dict(pre.kwargs, deterministic=post.kwargs.get("deterministic", False))
            fused = graph.call_function(functional.mhc_post_pre, (*post.args, *params), kwargs)
        with graph.inserting_after(fused):
            x_next = graph.call_function(operator.getitem, (fused, 0))
        for user in list(pre.users):
            user.args = (fused, user.args[1] + 1)
        graph.erase_node(pre)
        post.replace_all_uses_with(x_next)
        graph.erase_node(post)
        fused_count += 1
    _check_order(graph)
    gm.recompile()
    return fused_count


def _check_order(graph: fx.Graph) -> None:
    """Every node's inputs come before it (``graph.lint`` would also check get_attr targets,
    which live on the block the graph is bound to, not on this GraphModule)."""
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        missing = [a for a in node.all_input_nodes if a not in seen]
        if missing:
            raise RuntimeError(f"fuse_post_pre broke the graph order: {node.name} uses {missing[0].name} before it")
        seen.add(node)
