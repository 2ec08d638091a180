"""Fine-tuning helpers: which mHC parameters train under adapters such as PEFT's LoRA.

PEFT freezes every base-model parameter, the mHC ones included (its convention; the
default here too). To train them as well, either

* ``LoraConfig(..., modules_to_save=mhc.peft_modules_to_save(model))``: PEFT trains a
  copy of each connection and saves it with the adapter; ``merge_and_unload`` puts the
  trained copies back; or
* ``mhc.mark_trainable(peft_model)`` after ``get_peft_model``: trains them in place
  (``merge_and_unload`` keeps them; the adapter file alone does not hold them).
"""

from __future__ import annotations

from torch import nn

from .api import mhc_parameters
from .layers import MHCConnection


def mark_trainable(model: nn.Module, trainable: bool = True) -> int:
    """Set ``requires_grad`` of every mHC parameter; returns how many were set."""
    params = list(mhc_parameters(model))
    for p in params:
        p.requires_grad_(trainable)
    return len(params)


def peft_modules_to_save(model: nn.Module) -> list[str]:
    """``modules_to_save`` names that select every mHC connection: ``["mhc.0", "mhc.1", ...]``.

    PEFT matches these as suffixes of module names; it cannot wrap the ``mhc``
    ``ModuleList`` itself, so each connection is named.
    """
    names = {
        ".".join(name.split(".")[-2:]) for name, m in model.named_modules() if isinstance(m, MHCConnection)
    }
    return sorted(names, key=lambda n: int(n.rsplit(".", 1)[1]))


__all__ = ["mark_trainable", "peft_modules_to_save"]
