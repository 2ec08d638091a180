"""Coverage sweep: which Hugging Face architectures does ``mhc_compile`` convert correctly?

    python benchmarks/coverage.py --jobs 2
    python benchmarks/coverage.py --mappings causal --only llama gpt2 --out /tmp/cov
    python benchmarks/coverage.py --attn eager --only llama gpt2 qwen2 bert --name coverage-eager

For every architecture of four ``transformers`` auto mappings (causal LMs, base models,
seq2seq LMs, image classification) it builds a tiny random-weight model from the default
config (shrunk by :func:`shrink_config`, fixed seed, ``eval()``), synthesises inputs at
two shapes and measures:

* ``unbuildable``: the model cannot be built, or the *unconverted* model's forward fails
  on the synthesised inputs (not a failure of mhc_compile; counted separately);
* conversion with ``example_inputs=`` the sweep's own inputs (the main result) and, in a
  separate column, with ``example_inputs=None`` (mhc_compile synthesises them);
* ``max|a-b| / max|a|`` of the main float output (logits, last_hidden_state or the first
  float leaf) between original and converted model at both shapes (pass: <= 1e-5);
* one backward in eval mode (``.loss`` with labels for causal LMs whose original computes
  a finite one, else ``.sum()`` of the main output): every mHC parameter must get a
  finite gradient.

Each architecture runs in its own forked process (a crash or hang stays contained) under
a time limit. Results: ``<out>/<name>.md`` (summary per mapping, full table, failures
grouped by class) and ``<out>/<name>.json``. The full sweep (about 870 architectures)
takes roughly an hour with ``--jobs 2`` on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import multiprocessing as mp
import os
import re
import shlex
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mhc_compile as mhc  # noqa: E402

TOL = 1e-5
UNDERFLOW = 1e-30  # a reference output below this has underflowed (float32 denormals from 1.2e-38)
SEED = 0

# mapping key -> (name in transformers.models.auto.modeling_auto, auto class)
MAPPINGS: dict[str, tuple[str, str]] = {
    "causal": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "base": ("MODEL_MAPPING_NAMES", "AutoModel"),
    "seq2seq": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "image": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}

# Two input shapes per architecture: (batch, sequence length) and (batch, audio samples).
SEQ_SHAPES = [(2, 8), (3, 13)]
IMAGE_BATCHES = [2, 3]
AUDIO_SAMPLES = [(2, 3200), (3, 4000)]
FEATURE_FRAMES = [(2, 64), (3, 64)]

# --------------------------------------------------------------------------- config shrink

HIDDEN_KEYS = {"hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "model_dim",
               "word_embed_proj_dim", "projection_dim", "embedding_dim", "text_embed_dim",
               "vision_embed_dim", "dim", "attention_hidden_size"}
LAYER_KEYS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers",
              "decoder_layers", "num_encoder_layers", "num_decoder_layers", "depth",
              "num_text_layers", "num_vision_layers"}
HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
             "decoder_attention_heads", "num_heads"}
KV_HEAD_KEYS = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
                "n_head_kv"}
FFN_KEYS = {"intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner",
            "d_ff", "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size",
            "intermediate_dim", "encoder_intermediate_size",
            "decoder_intermediate_size", "dense_intermediate_size"}
FIXED_SMALL = {  # key -> value (only lowered, never raised)
    "head_dim": 16, "d_kv": 16, "kv_channels": 16, "attention_head_size": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "qk_head_dim": 32,
    "rotary_dim": 8, "d_head": 16, "num_kv_shared_layers": 0,
    "kv_lora_rank": 32, "q_lora_rank": 32, "embedding_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "num_selected_experts": 2, "moe_k": 2,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
    "max_source_positions": 64,
}
SPECIAL_ID = re.compile(r"(_token_id|_token_index|_token_ids|_id)$")

# Per-architecture fixes applied after the generic shrink: dotted key -> value
# ("vision_config.image_size"). Only for models the generic shrink gets wrong.
OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"num_experts_per_tok": 2},  # None in the default config
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "bamba": {"mamba_n_heads": 4, "mamba_d_head": 32},
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_head": 32},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32]},
    "nemotron": {"head_dim": 16},  # None in the default config
    "ministral": {"head_dim": 16},
    "hunyuan_v1_dense": {"head_dim": 16},
    "hunyuan_v1_moe": {"head_dim": 16},
    "mamba2": {"head_dim": 32, "n_groups": 1},
    # the default SSM is 1024 wide with 128 heads and a 256-step chunked scan in plain
    # PyTorch: 6 s per tiny forward, past the time limit for conversion's traces and probes
    "falcon_h1": {"mamba_d_ssm": 128, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16,
                  "mamba_chunk_size": 16},
    # the default config is EfficientNet-B7 (63M parameters at any image size): B0's scaling
    "efficientnet": {"width_coefficient": 1.0, "depth_coefficient": 1.0, "hidden_dim": 1280},
}


def special_ids(d: dict) -> list[int]:
    """All token ids named in a config dict (nested), which the vocabulary must cover."""
    ids: list[int] = []
    for k, v in d.items():
        if not isinstance(k, str) or k in ("id2label", "label2id"):
            continue
        if isinstance(v, dict):
            ids += special_ids(v)
        elif SPECIAL_ID.search(k):
            for x in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
                    ids.append(x)
    return ids


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _cap(v: Any, cap: int) -> Any:
    return min(v, cap) if _is_int(v) else v


def _image_size(size: Any, patch: Any) -> Any:
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    patch = patch if _is_int(patch) and patch > 0 else 1
    target = 64 if 64 % patch == 0 else patch * max(1, 64 // patch)
    if isinstance(size, (list, tuple)):
        return [min(s, target) for s in size]
    return min(size, target) if _is_int(size) else size


def _rescale_sections(sections: list[int], total: int) -> list[int]:
    """Rescale rotary sections (e.g. mrope_section) to sum to ``total``."""
    old = sum(sections) or 1
    out = [max(1, s * total // old) for s in sections]
    out[-1] += total - sum(out)
    return out


def _shrink_level(d: dict, vocab_floor: int, layers: bool = True) -> None:
    """Shrink one config level in place (no recursion into sub-configs)."""
    hierarchical = isinstance(d.get("depths"), list) or isinstance(d.get("hidden_sizes"), list)
    old_layers = {k: d[k] for k in LAYER_KEYS if _is_int(d.get(k))} if layers else {}
    for k, v in list(d.items()):
        if not _is_int(v) or v <= 0:
            continue
        if k in HIDDEN_KEYS and not (hierarchical and k in ("hidden_size", "embed_dim")):
            d[k] = min(v, 64)
        elif k in LAYER_KEYS and not (hierarchical and k == "num_layers"):
            pass  # below, with the per-layer lists
        elif k in HEAD_KEYS:
            d[k] = min(v, 4)
        elif k in FFN_KEYS:
            d[k] = min(v, 128)
        elif k in FIXED_SMALL:
            d[k] = min(v, FIXED_SMALL[k])
        elif k == "vocab_size":
            d[k] = min(v, vocab_floor)
        elif k == "max_window_layers":
            d[k] = min(v, 2)
    heads = d.get("num_attention_heads", d.get("num_heads", 4))
    for k in KV_HEAD_KEYS:
        if _is_int(d.get(k)) and d[k] > 0:
            d[k] = 1 if d[k] == 1 else (heads if _is_int(heads) and d[k] >= heads else 2)
    if "image_size" in d:
        d["image_size"] = _image_size(d["image_size"], d.get("patch_size", 1))
    if isinstance(d.get("depths"), list):
        d["depths"] = [min(x, 2) for x in d["depths"]]
        if _is_int(d.get("window_size")):
            d["window_size"] = min(d["window_size"], 2)
    for key, old in old_layers.items():
        if key in d and old > 2 and not (hierarchical and key == "num_layers"):
            _shrink_layers(d, key, old, 2)
    if old_layers and any(d.get(k) != v for k, v in old_layers.items()):
        for k in ("stage_names", "out_features", "out_indices"):
            if not hierarchical:
                d.pop(k, None)  # derived from the layer count; recomputed by the config


def _per_layer_lists(d: dict, old: int) -> list[str]:
    """Keys of lists with one entry per layer (layer_types, mlp_layer_types, ...)."""
    return [k for k, v in d.items()
            if isinstance(v, list) and len(v) == old and k not in ("depths", "hidden_sizes", "num_heads")]


def _layer_index_lists(d: dict, old: int) -> list[str]:
    """Keys of lists of layer indices (attn_layer_indices, mlp_only_layers, ...)."""
    return [k for k, v in d.items()
            if ("layer" in k or "idx" in k) and isinstance(v, list) and v and len(v) != old
            and all(_is_int(x) and 0 <= x < old for x in v)]


def _representative_layers(d: dict, old: int, new: int) -> list[int]:
    """Old layer indices to keep: the first layer of each distinct kind, padded to ``new``.

    A layer's kind is its entry in every per-layer list of strings and whether
    ``per_layer_config`` names it, so that a hybrid model keeps an attention layer.
    """
    lists = [d[k] for k in _per_layer_lists(d, old) if all(isinstance(x, str) for x in d[k])]
    sets = [{int(k) for k in (d.get("per_layer_config") or {})}]
    sets += [set(d[k]) for k in _layer_index_lists(d, old)]
    kinds = [tuple(lst[i] for lst in lists) + tuple(i in s for s in sets) for i in range(old)]
    chosen = sorted({kinds.index(k) for k in set(kinds)})[:4]
    for i in range(old):
        if len(chosen) >= new:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _shrink_layers(d: dict, key: str, old: int, new: int) -> None:
    """Set ``d[key]`` to the kept layers and cut every per-layer list to them."""
    keep = _representative_layers(d, old, new)
    for k in _layer_index_lists(d, old):
        d[k] = [j for j, i in enumerate(keep) if i in d[k]]
    for k in _per_layer_lists(d, old):
        d[k] = [d[k][i] for i in keep]
    d[key] = len(keep)
    plc = d.get("per_layer_config")
    if isinstance(plc, dict) and plc:
        width = len(next(iter(plc)))
        d["per_layer_config"] = {
            str(j).zfill(width): _shrunk_copy(plc[k]) for j, i in enumerate(keep)
            for k in plc if int(k) == i
        }
    for period, offset in (("attn_layer_period", "attn_layer_offset"),
                           ("expert_layer_period", "expert_layer_offset")):
        if _is_int(d.get(offset)) and d[offset] >= d[key]:
            d[period], d[offset] = 2, 1


def _shrunk_copy(level: Any) -> Any:
    if isinstance(level, dict):
        level = dict(level)
        _shrink_level(level, 1000, layers=False)
    return level


def _fix_rope(d: Any, head_dim: int) -> None:
    """mrope sections must add up to half the (new) head dim."""
    if isinstance(d, dict):
        for k, v in d.items():
            if k == "mrope_section" and isinstance(v, list) and v:
                d[k] = _rescale_sections(v, head_dim // 2)
            else:
                _fix_rope(v, head_dim)


def _is_subconfig(v: Any) -> bool:
    return isinstance(v, dict) and "model_type" in v


def shrink_dict(d: dict, vocab_floor: int) -> dict:
    """Shrink a config dict and its sub-config dicts (text_config, vision_config, ...)."""
    _shrink_level(d, vocab_floor)
    for v in d.values():
        if _is_subconfig(v):
            shrink_dict(v, vocab_floor)
        elif isinstance(v, list):
            for item in v:
                if _is_subconfig(item):
                    shrink_dict(item, vocab_floor)
    _fix_rope(d, d.get("head_dim", 16) if _is_int(d.get("head_dim")) else 16)
    return d


def _set_dotted(d: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def default_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


def shrink_config(model_type: str):
    """The default config of ``model_type``, shrunk to a tiny size (plus any override)."""
    cfg = default_config(model_type)
    d = cfg.to_dict()
    vocab_floor = max([1000] + [i + 1 for i in special_ids(d)])
    shrink_dict(d, vocab_floor)
    for key, value in OVERRIDES.get(model_type, {}).items():
        _set_dotted(d, key, value)
    for k in ("transformers_version", "_name_or_path", "architectures"):
        d.pop(k, None)
    return type(cfg).from_dict(d)


# --------------------------------------------------------------------------- build


def model_class(class_name: str):
    import transformers

    return getattr(transformers, class_name)


def build_model(model_type: str, class_name: str, attn: Optional[str]) -> nn.Module:
    """A tiny random-weight ``class_name`` in eval mode (float32, fixed seed)."""
    cfg = shrink_config(model_type)
    cls = model_class(class_name)
    kwargs = {"attn_implementation": attn} if attn else {}
    try:
        torch.manual_seed(SEED)
        model = cls._from_config(cfg, **kwargs)
    except Exception:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if text is cfg:
            raise
        torch.manual_seed(SEED)  # a text-only class listed under a composite config
        model = cls._from_config(text, **kwargs)
    return model.float().eval()


# --------------------------------------------------------------------------- inputs


def _find(cfg: Any, *names: str, default: Any = None) -> Any:
    """First attribute among ``names`` on the config or its sub-configs (breadth first)."""
    queue = [cfg]
    while queue:
        c = queue.pop(0)
        for n in names:
            v = getattr(c, n, None)
            if v is not None:
                return v
        for sub in ("vision_config", "text_config", "audio_config", "encoder", "decoder",
                    "backbone_config"):
            s = getattr(c, sub, None)
            if s is not None and not isinstance(s, dict):
                queue.append(s)
    return default


def token_ids(cfg: Any, batch: int, length: int) -> torch.Tensor:
    """Random token ids below the vocabulary size that avoid every special token id."""
    vocab = _find(cfg, "vocab_size", default=1000)
    avoid = set(special_ids(cfg.to_dict()))
    pool = torch.tensor([i for i in range(min(vocab, 1000)) if i not in avoid] or [0])
    g = torch.Generator().manual_seed(SEED + batch * 100 + length)
    return pool[torch.randint(0, len(pool), (batch, length), generator=g)]


def image_input(cfg: Any, batch: int) -> torch.Tensor:
    size = _find(cfg, "image_size", default=64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if isinstance(size, dict):
        size = size.get("height", 64)
    channels = _find(cfg, "num_channels", "in_channels", "in_chans", default=3)
    g = torch.Generator().manual_seed(SEED + batch)
    return torch.randn(batch, channels, size, size, generator=g)


def audio_features(cfg: Any, batch: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + batch)
    mels = _find(cfg, "num_mel_bins", default=None)
    if mels is not None and _find(cfg, "max_source_positions", default=None) is not None:
        return torch.randn(batch, mels, frames, generator=g)  # whisper-like: [B, mel, T]
    per_channel = _find(cfg, "input_feat_per_channel", default=None)
    if per_channel is not None:
        width = per_channel * _find(cfg, "input_channels", default=1)
    else:
        width = mels or _find(cfg, "feature_size", default=80)
    return torch.randn(batch, frames, width, generator=g)  # [B, T, features]


def synth_inputs(mapping: str, model: nn.Module, shape: int, recipe: str) -> dict[str, Any]:
    """Keyword inputs of one forward call at shape index ``shape`` (0 or 1)."""
    cfg = model.config
    main = getattr(model, "main_input_name", "input_ids")
    batch, length = SEQ_SHAPES[shape]
    if main == "pixel_values":
        return {"pixel_values": image_input(cfg, IMAGE_BATCHES[shape])}
    inputs: dict[str, Any]
    if main == "input_values" and _find(cfg, "num_mel_bins") is not None:
        batch, frames = FEATURE_FRAMES[shape]  # a spectrogram [B, T, mel] (AST-like)
        frames = _find(cfg, "max_length", default=frames)
        inputs = {"input_values": audio_features(cfg, batch, frames)}
    elif main == "input_values":
        batch, n = AUDIO_SAMPLES[shape]
        inputs = {"input_values": torch.randn(batch, n, generator=torch.Generator().manual_seed(batch))}
    elif main == "input_features":
        batch, frames = FEATURE_FRAMES[shape]
        frames = 2 * _find(cfg, "max_source_positions", default=frames // 2)
        inputs = {"input_features": audio_features(cfg, batch, frames)}
    elif main == "input_ids":
        inputs = {"input_ids": token_ids(cfg, batch, length)}
    else:
        raise NotImplementedError(f"no input synthesiser for main input {main!r}")
    if mapping == "seq2seq" or getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = token_ids(cfg, batch, max(2, length - 3))
    if recipe == "with_mask" and "input_ids" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if recipe == "with_pixels":
        inputs["pixel_values"] = image_input(cfg, batch)
    return inputs


def needs_pixels(model: nn.Module) -> bool:
    import inspect

    return "pixel_values" in inspect.signature(model.forward).parameters


# --------------------------------------------------------------------------- measurement


def main_output(out: Any) -> torch.Tensor:
    """logits, last_hidden_state, or the first float tensor leaf of a model output."""
    for name in ("logits", "last_hidden_state"):
        v = getattr(out, name, None) if not isinstance(out, dict) else out.get(name)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    from torch.utils._pytree import tree_leaves

    values = out.values() if isinstance(out, dict) else out
    for leaf in tree_leaves(list(values) if isinstance(out, dict) else values):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"no float tensor in the output ({type(out).__name__})")


def rel_err(new: torch.Tensor, ref: torch.Tensor) -> float:
    if new.shape != ref.shape:
        return math.inf
    denom = ref.float().abs().max().item()
    diff = (new.float() - ref.float()).abs().max().item()
    return diff / denom if denom > 0 else diff


def count_connections(model: nn.Module) -> tuple[int, int]:
    analysis = getattr(model, "_mhc_analysis", None)
    if analysis is None:
        return 0, 0
    return sum(len(b.connections) for b in analysis.blocks), len({b.chain for b in analysis.blocks})


def grads_ok(model: nn.Module) -> tuple[bool, str]:
    params = list(mhc.mhc_parameters(model))
    if not params:
        return False, "no mHC parameters"
    missing = sum(p.grad is None for p in params)
    bad = sum(p.grad is not None and not torch.isfinite(p.grad).all().item() for p in params)
    if missing or bad:
        return False, f"{missing} of {len(params)} mHC parameters without grad, {bad} non-finite"
    return True, ""


# --------------------------------------------------------------------------- errors


class ArchTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` swallows it."""


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _frames(err: BaseException) -> list[traceback.FrameSummary]:
    frames: list[traceback.FrameSummary] = []
    e: Optional[BaseException] = err
    while e is not None:
        frames += traceback.extract_tb(e.__traceback__)
        e = e.__cause__
    return frames


