"""Command line: ``mhc-compile demo | inspect`` (also ``python -m mhc_compile``).

Exit codes: 0 success, 2 bad arguments (unknown model name, missing or unreadable
config, a ``module:factory`` that cannot be imported), 1 a conversion that failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Optional

from torch import nn

from . import demo

# Small default sizes for ``--hf NAME``: (config class, model class, config kwargs)
HF_PRESETS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=4, n_head=4, vocab_size=1000, bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)),
    "bert": ("BertConfig", "BertModel", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=1000)),
    "vit": ("ViTConfig", "ViTModel", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=128, image_size=32, patch_size=8)),
    "resnet": ("ResNetConfig", "ResNetModel", dict(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 2], layer_type="basic")),
}


class UsageError(Exception):
    """Bad command-line input: printed and exit code 2."""


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise UsageError("this needs transformers: pip install 'mhc-compile[hf]'") from err
    return transformers


def build_from_args(args: argparse.Namespace) -> nn.Module:
    """The model named by ``--hf``, ``--hf-config`` or ``MODULE:FACTORY``."""
    if args.hf:
        if args.hf not in HF_PRESETS:
            raise UsageError(f"unknown --hf model {args.hf!r}; choose one of {', '.join(HF_PRESETS)}")
        tf = _transformers()
        cfg_name, model_name, kwargs = HF_PRESETS[args.hf]
        return getattr(tf, model_name)(getattr(tf, cfg_name)(**kwargs))
    if args.hf_config:
        if not os.path.isfile(args.hf_config):
            raise UsageError(f"--hf-config {args.hf_config!r}: no such file")
        tf = _transformers()
        try:
            with open(args.hf_config) as f:
                config_dict = json.load(f)
            config = tf.AutoConfig.for_model(**config_dict)
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"--hf-config {args.hf_config!r} is not a Hugging Face config: {err}") from err
        return tf.AutoModel.from_config(config)
    if args.factory:
        return _load_factory(args.factory)()
    raise UsageError("name a model: --hf NAME, --hf-config PATH or MODULE:FACTORY")


def _load_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{spec!r} is not MODULE:FACTORY (for example mypkg.models:build)")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot load {spec!r}: {err}") from err


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import api

    model = build_from_args(args)
    original = sum(p.numel() for p in model.parameters())
    api.mhc_compile(model, n_streams=args.n, mode=args.mode)
    api.inspect(model)
    added = sum(p.numel() for p in api.mhc_parameters(model))
    print(f"\n{type(model).__name__}: {original:,} parameters; mHC adds {added:,} "
          f"({100 * added / max(original, 1):.2f}%) at n = {args.n}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhc-compile", description="mHC as a compiler pass")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train residual vs HC vs mHC on Python's standard library")
    demo.add_arguments(p_demo)
    p_inspect = sub.add_parser("inspect", help="convert a model and print what was rewritten")
    group = p_inspect.add_mutually_exclusive_group()
    group.add_argument("--hf", help=f"a small Hugging Face model: {', '.join(HF_PRESETS)}")
    group.add_argument("--hf-config", help="path to a Hugging Face config.json")
    p_inspect.add_argument("factory", nargs="?", help="MODULE:FACTORY returning an nn.Module")
    p_inspect.add_argument("--n", type=int, default=4, help="number of streams")
    p_inspect.add_argument("--mode", default="mhc", choices=["mhc", "hc", "residual"])
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo.run(args)
            return 0
        return cmd_inspect(args)
    except UsageError as err:
        print(f"mhc-compile: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as err:
        print(f"mhc-compile: conversion failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
