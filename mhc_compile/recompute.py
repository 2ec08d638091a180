"""``recompute="mhc"``: keep only what the backward cannot cheaply recompute.

A converted block stores, besides the original activations, its n-stream tensors (the
stream between its connections, ``[..., n, C]``), every connection's branch input ``u``
and output ``y``. The stream states and ``u`` are cheap to rebuild from the block's input
stream and the branch outputs with the (memory-bound) mHC kernels. Under this option a
converted block's forward runs under selective activation checkpointing: the outputs of
matrix multiplications, attention and convolutions (and batch norm, whose running
statistics must not be updated twice) are kept; everything else inside the block (the mHC
ops, norms, activations, rotary embeddings) is recomputed in the backward pass.

The block input stays stored by its producer, as in any checkpointing scheme; the option
composes with ordinary per-block activation checkpointing (which recomputes everything:
the inner policy then has nothing left to do) and works under ``torch.compile``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .heuristics import is_cache

logger = logging.getLogger("mhc_compile")


@functools.lru_cache(maxsize=None)
def saved_ops() -> frozenset:
    """The ATen overloads whose outputs are kept under ``recompute="mhc"``."""
    aten = torch.ops.aten
    names = [
        "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
        "_scaled_dot_product_flash_attention_for_cpu",
        "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
        "cudnn_batch_norm", "miopen_batch_norm",
    ]
    ops = set()
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            ops.update(getattr(packet, o) for o in packet.overloads())
    return frozenset(ops)


def _policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _context():
    return create_selective_checkpoint_contexts(_policy)


def run_with_recompute(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under the selective checkpointing policy above (non-reentrant)."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_context, determinism_check="none")


def holds_cache(values: dict) -> bool:
    """True when a block call carries a key/value cache (Hugging Face ``Cache`` objects).

    A cache is global state that the forward appends to; recomputing the block in backward
    would append again, so such calls run without recomputation.
    """
    return any(is_cache(v) for v in values.values())


@functools.lru_cache(maxsize=None)
def warn_cache_once(block_type: str) -> None:
    logger.warning(
        "recompute='mhc': %s was called with a key/value cache while computing gradients; "
        "this call stores its activations (train with use_cache=False to recompute)", block_type,
    )