def mhc_location(err: BaseException) -> str:
    """Where the (outermost) error left mhc_compile: ``file.py:function`` of its last frame."""
    pkg = os.path.dirname(os.path.abspath(mhc.__file__))
    inside = [f for f in traceback.extract_tb(err.__traceback__) if os.path.abspath(f.filename).startswith(pkg)]
    if not inside:
        return ""
    f = inside[-1]
    return f"{os.path.relpath(f.filename, os.path.dirname(pkg))}:{f.name}"


def origin(err: BaseException) -> str:
    """The deepest frame of the root cause: ``package/file.py:function:line``."""
    frames = traceback.extract_tb(_root_cause(err).__traceback__) or _frames(err)
    if not frames:
        return ""
    f = frames[-1]
    parts = f.filename.split(os.sep)
    return f"{'/'.join(parts[-2:])}:{f.name}:{f.lineno}"


def first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def normalise(message: str, names: set[str]) -> str:
    """Message prefix with model-specific words blanked, so that similar failures group."""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'_'", message)
    msg = re.sub(r"\b\w+\b", lambda m: "<M>" if m.group(0) in names else m.group(0), msg)
    msg = re.sub(r"\b(?=\w*\d)[\w.]+\b", "N", msg)  # numbers and names with digits
    msg = re.sub(r"\s+", " ", msg)
    return msg[:110].rstrip()


