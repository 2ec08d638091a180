"""Save and restore converted models: rebuild, convert with the saved options, load.

A converted model's class is the original class, so a checkpoint is restored in three
steps: build the unconverted model, convert it with the options saved beside the
weights, load the weights. Two entry points do this:

* Hugging Face models: ``model.save_pretrained(path)`` (config.json carries the options
  under ``"mhc"``) and :func:`from_pretrained` ``(model_cls, path)``.
* Any ``nn.Module``: :func:`save` ``(model, directory)`` writes ``mhc_config.json`` and
  ``model.pt`` (``torch.save`` of the state dict); :func:`load` ``(model_or_factory,
  directory, example_inputs=...)`` restores it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import api
from .errors import CheckpointError
from .saved_options import CONFIG_KEY, options_dict, parse_options, saved_options

logger = logging.getLogger("mhc_compile")

OPTIONS_FILE = "mhc_config.json"
WEIGHTS_FILE = "model.pt"
# single-file and sharded checkpoints, in the order they are looked for in a directory
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", WEIGHTS_FILE)
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_mhc_key(key: str) -> bool:
    """True for a state-dict key of an mHC parameter (``<block>.mhc.<i>.phi|bias|alpha``)."""
    return key.startswith("mhc.") or ".mhc." in key


# --------------------------------------------------------------------------- reading weights


def _read_file(path: str, select: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if select(k)}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if select(k)}


def read_state_dict(path: str, select: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose keys ``select`` accepts, on the CPU.

    Args:
        path: a file (``.safetensors``, or a ``torch.save`` file such as
            ``pytorch_model.bin``) or a directory holding ``model.safetensors``,
            ``pytorch_model.bin``, ``model.pt`` or a sharded checkpoint's
            ``*.index.json`` (only the shards that hold selected keys are read).
        select: which keys to read (default: all).
    """
    if os.path.isfile(path):
        return _read_file(path, select)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is neither a checkpoint file nor a directory")
    for name in _INDEX_FILES:
        index = os.path.join(path, name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if select(key)})
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(_read_file(os.path.join(path, shard), select))
            return out
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return _read_file(os.path.join(path, name), select)
    raise CheckpointError(
        f"no weights in {path!r}: looked for {', '.join(_INDEX_FILES + _WEIGHT_FILES)}"
    )


def load_mhc_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy the checkpoint's mHC parameters into a converted model; every one must match.

    Keys saved from the base model (``model.layers.0...``) or from the model with a head
    (``model.model.layers.0...``) are matched through ``base_model_prefix``.
    """
    expected = {k for k in model.state_dict() if is_mhc_key(k)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in expected and prefix:
            if f"{prefix}.{key}" in expected:
                key = f"{prefix}.{key}"
            elif key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
                key = key[len(prefix) + 1 :]
        renamed[key] = value
    missing, unexpected = sorted(expected - set(renamed)), sorted(set(renamed) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the mHC weights in {source} do not match the converted {type(model).__name__}: "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)}); "
            "the options or the model class differ from those the checkpoint was saved with"
        )
    result = model.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


# --------------------------------------------------------------------------- Hugging Face


def from_pretrained(
    model_cls: Any,
    path: Union[str, os.PathLike],
    *,
    example_inputs: Any = None,
    options: Optional[dict[str, Any]] = None,
    **hf_kwargs: Any,
) -> nn.Module:
    """Load a converted Hugging Face model saved with ``save_pretrained``.

    ``model_cls.from_pretrained(path, **hf_kwargs)`` builds the unconverted model (it
    reports the ``<block>.mhc.*`` keys as unexpected: they are loaded next), the options in
    config.json's ``"mhc"`` key convert it (the same blocks as when it was saved), then the
    checkpoint's mHC weights are loaded (safetensors or ``pytorch_model.bin``, sharded or
    not), so the model computes exactly what was saved.

    Args:
        model_cls: the model class (``LlamaForCausalLM``, ``AutoModelForCausalLM``...).
        path: a local directory written by ``save_pretrained`` (a hub repository: download
            it first, e.g. ``huggingface_hub.snapshot_download(repo_id)``).
        example_inputs: as for :func:`mhc_compile` (synthesised when omitted).
        options: saved options to override, e.g. ``{"backend": "torch"}`` or
            ``{"recompute": "mhc"}`` (options that change parameter shapes cannot load).
        **hf_kwargs: passed to ``model_cls.from_pretrained`` (``dtype=``, ...).

    Raises:
        CheckpointError: ``path`` is no local directory, holds no mHC options or its mHC
            weights do not match.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"mhc_compile.from_pretrained reads the mHC weights from a local directory; {path!r} is "
            "not one (for a hub repository: huggingface_hub.snapshot_download(repo_id), then pass its path)"
        )
    model = model_cls.from_pretrained(path, **hf_kwargs)
    saved = saved_options(model)
    if saved is None:
        raise CheckpointError(
            f"{os.path.join(path, 'config.json')} has no {CONFIG_KEY!r} key: the checkpoint was not "
            "saved from a model converted by mhc_compile; load it with "
            f"{getattr(model_cls, '__name__', model_cls)}.from_pretrained and convert it with mhc_compile"
        )
    config, block_paths = parse_options(saved, os.path.join(path, "config.json"))
    _restore(model, config, block_paths, example_inputs, options)
    state = read_state_dict(path, is_mhc_key)
    load_mhc_weights(model, state, path)
    logger.info(
        "mhc_compile.from_pretrained: loaded the %d mHC tensors from %s (the load report above lists "
        "them as unexpected keys of the unconverted model)", len(state), path,
    )
    return model


