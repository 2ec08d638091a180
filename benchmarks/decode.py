"""Decode latency: batch-1 greedy generation with a KV cache, plain residual vs mHC (n = 4).

    python benchmarks/decode.py --hidden 4096 --layers 8 --out benchmarks/results/decode-<gpu>.md

A Llama-style model (bf16 weights, random init from a config) generates ``--new-tokens``
tokens after a ``--prompt``-token prompt, greedy, batch 1. Rows, for the residual model and
the converted one:

* ``eager``: ``model.generate`` as it is (dynamic KV cache);
* ``eager, Triton's launcher`` (mHC only): the same with the direct kernel launches of
  ``ops/triton/launch.py`` off, every launch through Triton's own launcher;
* ``compiled``: ``model.forward = torch.compile(model.forward, dynamic=True)``;
* ``cuda graphs``: a static KV cache (``cache_implementation="static"``), with which
  ``generate`` compiles the decode step itself (``mode="reduce-overhead"``: each decode step
  replays a CUDA graph); the cache keeps its size across calls, so nothing recompiles.

Time per new token = (time of a ``new_tokens`` generation - time of a 1-token generation)
/ (new_tokens - 1), so the prompt's prefill is left out; the median of ``--reps`` runs after
warm-up runs (compilation and graph capture happen there). Generated tokens of the
converted model are compared with the residual model's (``init="preserve"``: equal up to
bf16 rounding in the streams; a differing token is reported, not hidden).

``--host-split PATH``: where the host time of an eager decode step goes, without a profiler's
overhead (``perf_counter`` around the decoder layers, their attention modules, the connection ops
and each kernel launch), both models; written to PATH.

``--norm-pass-ab ROUNDS``: only the rows of ``--norm-pass-modes`` (eager, compiled; default
eager): per mode the residual model and then ROUNDS alternations of the mHC model with and
without the norm pass (``passes/norm.py``) in one process, so that the pass's effect is
measured on one host in one run.

``--profile PATH``: also profile a few decode steps of both models (the modes in
``--profile-modes``, default eager) and write to PATH
each op's host and device time per step (torch.profiler) and each Python function's own
time per step (cProfile: where host time goes outside the ops).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate

sys.path.insert(0, ".")
import mhc_compile as mhc  # noqa: E402
from benchmarks.common import llama_config, report  # noqa: E402

HOWS = ("eager", "eager, Triton's launcher", "compiled", "cuda graphs")
TRITON_LAUNCHER = HOWS[1]  # mHC only: every launch through Triton's own launcher (no direct launches)


def build(args: argparse.Namespace, converted: bool):
    from transformers import LlamaForCausalLM

    cfg = llama_config(args.hidden, args.layers, args.vocab, args.prompt + args.new_tokens + 8)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    if converted:
        mhc.mhc_compile(model, n_streams=4)
    return model


def _generate(model, ids: torch.Tensor, new_tokens: int, static: bool, **options):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (a static cache where ``static``)."""
    if static:
        options["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, **options)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, converted: bool, how: str) -> dict:
    from mhc_compile.ops.triton import launch

    direct = launch.DIRECT
    launch.DIRECT = direct and how != TRITON_LAUNCHER
    try:
        return _measure(args, converted, how)
    finally:
        launch.DIRECT = direct


def _measure(args: argparse.Namespace, converted: bool, how: str) -> dict:
    model = build(args, converted)
    static = how == "cuda graphs"
    if how == "compiled":
        model.forward = torch.compile(model.forward, dynamic=True)
    ids = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(args.device)
    tokens = None
    for _ in range(args.warmup):
        tokens = _generate(model, ids, args.new_tokens, static)
        _generate(model, ids, 1, static)
    longs, shorts = [], []
    for _ in range(args.reps):
        longs.append(_timed(lambda: _generate(model, ids, args.new_tokens, static), args.device))
        shorts.append(_timed(lambda: _generate(model, ids, 1, static), args.device))
    per_token = (statistics.median(longs) - statistics.median(shorts)) / (args.new_tokens - 1)
    # the logits of the prefill and the first decode steps, for the comparison
    logits = _generate(model, ids, CHECKED_STEPS, static, output_logits=True, return_dict_in_generate=True).logits
    if args.profile and how in args.profile_modes:
        profile_rows(model, ids, args, converted, how)
    del model
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return {"model": "mhc" if converted else "residual", "mode": how,
            "ms/token": round(1000 * per_token, 2), "tokens": tokens[0, args.prompt:].tolist(),
            "logits": torch.stack(logits).float().cpu()}


PROFILE_STEPS = 8
CHECKED_STEPS = 4  # prefill + 3 decode steps: their logits are compared between rows


def profile_rows(model, ids: torch.Tensor, args: argparse.Namespace, converted: bool, how: str) -> None:
    """Append the ops of ``PROFILE_STEPS`` decode steps of mode ``how`` (host and device time
    per step) to ``args.profile``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    static = how == "cuda graphs"
    with profile(activities=activities) as prof:
        _generate(model, ids, PROFILE_STEPS + 1, static)
    rows = []
    for e in prof.key_averages():
        rows.append({"op": e.key[:70], "calls": e.count, "host us/step (self)": e.self_cpu_time_total / PROFILE_STEPS,
                     "device us/step (self)": getattr(e, "self_device_time_total", 0) / PROFILE_STEPS})
    rows.sort(key=lambda r: -r["host us/step (self)"])
    total_host = sum(r["host us/step (self)"] for r in rows)
    total_dev = sum(r["device us/step (self)"] for r in rows)
    name = "mhc" if converted else "residual"
    python_rows, python_total = python_profile(model, ids, args.device, static)
    text = "\n".join([
        f"## {name}, {how}: {PROFILE_STEPS} decode steps + prefill, per step (self time)",
        "", f"host total {total_host:.0f} us/step, device total {total_dev:.0f} us/step", "",
        tabulate([{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:40]],
                 headers="keys", tablefmt="github"), "",
        f"### {name}, {how}: Python functions by own time (cProfile, {python_total:.0f} us/step in all)", "",
        tabulate(python_rows, headers="keys", tablefmt="github"), "", ""])
    with open(args.profile, "a") as f:
        f.write(text)


def python_profile(model, ids: torch.Tensor, device: str, static: bool = False,
                   top: int = 40) -> tuple[list[dict], float]:
    """The ``top`` Python functions of ``PROFILE_STEPS`` decode steps by own time
    (us per step; cProfile's overhead inflates every row alike), and the total."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    _sync(device)
    profiler.enable()
    _generate(model, ids, PROFILE_STEPS + 1, static)
    _sync(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = []
    for (path, line, function), (_, calls, own, cumulative, _) in stats.items():
        rows.append({"function": f"{_short_path(path)}:{line}({function})"[:90], "calls/step": calls / PROFILE_STEPS,
                     "own us/step": round(1e6 * own / PROFILE_STEPS, 1),
                     "cumulative us/step": round(1e6 * cumulative / PROFILE_STEPS, 1)})
    rows.sort(key=lambda r: -r["own us/step"])
    return rows[:top], sum(r["own us/step"] for r in rows)


HOST_SPLIT_STEPS = 32


def host_split(args: argparse.Namespace) -> str:
    """Host time per eager decode step, split by where it is spent (a markdown table)."""
    from mhc_compile.ops import library

    rows = []
    for converted in (False, True):
        model = build(args, converted)
        ids = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(args.device)
        spent = {"layers": 0.0, "attention": 0.0, "connection ops": 0.0, "launches": 0.0}
        counts = dict.fromkeys(spent, 0)

        def timed(kind, fn):
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[kind] += time.perf_counter() - start
                    counts[kind] += 1
            return wrapper

        def hooks(module, kind):
            module.register_forward_pre_hook(lambda m, a, k: setattr(m, "_host_t0", time.perf_counter()),
                                             with_kwargs=True)
            module.register_forward_hook(
                lambda m, a, k, o: spent.__setitem__(kind, spent[kind] + time.perf_counter() - m._host_t0),
                with_kwargs=True)

        for layer in model.model.layers:
            hooks(layer, "layers")
            hooks(layer.self_attn, "attention")
        saved = {name: getattr(library, name) for name in ("mhc_pre", "mhc_post", "mhc_post_pre", "mhc_pre_normed",
                                                           "mhc_post_pre_normed", "launch")}
        for name, fn in saved.items():
            setattr(library, name, timed("launches" if name == "launch" else "connection ops", fn))
        try:
            _generate(model, ids, HOST_SPLIT_STEPS + 1, False)  # warm-up: kernels compiled, graphs built
            for kind in spent:
                spent[kind], counts[kind] = 0.0, 0
            total = _timed(lambda: _generate(model, ids, HOST_SPLIT_STEPS + 1, False), args.device)
            steps = HOST_SPLIT_STEPS + 1  # the prefill's share is spread over the steps
        finally:
            for name, fn in saved.items():
                setattr(library, name, fn)
        us = {k: 1e6 * v / steps for k, v in spent.items()}
        rows.append({"model": "mhc" if converted else "residual", "step (wall)": round(1e6 * total / steps),
                     "decoder layers": round(us["layers"]), "in attention": round(us["attention"]),
                     "in connection ops": round(us["connection ops"]),
                     "in kernel launches": round(us["launches"]),
                     "ops/step": counts["connection ops"] / steps, "launches/step": counts["launches"] / steps})
        del model
        gc.collect()
    text = "\n".join([
        "## Host time of an eager decode step, by where it is spent (us per step)", "",
        f"{HOST_SPLIT_STEPS} decode steps and the prefill, `perf_counter` around each decoder layer, its attention "
        "module, each connection op (`ops.library`'s `mhc_pre`, `mhc_post`, `mhc_post_pre`, launches included) and "
        "each kernel launch (`launch`, inside the ops).", "",
        tabulate(rows, headers="keys", tablefmt="github"), "", ""])
    return text


def _short_path(path: str) -> str:
    """A source path without the machine's prefix (from the package's or the repo's root)."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    return path[len(root):] if path.startswith(root) else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=HOWS, default=list(HOWS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default=None, help="also profile decode steps into this file")
    parser.add_argument("--profile-modes", nargs="*", choices=HOWS, default=["eager"],
                        help="the modes --profile profiles (default: eager)")
    parser.add_argument("--host-split", default=None,
                        help="write where an eager decode step's host time goes to this file, then run the rows")
    parser.add_argument("--norm-pass-ab", type=int, default=0, metavar="ROUNDS",
                        help="only the rows of --norm-pass-modes: per mode the residual model, then ROUNDS "
                             "alternations of mHC with and without the norm pass (passes/norm.py), in one process")
    parser.add_argument("--norm-pass-modes", nargs="*", choices=("eager", "compiled"), default=["eager"],
                        help="the modes --norm-pass-ab measures (default: eager)")
    args = parser.parse_args()
    if args.norm_pass_ab:
        rows = []
        for how in args.norm_pass_modes:
            runs = [lambda: measure(args, False, how)]
            runs += [lambda on=on: _with_norm_pass(args, on, how) for _ in range(args.norm_pass_ab) for on in (True, False)]
            for run in runs:
                rows.append(run())
                print({k: v for k, v in rows[-1].items() if k not in ("tokens", "logits")}, flush=True)
                if args.out:
                    write_table(args, rows, quiet=True)
        write_table(args, rows)
        return
    if args.host_split:
        text = host_split(args)
        print(text, flush=True)
        with open(args.host_split, "w") as f:
            f.write(text)
    rows = []
    for how in args.only:
        for converted in ((True,) if how == TRITON_LAUNCHER else (False, True)):
            try:
                rows.append(measure(args, converted, how))
            except Exception as err:  # noqa: BLE001 - a failing row is a result
                rows.append({"model": "mhc" if converted else "residual", "mode": how,
                             "ms/token": f"failed: {type(err).__name__}: {str(err)[:160]}"})
            print({k: v for k, v in rows[-1].items() if k != "tokens"}, flush=True)
            if args.out:  # the rows so far, in case a later row runs past a time limit
                write_table(args, rows, quiet=True)
    write_table(args, rows)


def _with_norm_pass(args: argparse.Namespace, with_pass: bool, how: str = "eager") -> dict:
    """An mHC row of mode ``how`` with the norm pass on, or off (its norms stay module calls)."""
    import mhc_compile.blocks as blocks

    saved = blocks.fuse_pre_norms
    if not with_pass:
        blocks.fuse_pre_norms = lambda gm: 0
    try:
        row = measure(args, True, how)
    finally:
        blocks.fuse_pre_norms = saved
    row["model"] = "mhc" if with_pass else "mhc, norms as modules"
    return row


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of two logit stacks (their common steps)."""
    steps = min(len(a), len(b))
    return ((a[:steps] - b[:steps]).norm() / b[:steps].norm()).item()


def _equal_tokens(row: dict, ref: dict) -> str:
    """How many of ``ref``'s generated tokens ``row`` generated too, position by position."""
    return f"{sum(a == b for a, b in zip(row['tokens'], ref['tokens']))}/{len(ref['tokens'])}"


def write_table(args: argparse.Namespace, rows: list[dict], quiet: bool = False) -> None:
    """The markdown table of ``rows`` (each mode against the residual model's same mode)."""
    import triton

    shown = [dict(r) for r in rows]
    base = {r["mode"]: r for r in shown if r["model"] == "residual" and isinstance(r["ms/token"], float)}
    for r in shown:
        ref = base.get("eager" if r["mode"] == TRITON_LAUNCHER else r["mode"])
        if ref and isinstance(r["ms/token"], float):
            r["vs residual, same mode"] = f"{r['ms/token'] / ref['ms/token']:.2f}x"
            r["tokens equal to residual"] = "" if r is ref else _equal_tokens(r, ref)
            if r is not ref:
                r[f"logits vs residual, first {CHECKED_STEPS} steps"] = f"{_rel(r['logits'], ref['logits']):.1e}"
        eager = next((e for e in shown if e["model"] == r["model"] and e["mode"] == "eager" and "logits" in e), None)
        if eager is not None and eager is not r and "logits" in r:
            r["logits vs own eager"] = f"{_rel(r['logits'], eager['logits']):.1e}"
            r["tokens equal to own eager"] = _equal_tokens(r, eager)
    for r in shown:
        r.pop("tokens", None)
        r.pop("logits", None)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    text = "\n".join([
        f"# Decode latency on {device}",
        "",
        f"Command: `python benchmarks/decode.py --hidden {args.hidden} --layers {args.layers} --vocab {args.vocab} "
        f"--prompt {args.prompt} --new-tokens {args.new_tokens} --warmup {args.warmup} --reps {args.reps}`",
        f"torch {torch.__version__}, triton {triton.__version__}; Llama-style, bf16 weights, batch 1, greedy, "
        f"{args.prompt}-token prompt, {args.new_tokens} new tokens; time per new token (prefill excluded), "
        f"median of {args.reps}.",
        "",
        tabulate(shown, headers="keys", tablefmt="github"),
        "",
    ])
    if quiet:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        report(text, args.out)


if __name__ == "__main__":
    main()
