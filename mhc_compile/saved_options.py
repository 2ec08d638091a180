"""The conversion options that travel with a converted model's weights.

A Hugging Face model's config gets one key, ``mhc``: the :class:`MHCConfig` fields as JSON
values (``stream_dtype`` as ``"bfloat16"``) plus ``"blocks"``, the paths of the converted
blocks (so a ``filter_fn`` choice is restored without the function). ``save_pretrained``
writes it to config.json; plain ``from_pretrained`` keeps it on the loaded config, which
is how :func:`warn_if_dropped_checkpoint` recognises a checkpoint of a converted model.
Non-HF models keep the same dictionary in ``mhc_config.json`` (see :mod:`.checkpoint`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Optional, Sequence

from torch import nn

from .config import MHCConfig
from .errors import CheckpointError

logger = logging.getLogger("mhc_compile")

CONFIG_KEY = "mhc"
BLOCKS_KEY = "blocks"


class RecordedOptions(dict):
    """The options as recorded by a conversion in this process (a checkpoint's are a plain dict)."""


def options_dict(config: MHCConfig, block_paths: Sequence[str]) -> dict[str, Any]:
    """``{**config.to_dict(), "blocks": [...]}``: JSON-serialisable."""
    return {**config.to_dict(), BLOCKS_KEY: list(block_paths)}


def parse_options(data: Any, source: str) -> tuple[MHCConfig, list[str]]:
    """Inverse of :func:`options_dict`: ``(config, block paths)``; ``source`` names the file."""
    if not isinstance(data, dict) or not isinstance(data.get(BLOCKS_KEY), list):
        raise CheckpointError(
            f"the mHC options in {source} are not a dictionary with a {BLOCKS_KEY!r} list: {data!r}; "
            "they are written by mhc_compile (model.config.mhc or mhc_config.json)"
        )
    values = {k: v for k, v in data.items() if k != BLOCKS_KEY}
    return MHCConfig.from_dict(values), [str(p) for p in data[BLOCKS_KEY]]


def _hf_config(model: nn.Module) -> Optional[Any]:
    """The model's Hugging Face config (anything with ``to_dict`` and ``save_pretrained``)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and callable(getattr(cfg, "to_dict", None)) and callable(getattr(cfg, "save_pretrained", None)):
        return cfg
    return None


def record_options(model: nn.Module, config: MHCConfig, block_paths: Sequence[str]) -> None:
    """Store the options in ``model.config.mhc`` (Hugging Face models only).

    The model gets its own copy of its config first (every submodule that holds the
    config, or one of its sub-configs such as ``text_config``, gets the matching copy): a
    config object the caller also uses to build other models is left as it was, so those
    do not claim to be converted.
    """
    cfg = _hf_config(model)
    if cfg is None:
        return
    copies: dict[int, Any] = {}
    own = copy.deepcopy(cfg, copies)  # copies: id(original object) -> its copy
    for module in model.modules():
        held = getattr(module, "config", None)
        if held is not None and id(held) in copies:
            module.config = copies[id(held)]
    setattr(own, CONFIG_KEY, RecordedOptions(options_dict(config, block_paths)))


def saved_options(model: nn.Module) -> Optional[dict[str, Any]]:
    """``model.config.mhc`` if the model's HF config carries it, else ``None``."""
    cfg = _hf_config(model)
    value = getattr(cfg, CONFIG_KEY, None) if cfg is not None else None
    return value if isinstance(value, dict) else None


def warn_if_dropped_checkpoint(model: nn.Module) -> None:
    """Warn when an unconverted model's config says it was loaded from a converted checkpoint.

    Plain ``from_pretrained`` builds the unconverted class and drops the checkpoint's
    ``<block>.mhc.*`` weights (Hugging Face reports them as unexpected keys); converting
    that model initialises the mHC parameters afresh, so it no longer computes what was
    saved. The weights are not loaded behind the user's back: the options given to this
    call may differ from the saved ones, and ``name_or_path`` may name a hub repository
    or a directory that changed since.
    """
    if saved_options(model) is None or isinstance(saved_options(model), RecordedOptions):
        return  # no options, or options a conversion in this process recorded (no checkpoint involved)
    cls = type(model).__name__
    path = getattr(model.config, "name_or_path", "") or "PATH"
    message = (
        f"{cls}.config carries mHC options (the 'mhc' key): it was loaded from a checkpoint of "
        f"a converted model ({path}), whose mHC weights (<block>.mhc.*) plain from_pretrained "
        f"dropped; this conversion initialises them afresh. To restore the saved model use "
        f"mhc_compile.from_pretrained({cls}, {path!r})"
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)
