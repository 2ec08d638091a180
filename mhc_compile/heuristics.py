"""The few places where mhc_compile judges a module or value by its name, in one file.

Structure decides everything else; these name tests cover what structure cannot tell:

* :func:`is_norm_module`: a normalisation layer written outside ``torch.nn`` (``LlamaRMSNorm``,
  ``T5LayerNorm``): kept as one call by the block tracer and treated as per-stream-safe
  (it acts on each stream alike) when its input carries n streams;
* :func:`is_cache` : a key/value cache object (transformers' ``Cache`` classes), which is
  state: never a constant, never recomputed;
* :func:`is_mhc_parameter_name`: a parameter that conversion added (``<block>.mhc.<i>.phi``);
* :func:`hyper_connection_modules`: modules of a model that already carries its own
  hyper-connections (transformers' ``DeepseekV4HyperConnection``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

MHC_ATTRIBUTE = "mhc"  # the child every converted block gains: ``<block>.mhc.<i>``


def is_norm_module(module: nn.Module) -> bool:
    """A normalisation layer: a class named ``...Norm...`` without child modules.

    ``RobertaPreLayerNormAttention`` holds "norm" in its name but has children: it is a
    block part, not a norm.
    """
    return "norm" in type(module).__name__.lower() and next(module.children(), None) is None


def is_per_position_norm(module: nn.Module) -> bool:
    """A norm over the last (channel) axis only: RMSNorm / LayerNorm written outside ``torch.nn``."""
    name = type(module).__name__.lower()
    return is_norm_module(module) and ("rmsnorm" in name or "layernorm" in name)


def is_cache(value: Any) -> bool:
    """A key/value cache object (Hugging Face ``Cache`` and its subclasses)."""
    return value is not None and any(c.__name__.endswith("Cache") for c in type(value).__mro__)


def is_mhc_parameter_name(name: str) -> bool:
    """A parameter name that lies under a block's ``mhc`` child."""
    return name == MHC_ATTRIBUTE or name.startswith(MHC_ATTRIBUTE + ".") or f".{MHC_ATTRIBUTE}." in name


def hyper_connection_modules(model: nn.Module) -> list[str]:
    """Paths of modules whose class is a hyper-connection of the model's own
    (``...HyperConnection``, ``...HyperHead``): its residual is already n streams."""
    return [
        path for path, m in model.named_modules()
        if any(tag in type(m).__name__ for tag in ("HyperConnection", "HyperHead"))
        and not type(m).__module__.startswith("mhc_compile")
    ]
