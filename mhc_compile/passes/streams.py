"""Lowering pass: let the backward recompute a block's inner stream state (graph -> graph).

In a transformer block ``mhc_post_pre`` (the attention's post fused with the MLP's pre)
writes the stream state ``X_mid [..., n, C]`` between the block's two connections, and its
only user is the MLP's ``mhc_post``. Both ops' backwards need ``X_mid``, so autograd would
keep it: one n-stream tensor per block, n times the size of the residual stream the plain
model keeps nothing of. Yet ``X_mid = H_res X_in + H_post^T y`` is cheap to rebuild from
the block's input stream ``X_in`` and the attention output ``y``, which autograd keeps
anyway. So this pass marks the pair: the ``mhc_post_pre`` call gets ``keep_next=False`` and
the ``mhc_post`` call ``source=(X_in, y, H_post, H_res)`` (the fused call's post inputs).
The kernels' backward then recompute ``X_mid`` on chip (the post's) or in their first
launch (the fused op's); the other backends ignore both and keep ``X_mid`` as before.

Only a chain link whose ``X_mid`` has that single user is marked (and never a fused call
whose own input is such a recomputed state), channels-last layouts only (there the token
view of a stream tensor is the tensor itself, so nothing new is kept).
"""

from __future__ import annotations

import operator

from torch import fx

from ..ops import functional


def _inner_stream_user(fused: fx.Node) -> fx.Node | None:
    """The ``mhc_post`` that is the only user of ``fused``'s ``X_next`` (item 0), if any."""
    items = [u for u in fused.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    if len(items) != 1 or len(items[0].users) != 1:
        return None
    post = next(iter(items[0].users))
    if post.op != "call_function" or post.target is not functional.mhc_post or post.args[0] is not items[0]:
        return None
    if items[0] in post.args[1:] or items[0] in post.kwargs.values() or post.kwargs.get("source") is not None:
        return None
    same = all(post.kwargs.get(k) == fused.kwargs.get(k) for k in ("channel_dim", "backend"))
    return post if same and fused.kwargs.get("channel_dim") == -1 else None


def recompute_inner_streams(gm: fx.GraphModule) -> int:
    """Mark each ``mhc_post_pre`` -> ``mhc_post`` link of ``gm`` whose inner stream state
    the backward may recompute (see the module docstring). Recompiles ``gm``; returns the
    number of links marked."""
    marked = 0
    for fused in gm.graph.nodes:
        if fused.op != "call_function" or fused.target is not functional.mhc_post_pre:
            continue
        if fused.kwargs.get("keep_next") is False:
            continue
        post = _inner_stream_user(fused)
        if post is None:
            continue
        fused.kwargs = dict(fused.kwargs, keep_next=False)
        post.kwargs = dict(post.kwargs, source=tuple(fused.args[:4]))
        marked += 1
    gm.recompile()
    return marked
