"""Command line: ``mhc-compile demo | inspect | coverage | study`` (also ``python -m mhc_compile``).

    mhc-compile inspect --hf llama
    mhc-compile inspect --hf-config config.json
    mhc-compile inspect mypkg.models:build --input-shape 2,3,224,224
    mhc-compile inspect mypkg.models:gpt --input-shape 2,64 --input-dtype long --input-high 50257
    mhc-compile coverage --mappings causal --only llama gpt2 --out /tmp/cov
    mhc-compile study --steps 20 --depth 4 --width 64

Exit codes: 0 success; 2 any expected failure (bad arguments, a model that cannot be
built, a conversion refused with an :class:`~mhc_compile.errors.MHCError`), reported as
one line on stderr (``--verbose`` adds the traceback and what the conversion printed).
Anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import sys
import traceback
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import demo
from .errors import MHCError

INPUT_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.long, "long": torch.long, "int32": torch.int32, "int": torch.int32,
}

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
        return _build(f"--hf {args.hf}", lambda: getattr(tf, model_name)(getattr(tf, cfg_name)(**kwargs)))
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
        return _build(f"--hf-config {args.hf_config}", lambda: tf.AutoModel.from_config(config))
    if args.factory:
        return _build(args.factory, _load_factory(args.factory))
    raise UsageError("name a model: --hf NAME, --hf-config PATH or MODULE:FACTORY")


def _build(name: str, factory: Callable[[], Any]) -> nn.Module:
    """Call the user's factory; its failure (or a non-module result) is a usage error."""
    try:
        model = factory()
    except Exception as err:  # noqa: BLE001 - user code: reported in one line, traceback with --verbose
        raise UsageError(f"building the model {name} failed: {type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise UsageError(f"{name} returned {type(model).__name__}, not an nn.Module")
    return model


def example_inputs_from_args(args: argparse.Namespace) -> Optional[torch.Tensor]:
    """The tensor ``--input-shape`` / ``--input-dtype`` / ``--input-high`` describe, or None.

    Float dtypes draw ``randn``; integer dtypes draw ``randint(0, --input-high)`` (token ids).
    """
    if args.input_shape is None:
        if args.input_dtype is not None or args.input_high is not None:
            raise UsageError("--input-dtype and --input-high describe --input-shape; give --input-shape too")
        return None
    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {args.input_shape!r} is not comma-separated integers like 2,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {args.input_shape!r}: every size must be a positive integer")
    dtype_name = args.input_dtype or "float32"
    if dtype_name not in INPUT_DTYPES:
        raise UsageError(f"unknown --input-dtype {dtype_name!r}; choose one of {', '.join(INPUT_DTYPES)}")
    dtype = INPUT_DTYPES[dtype_name]
    if dtype.is_floating_point:
        if args.input_high is not None:
            raise UsageError("--input-high bounds integer inputs; add --input-dtype long (token ids)")
        return torch.randn(shape).to(dtype)
    if args.input_high is None or args.input_high < 1:
        raise UsageError(f"--input-dtype {dtype_name} draws integers in [0, N): give --input-high N (e.g. the vocabulary size)")
    return torch.randint(0, args.input_high, shape, dtype=dtype)


def _load_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{spec!r} is not MODULE:FACTORY (for example mypkg.models:build)")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot load {spec!r}: {err}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import api

    example = example_inputs_from_args(args)
    model = build_from_args(args)
    original = sum(p.numel() for p in model.parameters())
    # torch's tracing helpers print tracebacks of errors they re-raise; keep stderr to one line
    captured = io.StringIO()
    with contextlib.redirect_stderr(sys.stderr if args.verbose else captured):
        api.mhc_compile(model, n_streams=args.n, mode=args.mode, example_inputs=example)
    sys.stderr.write(captured.getvalue())  # succeeded: pass on its warnings
    api.inspect(model)
    added = sum(p.numel() for p in api.mhc_parameters(model))
    print(f"\n{type(model).__name__}: {original:,} parameters; mHC adds {added:,} "
          f"({100 * added / max(original, 1):.2f}%) at n = {args.n}")
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    """Run the repository's coverage sweep (``benchmarks/coverage.py``) with ``args.rest``."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "coverage.py")
    if not os.path.exists(script):
        raise UsageError("the coverage sweep ships with the source repository; run "
                         "`mhc-compile coverage` from an editable install of a checkout")
    spec = importlib.util.spec_from_file_location("mhc_coverage_sweep", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return int(module.main(rest) or 0)


def cmd_study(args: argparse.Namespace) -> int:
    """Run the residual vs HC vs mHC study (:mod:`mhc_compile.study`) with ``args.rest``."""
    from . import study

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return study.main(rest, prog="mhc-compile study")


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
    p_inspect.add_argument("--input-shape", help="example input for MODULE:FACTORY models, e.g. 2,3,224,224")
    p_inspect.add_argument("--input-dtype", help=f"dtype of the example input: {', '.join(INPUT_DTYPES)} (default float32)")
    p_inspect.add_argument("--input-high", type=int, help="integer inputs are drawn from [0, N) (token ids: the vocabulary size)")
    p_inspect.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    p_cov = sub.add_parser("coverage", help="sweep transformers' architectures (benchmarks/coverage.py; "
                                            "its options follow, e.g. --mappings causal --only llama)")
    p_cov.add_argument("rest", nargs=argparse.REMAINDER, help="options of benchmarks/coverage.py")
    p_study = sub.add_parser("study", help="train residual vs HC vs mHC at depth and several learning rates "
                                           "(benchmarks/study.py; its options follow, e.g. --steps 20 --depth 4)")
    p_study.add_argument("rest", nargs=argparse.REMAINDER, help="options of the study (mhc-compile study -- --help)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["coverage"], ["study"]) and not {"-h", "--help"} & set(argv[1:2]):
        # the sweep's or the study's own options follow; argparse's REMAINDER would not take leading "--x"
        argv = [argv[0], "--", *argv[1:]]
    args = make_parser().parse_args(argv)
    try:
        if args.command == "demo":
            demo.run(args)
            return 0
        if args.command == "coverage":
            return cmd_coverage(args)
        if args.command == "study":
            return cmd_study(args)
        return cmd_inspect(args)
    except UsageError as err:
        return _fail(args, "error", err)
    except MHCError as err:
        return _fail(args, "conversion failed", err)


def _fail(args: argparse.Namespace, what: str, err: BaseException) -> int:
    """One line on stderr (the traceback first with ``--verbose``); exit code 2."""
    if getattr(args, "verbose", False):
        traceback.print_exception(err)
    print(f"mhc-compile: {what}: {_first_line(err)}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
