"""End-to-end training step: a Llama-style model, plain residual vs mHC (n = 4).

    python benchmarks/train_step.py --hidden 4096 --layers 4 --out benchmarks/results/train-step-<gpu>.md

Forward + backward + AdamW step under bf16 autocast, ``triton.testing.do_bench`` median
and peak memory, for: the plain residual model (eager, compiled), mHC with the reference
ops (eager, compiled) and mHC with the fused kernels, compiled: the defaults (under autocast
the streams are bf16, post+pre fused), post and pre as separate kernels, float32 streams
(``stream_dtype=torch.float32``), ``recompute="mhc"``, ``deterministic=True`` and
``recompute_streams=False`` (each layer's inner stream state stored, not recomputed), and
the fused post+pre backward in each of its forms (three passes; one pass with ``dphi``
accumulated in the pass or by matmul after it: ``ops.library.POST_PRE_ONE_PASS`` and
``POST_PRE_DPHI_IN_PASS`` set while that variant's steps run).
"Compiled" is regional: ``block.compile()`` on every decoder layer (identical layers
share one graph).

``--alternate ROUNDS`` builds the chosen variants at once and times them in turn, ROUNDS
rounds (a 1 ms change in a ~190 ms step is below the spread between separate runs):

    python benchmarks/train_step.py --hidden 4096 --layers 4 --rep 200 --only 1 4 9 --alternate 4
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
import triton
from tabulate import tabulate

sys.path.insert(0, ".")
import mhc_compile as mhc  # noqa: E402
from benchmarks.common import BACKWARD_FORMS, library_settings, llama_config, report  # noqa: E402

KERNEL_SETTINGS = "kernel settings"  # an options key: ops.library constants set around each step
VARIANTS = [  # (name, eager or compiled, mhc_compile options; None: not converted)
    ("residual", "eager", None),
    ("residual", "compiled", None),
    ("mhc reference ops", "eager", {"backend": "torch"}),
    ("mhc reference ops", "compiled", {"backend": "torch"}),
    ("mhc defaults (bf16 streams, post+pre fused)", "compiled", {}),
    ("mhc, post/pre separate", "compiled", {"fuse_adjacent": False}),
    ("mhc, float32 streams", "compiled", {"stream_dtype": torch.float32}),
    ("mhc, recompute", "compiled", {"recompute": "mhc"}),
    ("mhc, deterministic", "compiled", {"deterministic": True}),
    ("mhc, inner streams stored", "compiled", {"recompute_streams": False}),
    # the defaults with one ``mhc_compile.ops.library`` setting changed while its steps run
    ("mhc, post+pre backward in three passes", "compiled", {KERNEL_SETTINGS: BACKWARD_FORMS["three-pass"]}),
    ("mhc, post+pre backward in one pass, dphi in the pass", "compiled",
     {KERNEL_SETTINGS: BACKWARD_FORMS["one-pass-dphi"]}),
    ("mhc, post+pre backward in one pass, dphi by matmul", "compiled",
     {KERNEL_SETTINGS: BACKWARD_FORMS["one-pass-matmul"]}),
]


def build(args, options):
    from transformers import LlamaForCausalLM

    options = None if options is None else {k: v for k, v in options.items() if k != KERNEL_SETTINGS}
    cfg = llama_config(args.hidden, args.layers, args.vocab, args.seq)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    if options is not None:
        mhc.mhc_compile(model, n_streams=4, **options)
    return model


def prepare(args, how, options):
    """The model, built (and compiled per layer where ``how`` says so), and its training step
    (forward + backward + fused AdamW under bf16 autocast), warmed up by three steps."""
    model = build(args, options)
    if how == "compiled":
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")

    settings = (options or {}).get(KERNEL_SETTINGS, {})

    def step():
        with library_settings(settings):  # eager ops read them at each call, compiled ones when compiled
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return model, opt, step


def step_peak_gib(step, resident: int) -> float:
    """Peak memory of one ``step``, in GiB, counting ``resident`` bytes as the model's own
    memory between steps (the rest allocated at the time belongs to other models)."""
    torch.cuda.synchronize()
    others = torch.cuda.memory_allocated() - resident
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - others) / 2**30


def release() -> None:
    """Free what the last variant left (the caller drops its references first)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def measure(args, name, how, options):
    before = torch.cuda.memory_allocated()
    model, opt, step = prepare(args, how, options)
    peak = step_peak_gib(step, torch.cuda.memory_allocated() - before)
    ms = triton.testing.do_bench(step, warmup=1, rep=args.rep, return_mode="median")
    del model, opt, step
    release()
    return {"model": name, "mode": how, "step ms": round(ms, 1), "peak GiB": round(peak, 2)}


def no_compile_caches() -> None:
    """Turn off the compile caches that key on the graph before the custom ops' bodies are
    traced (AOTAutograd's, Inductor's FX graph cache): ``ops.library`` settings are read when
    an op's body is traced, so with the caches a variant that differs only in them could get
    the compiled kernels of another."""
    torch._functorch.config.enable_autograd_cache = False
    torch._inductor.config.fx_graph_cache = False