def error_class(step: str, err: BaseException, names: set[str]) -> str:
    """``step/Type: normalised message`` (the root cause's message for wrapped errors)."""
    root = _root_cause(err)
    head = f"{step}/{type(err).__name__}"
    if root is not err:
        head += f"<-{type(root).__name__}"
    return f"{head}: {normalise(first_line(root, 400), names)}"


# --------------------------------------------------------------------------- one architecture


@dataclass
class Task:
    mapping: str
    model_type: str
    class_name: str
    attn: Optional[str]
    timeout: int
    reference_only: bool = False


@dataclass
class Result:
    mapping: str
    model_type: str
    class_name: str
    status: str = "unbuildable"
    step: str = ""
    error_type: str = ""
    error: str = ""
    error_class: str = ""
    where: str = ""
    origin: str = ""
    attn: str = ""
    params: int = 0
    connections: int = 0
    chains: int = 0
    err_shape1: Optional[float] = None
    err_shape2: Optional[float] = None
    backward: Optional[bool] = None
    convert_none: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _fail(res: Result, step: str, err: BaseException, names: set[str]) -> None:
    res.step = step
    res.error_type = type(err).__name__
    res.error = first_line(err)
    res.error_class = "timeout" if isinstance(err, ArchTimeout) else error_class(step, err, names)
    res.where = mhc_location(err)
    res.origin = origin(err)
    if step in ("build", "original"):
        res.status = "unbuildable"
    else:
        res.status = res.error_class


