"""Where a compiled training step's mHC time goes: the GPU time of each mHC kernel in one step.

    python benchmarks/step_kernels.py --hidden 4096 --layers 2 --out benchmarks/results/step-kernels-<gpu>.md

A Llama-style model converted with the defaults, ``block.compile()`` on every decoder layer,
forward + backward under bf16 autocast (no optimizer step), once per form of the fused post+pre
backward (``ops.library.POST_PRE_ONE_PASS`` / ``POST_PRE_DPHI_IN_PASS``). Those settings are read
when an op's body is traced, so each form is set before its model is built and compiled, the
compile caches are off and Dynamo is reset between forms. Per form: the step's do_bench median and,
from ``torch.profiler``, each mHC Triton kernel's calls and GPU milliseconds in one step.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
from tabulate import tabulate

sys.path.insert(0, ".")
import mhc_compile as mhc  # noqa: E402
from benchmarks.common import BACKWARD_FORMS, library_settings, llama_config, report  # noqa: E402
from benchmarks.train_step import no_compile_caches, release  # noqa: E402


def form_rows(args, form: str) -> tuple[float, list[dict]]:
    """The step's median ms and one row per mHC kernel, with ``form``'s settings compiled in."""
    from transformers import LlamaForCausalLM

    with library_settings(BACKWARD_FORMS[form]):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama_config(args.hidden, args.layers, args.vocab, args.seq))
        mhc.mhc_compile(model)
        for layer in model.model.layers:
            layer.compile()
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(step, warmup=1, rep=args.rep, return_mode="median")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        # the package's Triton kernels are named _<name>_kernel (Inductor's own: triton_...)
        if ev.device_type.name == "CUDA" and ev.key.startswith("_") and not ev.key.startswith("__"):
            us = getattr(ev, "device_time_total", None) or ev.cuda_time_total
            rows.append({"form": form, "kernel": ev.key[:40], "calls": ev.count, "GPU ms": round(us / 1e3, 3)})
    rows.sort(key=lambda r: -r["GPU ms"])
    return ms, rows  # the model goes with this frame: release() frees its memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rep", type=int, default=300, help="do_bench budget in ms")
    parser.add_argument("--forms", nargs="+", default=list(BACKWARD_FORMS), choices=list(BACKWARD_FORMS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    no_compile_caches()
    steps, kernels = [], []
    for form in args.forms:
        ms, rows = form_rows(args, form)
        release()
        steps.append({"form": form, "step ms (fwd+bwd)": round(ms, 1),
                      "mHC kernels' GPU ms": round(sum(r["GPU ms"] for r in rows), 3)})
        kernels += rows
        print(steps[-1], flush=True)
    report("\n".join([
        f"# mHC kernels inside a compiled training step on {torch.cuda.get_device_name()}", "",
        f"Command: `python benchmarks/step_kernels.py --hidden {args.hidden} --layers {args.layers} --batch {args.batch} "
        f"--seq {args.seq} --vocab {args.vocab} --rep {args.rep} --forms {' '.join(args.forms)}`",
        f"torch {torch.__version__}, triton {triton.__version__}; Llama-style, {args.batch * args.seq} tokens, bf16 "
        "autocast, forward + backward (no optimizer step); each form compiled afresh.", "",
        tabulate(steps, headers="keys", tablefmt="github"), "",
        tabulate(kernels, headers="keys", tablefmt="github"), "",
    ]), args.out)


if __name__ == "__main__":
    main()
