"""Initialising the mHC parameters after deferred (meta-device) construction.

A model built under ``torch.device("meta")`` and converted there holds no values; after
``model.to_empty(device=...)`` and loading the original weights, the mHC parameters are
still uninitialised memory. Two ways to fill them:

* :func:`init_parameters` ``(model)``: calls ``MHCConnection.reset_parameters()`` on
  every connection (a collective on FSDP2-sharded models: call it on every rank).
* Hugging Face models: ``model.init_weights()`` / ``initialize_weights()`` now also reach
  the connections. Conversion wraps ``_init_weights`` on every ``PreTrainedModel`` in the
  model (per instance), following HF's rule that a module or parameter flagged
  ``_is_hf_initialized`` (loaded) is left alone.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from torch import nn

from .layers import MHCConnection


def init_parameters(model: nn.Module) -> int:
    """Initialise every mHC connection of ``model`` as its ``init`` option says.

    Returns the number of connections initialised.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, MHCConnection):
            module.reset_parameters()
            count += 1
    return count


def _is_hf_pretrained(module: nn.Module) -> bool:
    cls = type(module)
    return all(callable(getattr(cls, name, None)) for name in ("_init_weights", "_initialize_weights", "init_weights"))


def _init_weights_with_mhc(model: nn.Module, previous: Optional[Callable[[nn.Module], Any]], module: nn.Module) -> None:
    """``model._init_weights(module)`` that also initialises :class:`MHCConnection` modules."""
    if previous is not None:
        previous(module)
    else:
        type(model)._init_weights(model, module)
    if isinstance(module, MHCConnection) and not any(
        getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False)
    ):
        module.reset_parameters()


def install_hf_init_hook(model: nn.Module) -> None:
    """Make HF's ``init_weights()`` path initialise the mHC connections (a no-op for non-HF models).

    The wrapper is a ``functools.partial`` of a module-level function (picklable,
    deep-copyable); an ``_init_weights`` already set on the instance is chained.
    """
    for module in model.modules():
        if not _is_hf_pretrained(module):
            continue
        current = module.__dict__.get("_init_weights")
        if isinstance(current, functools.partial) and current.func is _init_weights_with_mhc:
            continue
        module._init_weights = functools.partial(_init_weights_with_mhc, module, current)


__all__ = ["init_parameters", "install_hf_init_hook"]