def _run_reference(task: Task, res: Result) -> tuple[nn.Module, str, list[dict], list[torch.Tensor]]:
    """Build, pick an input recipe the original accepts, and run it at both shapes."""
    model = build_model(task.model_type, task.class_name, task.attn)
    res.params = sum(p.numel() for p in model.parameters())
    res.attn = str(getattr(model.config, "_attn_implementation", "") or "")
    recipes = ["plain", "with_mask"] + (["with_pixels"] if needs_pixels(model) else [])
    err: Optional[BaseException] = None
    for recipe in recipes:
        try:
            inputs = [synth_inputs(task.mapping, model, s, recipe) for s in (0, 1)]
            with torch.no_grad():
                refs = [main_output(model(**x)) for x in inputs]
            if max(r.abs().max().item() for r in refs) < UNDERFLOW and reset_norm_weights(model):
                res.notes.append("norm weights reset to 1: the model's own init underflows its outputs")
                with torch.no_grad():
                    refs = [main_output(model(**x)) for x in inputs]
            return model, recipe, inputs, refs
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 - try the next recipe
            err = e
    assert err is not None
    raise err


def reset_norm_weights(model: nn.Module) -> bool:
    """Set every batch/group/layer norm's scale to 1 and shift to 0 (PyTorch's own init).

    For models whose init draws norm scales from ``N(0, initializer_range)`` (MobileViT):
    each norm then shrinks the signal ~50 times, and at random weights the outputs end in
    float32's denormal range (1e-41), where a few significant bits are left and any
    reordering of float ops changes them by O(1) relative, so no comparison means anything.
    Returns whether there was a norm to reset.
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))]
    with torch.no_grad():
        for m in norms:
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return bool(norms)


def labels_loss_works(model: nn.Module, inputs: dict) -> bool:
    """The unconverted causal LM computes a finite ``.loss`` from ``labels=input_ids`` (GIT's
    does not when the text is shorter than its image tokens)."""
    try:
        with torch.no_grad():
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        return isinstance(loss, torch.Tensor) and bool(torch.isfinite(loss).all())
    except Exception:  # noqa: BLE001 - the original's own loss fails: use the output's sum
        return False


def _backward(task: Task, model: nn.Module, inputs: dict, labels: bool) -> tuple[bool, str]:
    """One gradient step's backward, called as training calls the model: without a KV
    cache (RWKV's eval-mode default ``use_cache=True`` updates its state in place, which
    breaks the backward of the unconverted model too); ``labels``: the causal LM's own loss."""
    model.zero_grad(set_to_none=True)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "use_cache": False}
    if labels:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    else:  # every float output: a part that feeds only a secondary output (BridgeTower's) gets a gradient too
        from torch.utils._pytree import tree_leaves

        out = model(**inputs)
        leaves = tree_leaves(list(out.values()) if isinstance(out, dict) else out)
        loss = sum(t.float().sum() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())
    loss.backward()
    return grads_ok(model)