def chosen_variants(args) -> list:
    """``(index, (name, mode, options))`` of the VARIANTS that ``--only`` picks (all without it)."""
    return [(i, v) for i, v in enumerate(VARIANTS) if args.only is None or str(i) in args.only]


def overhead(value: float, reference: float) -> str:
    """``value`` over ``reference`` as a signed percentage, e.g. ``+9.5%``."""
    return f"{100 * (value / reference - 1):+.1f}%"


def alternate_section(args, hidden: int) -> str:
    """Every chosen variant built at once and timed in turn, ``--alternate`` rounds: a slow
    spell of the machine falls on all of them. Per round the do_bench median of each; the
    overhead of each mHC variant over the compiled residual model per round and over the
    rounds' medians."""
    width_args = argparse.Namespace(**{**vars(args), "hidden": hidden})
    chosen = chosen_variants(args)
    if not chosen:
        raise SystemExit(f"--only {' '.join(args.only)}: no such variant (0-{len(VARIANTS) - 1})")
    compiled_mhc = [options for _, (_, how, options) in chosen if options is not None and how == "compiled"]
    if len(compiled_mhc) > 1 and any(KERNEL_SETTINGS in options for options in compiled_mhc):
        raise SystemExit(
            "--alternate: variants that differ only in ops.library settings cannot be built at once: their compiled "
            "layers pass each other's guards (the settings are read inside the ops, where Dynamo sets no guard), so "
            "all would run the first one's kernels; time them without --alternate (each variant compiled afresh)")
    # the variants' layers share their forward's code objects: room for all of their graphs
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    limit_before = getattr(torch._dynamo.config, limit)
    setattr(torch._dynamo.config, limit, max(limit_before, 16 * len(chosen)))
    built, peaks = [], {}
    for i, (name, how, options) in chosen:
        before = torch.cuda.memory_allocated()
        model, opt, step = prepare(width_args, how, options)
        peaks[i] = step_peak_gib(step, torch.cuda.memory_allocated() - before)
        built.append((i, f"{name} ({how})", step))
        print(f"built {name} ({how}): peak {peaks[i]:.2f} GiB", flush=True)
    times = {i: [] for i, _, _ in built}
    for r in range(args.alternate):
        for i, label, step in built:
            times[i].append(triton.testing.do_bench(step, warmup=1, rep=args.rep, return_mode="median"))
        print(f"round {r + 1}: " + ", ".join(f"{label} {times[i][-1]:.1f} ms" for i, label, _ in built), flush=True)
    ref = next((i for i, (name, how, _) in chosen if name == "residual" and how == "compiled"), None)
    rows = []
    for i, label, _ in built:
        row = {"model": label}
        for r, ms in enumerate(times[i]):
            compared = ref is not None and i != ref
            row[f"round {r + 1} ms"] = f"{ms:.1f} ({overhead(ms, times[ref][r])})" if compared else round(ms, 1)
        median = statistics.median(times[i])
        row["median ms"] = round(median, 1)
        row["peak GiB"] = round(peaks[i], 2)
        if ref is not None:
            row["vs compiled residual"] = overhead(median, statistics.median(times[ref]))
            row["memory vs compiled residual"] = overhead(peaks[i], peaks[ref])
        rows.append(row)
    del built, model, opt, step
    release()
    setattr(torch._dynamo.config, limit, limit_before)
    return "\n".join([
        f"# Training step on {torch.cuda.get_device_name()}, hidden {hidden}, variants alternating",
        "",
        f"Command: `python benchmarks/train_step.py {command_args(args)}`",
        f"torch {torch.__version__}, triton {triton.__version__}; Llama-style, hidden {hidden}, "
        f"{args.layers} layers, {args.batch * args.seq} tokens per step, bf16 autocast, fused AdamW; all variants "
        f"built at once, then {args.alternate} rounds timing each in turn (do_bench median of {args.rep} ms each); "
        "per round, the overhead over the compiled residual model in that round; peak memory of one step "
        "(the model's own memory between steps counted, the other models' not).",
        "",
        tabulate(rows, headers="keys", tablefmt="github"),
        "",
    ])


def command_args(args) -> str:
    return (f"--hidden {' '.join(map(str, args.hidden))} --layers {args.layers} --batch {args.batch} "
            f"--seq {args.seq} --vocab {args.vocab} --rep {args.rep}"
            f"{' --only ' + ' '.join(args.only) if args.only else ''}"
            f"{f' --alternate {args.alternate}' if args.alternate else ''}")