def _restore(model: nn.Module, config: Any, block_paths: list[str], example_inputs: Any,
             options: Optional[dict[str, Any]]) -> None:
    """Convert ``model`` as saved: same options (with ``options`` overrides), same blocks."""
    if options:
        config = dataclasses.replace(config, **options)
    wanted = set(block_paths)
    api.convert(model, config, example_inputs=example_inputs, filter_fn=lambda module, fqn: fqn in wanted)
    converted = {b.path for b in model._mhc_analysis.blocks}
    if converted != wanted:
        raise CheckpointError(
            f"the checkpoint's converted blocks {sorted(wanted - converted)} were not found in this "
            f"{type(model).__name__}; build the model the checkpoint was saved from"
        )


# --------------------------------------------------------------------------- any nn.Module


def save(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write a converted model's options (``mhc_config.json``) and state dict (``model.pt``).

    For Hugging Face models ``save_pretrained`` does the same in the HF format.
    """
    analysis = getattr(model, "_mhc_analysis", None)
    if analysis is None:
        raise CheckpointError(f"{type(model).__name__} is not converted by mhc_compile; save it with torch.save")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, OPTIONS_FILE), "w") as f:
        json.dump(options_dict(analysis.config, [b.path for b in analysis.blocks]), f, indent=2)
    torch.save(model.state_dict(), os.path.join(directory, WEIGHTS_FILE))


def load(
    model: Union[nn.Module, Callable[[], nn.Module]],
    directory: Union[str, os.PathLike],
    *,
    example_inputs: Any = None,
    options: Optional[dict[str, Any]] = None,
    strict: bool = True,
) -> nn.Module:
    """Restore what :func:`save` wrote into an unconverted model (or one a factory builds).

    The model is converted with the saved options (``example_inputs`` as for
    :func:`mhc_compile`: needed for non-HF models) and gets the whole saved state dict.
    """
    directory = os.fspath(directory)
    options_path = os.path.join(directory, OPTIONS_FILE)
    if not os.path.isfile(options_path):
        raise CheckpointError(f"no {OPTIONS_FILE} in {directory!r}: it was not written by mhc_compile.save")
    with open(options_path) as f:
        config, block_paths = parse_options(json.load(f), options_path)
    if not isinstance(model, nn.Module):
        model = model()
    _restore(model, config, block_paths, example_inputs, options)
    model.load_state_dict(read_state_dict(directory), strict=strict)
    return model


__all__ = ["from_pretrained", "save", "load", "read_state_dict", "load_mhc_weights", "is_mhc_key"]