def run_arch(task: Task) -> Result:
    """Every step for one architecture; each failure is recorded, never raised."""
    res = Result(task.mapping, task.model_type, task.class_name)
    start = time.time()
    names: set[str] = {task.class_name}
    step = "build"
    try:
        model, recipe, inputs, refs = _run_reference(task, res)
        names |= {type(m).__name__ for m in model.modules()}
        if recipe != "plain":
            res.notes.append(f"inputs: {recipe}")
        if task.reference_only:
            res.status = "built"
            res.seconds = round(time.time() - start, 1)
            return res
        labels = task.mapping == "causal" and labels_loss_works(model, inputs[0])
        if task.mapping == "causal" and not labels:
            res.notes.append("backward: sum of logits (the original's labels loss fails)")
        spare = copy.deepcopy(model)
        step = "convert"
        mhc.mhc_compile(model, n_streams=4, example_inputs=dict(inputs[0]))
        res.connections, res.chains = count_connections(model)
        step = "compare"
        with torch.no_grad():
            errs = [rel_err(main_output(model(**x)), r) for x, r in zip(inputs, refs)]
        res.err_shape1, res.err_shape2 = errs
        step = "backward"
        res.backward, note = _backward(task, model, inputs[0], labels)
        if note:
            res.notes.append(note)
        if all(e <= TOL for e in errs) and res.backward:
            res.status = "ok"
        elif not all(e <= TOL for e in errs):
            res.status = res.error_class = "mismatch" if math.isfinite(max(errs)) else "mismatch/shape"
            res.step = "compare"
        else:
            res.status = res.error_class = "backward/no finite grads"
            res.step = "backward"
        step = "convert_none"
        del model
        res.convert_none = _convert_none(spare, names)
    except ArchTimeout as err:
        _fail(res, step, err, names)
        res.status = "timeout"
    except NotImplementedError as err:
        _fail(res, "build", err, names)
        res.error_class = "no input synthesiser"
    except Exception as err:  # noqa: BLE001 - recorded
        _fail(res, "original" if step == "build" and res.params else step, err, names)
    res.seconds = round(time.time() - start, 1)
    return res