def loss_check(args) -> str:
    """Default (bf16) streams vs float32 streams over ``--loss-check`` steps of a small model
    on real text; a float32-stream run with another data seed gives the noise level."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mhc_compile.demo import stdlib_corpus

    data = stdlib_corpus(4_000_000).cuda()
    width, seq, batch = 512, 256, 16

    def run(stream_dtype, data_seed):
        cfg = LlamaConfig(hidden_size=width, intermediate_size=1408, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, vocab_size=256,
                          max_position_embeddings=seq, attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
        mhc.mhc_compile(model, n_streams=4, init="paper", stream_dtype=stream_dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        gen = torch.Generator(device="cuda").manual_seed(data_seed)
        losses = []
        for _ in range(args.loss_check):
            starts = torch.randint(0, data.numel() - seq - 1, (batch,), device="cuda", generator=gen)
            ids = data[starts[:, None] + torch.arange(seq, device="cuda")]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    runs = {"bf16 streams (default)": run(None, 1), "float32 streams": run(torch.float32, 1),
            "float32 streams, other data order": run(torch.float32, 2)}
    tail = max(1, args.loss_check // 5)
    rows = [{"run": k, "mean loss, last %d steps" % tail: round(sum(v[-tail:]) / tail, 4),
             "final loss": round(v[-1], 4)} for k, v in runs.items()]
    fp32, bf16, other = runs["float32 streams"], runs["bf16 streams (default)"], runs["float32 streams, other data order"]
    gap = sum(abs(a - b) for a, b in zip(bf16[-tail:], fp32[-tail:])) / tail
    noise = sum(abs(a - b) for a, b in zip(other[-tail:], fp32[-tail:])) / tail
    return "\n".join([
        f"## Loss check: bf16 vs float32 streams ({args.loss_check} steps)",
        "",
        f"Command: `python benchmarks/train_step.py --loss-check {args.loss_check}`; Llama-style, width {width}, "
        f"8 layers, byte-level on Python's standard library sources, {batch}x{seq} tokens per step, AdamW 1e-3, "
        "bf16 autocast, init=\"paper\", eager with the kernels.",
        "",
        tabulate(rows, headers="keys", tablefmt="github"),
        "",
        f"Mean |loss difference| over the last {tail} steps: bf16 vs float32 streams (same data) {gap:.4f}; "
        f"float32 streams, two data orders (the noise) {noise:.4f}.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096], help="one table per width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rep", type=int, default=2000, help="do_bench budget in ms")
    parser.add_argument("--only", nargs="*", default=None, help="indices of VARIANTS to run")
    parser.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                        help="build the chosen variants at once and time them in turn, ROUNDS rounds")
    parser.add_argument("--out", default=None)
    parser.add_argument("--loss-check", type=int, default=0, metavar="STEPS",
                        help="instead of timing: train a small model STEPS steps with bf16 and float32 streams")
    args = parser.parse_args()
    if args.alternate < 0:
        parser.error("--alternate takes a number of rounds >= 1 (0: the variants one after the other)")
    if args.loss_check:
        text = loss_check(args)
        report(text, args.out, mode="a")
        return
    if any(KERNEL_SETTINGS in (options or {}) for _, (_, _, options) in chosen_variants(args)):
        no_compile_caches()
    sections = []
    for hidden in args.hidden:  # one table per width, written as each finishes
        sections.append(alternate_section(args, hidden) if args.alternate else width_section(args, hidden))
        report("\n".join(sections), args.out)


def width_section(args, hidden: int) -> str:
    """The table of every chosen variant at ``hidden`` (markdown), with the default path's
    overhead over the compiled residual model."""
    width_args = argparse.Namespace(**{**vars(args), "hidden": hidden})  # measure() builds at this width
    rows = []
    for _, (name, how, options) in chosen_variants(args):
        try:
            rows.append(measure(width_args, name, how, options))
        except Exception as err:  # noqa: BLE001 - report and go on
            rows.append({"model": name, "mode": how, "step ms": f"failed: {type(err).__name__}: {str(err)[:100]}"})
            gc.collect()
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    ref = next((r for r in rows if r["model"] == "residual" and r["mode"] == "compiled"
                and isinstance(r.get("step ms"), float)), None)
    for r in rows:
        if ref and isinstance(r.get("step ms"), float):
            r["vs compiled residual"] = overhead(r["step ms"], ref["step ms"])
            r["memory vs compiled residual"] = overhead(r["peak GiB"], ref["peak GiB"])
    default = next((r for r in rows if r["model"] == VARIANTS[4][0] and "vs compiled residual" in r), None)
    summary = (f"Default path at hidden {hidden}: {default['vs compiled residual']} step time, "
               f"{default['memory vs compiled residual']} peak memory over the compiled residual model."
               if default else "")
    return "\n".join([
        f"# Training step on {torch.cuda.get_device_name()}, hidden {hidden}",
        "",
        f"Command: `python benchmarks/train_step.py {command_args(args)}`",
        f"torch {torch.__version__}, triton {triton.__version__}; Llama-style, hidden {hidden}, "
        f"{args.layers} layers, {args.batch * args.seq} tokens per step, bf16 autocast, fused AdamW; "
        "forward + backward + optimizer step, do_bench median; peak memory of one step.",
        "",
        tabulate(rows, headers="keys", tablefmt="github"),
        "",
        summary,
        "",
    ])


if __name__ == "__main__":
    main()