def _convert_none(model: nn.Module, names: set[str]) -> str:
    try:
        mhc.mhc_compile(model, n_streams=4)
        return "ok"
    except ArchTimeout:
        raise
    except Exception as err:  # noqa: BLE001 - recorded
        return error_class("convert", err, names)


def _on_alarm(signum: int, frame: Any) -> None:
    raise ArchTimeout("time limit reached")


def _child(task: Task, conn: Any) -> None:
    """Process entry: one architecture, its Result sent back through ``conn``."""
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(task.timeout)
    try:
        res = run_arch(task)
    except ArchTimeout:
        res = Result(task.mapping, task.model_type, task.class_name, status="timeout",
                     error_class="timeout", error="time limit reached outside a step")
    signal.alarm(0)
    conn.send(asdict(res))
    conn.close()


# --------------------------------------------------------------------------- scheduling


def run_all(tasks: list[Task], jobs: int, log: Any = sys.stderr) -> list[dict]:
    """Run tasks in at most ``jobs`` forked processes; a crashed or hung child is recorded."""
    ctx = mp.get_context("fork")
    pending = list(tasks)
    running: list[tuple[Task, Any, Any, float]] = []
    results: list[dict] = []
    while pending or running:
        while pending and len(running) < jobs:
            task = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(task, child), daemon=True)
            proc.start()
            child.close()
            running.append((task, proc, parent, time.time()))
        time.sleep(0.2)
        for item in list(running):
            task, proc, conn, started = item
            result = _poll(task, proc, conn, started)
            if result is not None:
                running.remove(item)
                results.append(result)
                _log_result(result, len(results), len(tasks), log)
    return results


def _poll(task: Task, proc: Any, conn: Any, started: float) -> Optional[dict]:
    if conn.poll():
        try:
            result = conn.recv()
        except EOFError:
            result = None
        proc.join(5)
        if proc.is_alive():
            proc.kill()
        if result is not None:
            return result
    elif proc.is_alive() and time.time() - started < task.timeout + 60:
        return None
    if proc.is_alive():
        proc.kill()
        proc.join()
        status, message = "timeout", "killed after the time limit"
    else:
        status, message = "crash", f"process exited with code {proc.exitcode}"
    return asdict(Result(task.mapping, task.model_type, task.class_name, status=status,
                         error_class=status, error=message, seconds=round(time.time() - started, 1)))


def _log_result(r: dict, done: int, total: int, log: Any) -> None:
    detail = "" if r["status"] == "ok" else f"  {r['error_class'][:120]}"
    print(f"[{done}/{total}] {r['mapping']:7s} {r['model_type']:32s} {r['status'][:40]:40s} "
          f"{r['seconds']:6.1f}s{detail}", file=log, flush=True)


# --------------------------------------------------------------------------- tasks


def mapping_tasks(mapping: str, args: argparse.Namespace) -> list[Task]:
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, MAPPINGS[mapping][0])
    tasks = []
    for model_type, class_name in names.items():
        if args.only and model_type not in args.only:
            continue
        if isinstance(class_name, (tuple, list)):
            class_name = class_name[0]
        tasks.append(Task(mapping, model_type, class_name, args.attn, args.timeout, args.reference_only))
    return tasks


# --------------------------------------------------------------------------- report


def _fmt_err(v: Optional[float]) -> str:
    if v is None:
        return ""
    return "inf" if not math.isfinite(v) else f"{v:.1e}"


def summary_lines(results: list[dict], mappings: list[str]) -> list[str]:
    lines = []
    for m in mappings:
        rs = [r for r in results if r["mapping"] == m]
        if not rs:
            continue
        built = [r for r in rs if r["status"] != "unbuildable"]
        ok = sum(r["status"] == "ok" for r in built)
        correct = sum(
            r["err_shape1"] is not None and r["err_shape1"] <= TOL and (r["err_shape2"] or 0) <= TOL
            for r in built
        )
        none_ok = sum(r["convert_none"] == "ok" for r in built)
        pct = 100 * ok / max(len(built), 1)
        lines.append(
            f"- **{m}** ({MAPPINGS[m][0]}): {len(rs)} architectures, {len(rs) - len(built)} "
            f"unbuildable; buildable N = {len(built)}, converted-and-correct (both shapes, "
            f"backward) K = {ok} ({pct:.0f}%); outputs correct regardless of backward: "
            f"{correct}; converts with example_inputs=None: {none_ok}"
        )
    return lines


def table(results: list[dict]) -> str:
    from tabulate import tabulate

    rows = [
        {
            "mapping": r["mapping"],
            "model_type": r["model_type"],
            "class": r["class_name"],
            "status": r["status"] if r["status"] in ("ok", "unbuildable", "timeout", "crash") else "FAIL",
            "step": r["step"],
            "conn": r["connections"] or "",
            "chains": r["chains"] or "",
            "err 1": _fmt_err(r["err_shape1"]),
            "err 2": _fmt_err(r["err_shape2"]),
            "bwd": "" if r["backward"] is None else ("ok" if r["backward"] else "FAIL"),
            "ex=None": "ok" if r["convert_none"] == "ok" else ("FAIL" if r["convert_none"] else ""),
            "params": f"{r['params'] / 1e6:.2f}M" if r["params"] else "",
            "s": r["seconds"],
            "error": (f"{r['error_type']}: {r['error']}" if r["error_type"] else r["error"]).replace("|", "/")[:160],
        }
        for r in sorted(results, key=lambda r: (list(MAPPINGS).index(r["mapping"]), r["model_type"]))
    ]
    return tabulate(rows, headers="keys", tablefmt="github")


def grouped_failures(results: list[dict], unbuildable: bool) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        if (r["status"] == "unbuildable") != unbuildable or r["status"] == "ok":
            continue
        groups.setdefault(r["error_class"] or r["status"], []).append(r)
    lines = []
    for key, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        archs = ", ".join(f"{r['mapping']}:{r['model_type']}" for r in rs)
        where = sorted({r["where"] for r in rs if r["where"]})
        origins = sorted({r["origin"] for r in rs if r["origin"]})[:3]
        lines.append(f"### {len(rs)} x `{key}`\n")
        lines.append(f"- example: {rs[0]['error_type']}: {rs[0]['error']}".replace("\n", " "))
        if where:
            lines.append(f"- leaves mhc_compile at: {', '.join(where)}")
        if origins:
            lines.append(f"- raised at: {', '.join(origins)}")
        lines.append(f"- architectures: {archs}\n")
    return lines


def none_failures(results: list[dict]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for r in results:
        if r["convert_none"] and r["convert_none"] != "ok":
            groups.setdefault(r["convert_none"], []).append(f"{r['mapping']}:{r['model_type']}")
    return [f"- {len(v)} x `{k}`: {', '.join(v)}" for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def write_reports(results: list[dict], args: argparse.Namespace, command: str, seconds: float) -> None:
    os.makedirs(args.out, exist_ok=True)
    md = [
        "# mhc_compile coverage over transformers auto mappings\n",
        f"Command: `{command}`\n",
        f"Run time: {seconds / 60:.1f} min with --jobs {args.jobs} (timeout {args.timeout} s per "
        f"architecture); transformers {_tf_version()}, torch {torch.__version__}, CPU; "
        f"attention: {args.attn or 'default (sdpa where supported)'}; n_streams = 4; "
        f"pass: max|a-b|/max|a| <= {TOL:g} at both shapes and finite grads on every mHC parameter.\n",
        "## Summary\n",
        *summary_lines(results, args.mappings),
        "",
        "## Failures (converter or correctness), grouped by class\n",
        *grouped_failures(results, unbuildable=False),
        "## Conversion with example_inputs=None, failures grouped\n",
        *none_failures(results),
        "",
        "## Unbuildable (build or the unconverted forward failed), grouped\n",
        *grouped_failures(results, unbuildable=True),
        "## All architectures\n",
        table(results),
        "",
    ]
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(md))
    meta = {"command": command, "seconds": round(seconds, 1), "tolerance": TOL,
            "transformers": _tf_version(), "torch": torch.__version__}
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)


def _tf_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------- CLI


def preimport() -> None:
    """Import the heavy shared modules once in the parent; forked children inherit them."""
    import torch._dynamo  # noqa: F401
    import torch.export  # noqa: F401
    import transformers.activations  # noqa: F401
    import transformers.generation  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers.models.auto import modeling_auto  # noqa: F401


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mappings", nargs="+", choices=list(MAPPINGS), default=list(MAPPINGS))
    p.add_argument("--only", nargs="+", metavar="MODEL_TYPE", help="only these model types")
    p.add_argument("--limit", type=int, help="at most N architectures per mapping")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="coverage", help="file stem of the .md and .json")
    p.add_argument("--timeout", type=int, default=120, help="seconds per architecture")
    p.add_argument("--jobs", type=int, default=1, help="architectures run in parallel")
    p.add_argument("--reference-only", action="store_true",
                   help="only build and run the unconverted models (to tune the config shrink)")
    p.add_argument("--attn", choices=["sdpa", "eager"], help="attn_implementation (default: the model's)")
    p.add_argument("--update", metavar="JSON",
                   help="an earlier sweep's .json: the report holds its rows with this run's architectures "
                        "replaced (or added), and names both commands")
    return p.parse_args(argv)


def merge_with_earlier(path: str, results: list[dict], command: str, seconds: float,
                       args: argparse.Namespace) -> tuple[list[dict], str, float]:
    """``--update``: the earlier sweep's rows, each architecture re-run here replaced by its new row."""
    with open(path) as f:
        earlier = json.load(f)
    rerun = {(r["mapping"], r["model_type"]) for r in results}
    kept = [r for r in earlier["results"] if (r["mapping"], r["model_type"]) not in rerun]
    mappings = list(dict.fromkeys([r["mapping"] for r in kept + results]))
    args.mappings = [m for m in MAPPINGS if m in mappings]
    merged = sorted(kept + results, key=lambda r: (args.mappings.index(r["mapping"]), r["model_type"]))
    both = (f"{earlier['meta']['command']}` (transformers {earlier['meta'].get('transformers', '?')}); then, "
            f"their rows replaced, a re-run (the run time below is its own) of the {len(rerun)} "
            f"architectures of `{command}")
    return merged, both, seconds


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv or sys.argv[1:]))
    tasks = []
    for m in args.mappings:
        tasks += mapping_tasks(m, args)[: args.limit]
    preimport()

    start = time.time()
    results = run_all(tasks, args.jobs)
    seconds = time.time() - start
    if args.update:
        results, command, seconds = merge_with_earlier(args.update, results, command, seconds, args)
    write_reports(results, args, command, seconds)
    ok = sum(r["status"] == "ok" for r in results)
    print(f"{ok}/{len(results)} ok; wrote {os.path.join(args.out, args.name)}.md/.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
