"""The connection ops at decode size: GPU time and launches of each no-grad call with few tokens.

    python benchmarks/decode_ops.py --out benchmarks/results/decode-ops-<gpu>.md [--sweep]

Each op is called as a converted model's decode step calls it (``torch.no_grad()``, the
functions of ``ops.library``; bf16 streams ``[M, n, C]``, n = 4): the pre side alone, with
the RMSNorm that follows it (``mhc_pre_normed``), the post of one connection with the pre
of the next (plain and normed), the post side alone, and the normed pre side in ``hc`` mode
(tanh coefficients, no Sinkhorn: what the Sinkhorn iterations cost). Per op and token
count:

* ``GPU us``: the op's launches captured in a CUDA graph and replayed
  (``triton.testing.do_bench_cudagraph`` median): the device time, as in a decode step
  under ``mode="reduce-overhead"``;
* ``eager call us``: the plain call (``triton.testing.do_bench`` median): host work and
  launches included;
* a table of each launch's own device time at the first token count (torch.profiler, mean
  of 20 calls).

``--sweep``: the decode tile settings of ``ops.library`` (the ``DECODE_*`` knobs, or those
named in ``--knobs``) tried one at a time at each of ``--sweep-tokens`` (default: the first
token count), each candidate's GPU time for the three normed-or-not pre ops, every other
knob at its committed value. The script uses only the public functions
of ``ops.library``, so it can time an older package from the same command (``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
from tabulate import tabulate

sys.path.insert(0, ".")
from benchmarks.common import report  # noqa: E402
from mhc_compile.ops import library  # noqa: E402
from mhc_compile.ops.settings import Tiles  # noqa: E402

N = 4
NORM_EPS = 1e-5
SWEEP = {  # knob -> candidates (the committed value is always measured too)
    "DECODE_COEF_TILES": [Tiles(16, 256, 4), Tiles(16, 256, 2), Tiles(16, 256, 8), Tiles(16, 512, 4),
                          Tiles(16, 128, 4), Tiles(8, 256, 4), Tiles(16, 256, 1)],
    "DECODE_ONE_CHUNK_ELEMENTS": [2048, 4096, 8192, 16384],
    "DECODE_AGGREGATE_CHANNELS": [256, 512, 1024, 4096],
    "DECODE_SPLIT_CHANNELS": [64, 128, 256, 512],
    "DECODE_PROJ_TILES": [Tiles(16, 128, 4), Tiles(16, 64, 4), Tiles(16, 32, 4), Tiles(16, 64, 8),
                          Tiles(16, 128, 2), Tiles(16, 64, 2), Tiles(16, 128, 1), Tiles(16, 256, 4),
                          Tiles(16, 128, 8)],
    "MAX_SPLITS_PER_LOAD": [8, 16, 32, 64],
}
SWEPT_OPS = ("pre", "pre + norm", "post + pre + norm")


def make_inputs(m: int, c: int) -> dict:
    """Random decode-step inputs: streams, a branch output, one connection's parameters."""
    g = torch.Generator(device="cuda").manual_seed(m * 7919 + c)
    x = torch.randn(m, N, c, device="cuda", generator=g).bfloat16()
    y = torch.randn(m, c, device="cuda", generator=g).bfloat16()
    phi = torch.randn(N * c, N * N + 2 * N, device="cuda", generator=g) / math.sqrt(N * c)
    bias = torch.randn(N * N + 2 * N, device="cuda", generator=g) * 0.5
    alpha = torch.rand(3, device="cuda", generator=g) + 0.3
    weight = (torch.randn(c, device="cuda", generator=g) * 0.3 + 1.0).bfloat16()
    _, h_post, h_res = library.mhc_pre(x, phi, bias, alpha)
    return {"x": x, "y": y, "phi": phi, "bias": bias, "alpha": alpha, "weight": weight,
            "h_post": h_post, "h_res": h_res}


def ops(i: dict) -> dict:
    """The no-grad calls a decode step makes, by name."""
    x, y, phi, bias, alpha, w, hp, hr = (i[k] for k in ("x", "y", "phi", "bias", "alpha", "weight", "h_post", "h_res"))
    return {
        "pre": lambda: library.mhc_pre(x, phi, bias, alpha),
        "pre + norm": lambda: library.mhc_pre_normed(x, phi, bias, alpha, w, NORM_EPS),
        "post + pre": lambda: library.mhc_post_pre(x, y, hp, hr, phi, bias, alpha),
        "post + pre + norm": lambda: library.mhc_post_pre_normed(x, y, hp, hr, phi, bias, alpha, w, NORM_EPS),
        "post": lambda: library.mhc_post(x, y, hp, hr),
        "pre + norm, hc mode": lambda: library.mhc_pre_normed(x, phi, bias, alpha, w, NORM_EPS, mode="hc"),
    }


def gpu_us(fn) -> float:
    """Median device microseconds of ``fn``'s launches replayed from a CUDA graph."""
    with torch.no_grad():
        return 1e3 * triton.testing.do_bench_cudagraph(fn, return_mode="median")


def op_rows(token_counts: list[int], c: int) -> list[dict]:
    rows = []
    for m in token_counts:
        for name, fn in ops(make_inputs(m, c)).items():
            with torch.no_grad():
                eager = 1e3 * triton.testing.do_bench(fn, return_mode="median")
            rows.append({"tokens": m, "C": c, "op": name, "GPU us": round(gpu_us(fn), 1),
                         "eager call us": round(eager, 1)})
            print(rows[-1], flush=True)
    return rows


def launch_rows(m: int, c: int, calls: int = 20) -> list[dict]:
    """Each launch's own device time per call of each op (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name, fn in ops(make_inputs(m, c)).items():
        with torch.no_grad():
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" and ev.count:
                us = getattr(ev, "self_device_time_total", None) or ev.self_cuda_time_total
                rows.append({"tokens": m, "op": name, "launch": ev.key[:40], "launches per call": ev.count / calls,
                             "us per call": round(us / calls, 1)})
    return rows


def sweep_rows(m: int, c: int, knobs: list[str] | None = None) -> list[dict]:
    """Each ``SWEEP`` knob's candidates in turn (the others committed): GPU us of ``SWEPT_OPS``."""
    rows = []
    inputs = make_inputs(m, c)
    for knob, candidates in SWEEP.items():
        if not hasattr(library, knob) or (knobs and knob not in knobs):
            continue
        committed = getattr(library, knob)
        for value in dict.fromkeys([committed, *candidates]):
            setattr(library, knob, value)
            row = {"tokens": m, "knob": knob, "value": f"{value}{' (committed)' if value == committed else ''}"}
            try:
                for name in SWEPT_OPS:
                    row[f"{name}, GPU us"] = round(gpu_us(ops(inputs)[name]), 1)
            except Exception as err:  # noqa: BLE001 - a candidate that does not compile is reported
                row["failed"] = f"{type(err).__name__}: {str(err)[:60]}"
            rows.append(row)
            print(row, flush=True)
        setattr(library, knob, committed)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--sweep", action="store_true", help="also try the DECODE_* knobs one at a time")
    parser.add_argument("--knobs", nargs="*", default=None, help="only these knobs in --sweep")
    parser.add_argument("--sweep-tokens", type=int, nargs="*", default=None, help="token counts of --sweep")
    parser.add_argument("--label", default="", help="a heading for this package (e.g. its commit)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_ops.py times CUDA kernels: run it on a GPU machine")
    settings = {k: str(getattr(library, k)) for k in SWEEP if hasattr(library, k)}
    sections = [f"## {args.label or 'this package'}", "",
                f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
                f"n = {N}, bf16 streams, C = {args.hidden}", "",
                "Settings: " + "; ".join(f"{k} = {v}" for k, v in settings.items()), "",
                tabulate(op_rows(args.tokens, args.hidden), headers="keys", tablefmt="github"), "",
                f"### Launches at {args.tokens[0]} token(s)", "",
                tabulate(launch_rows(args.tokens[0], args.hidden), headers="keys", tablefmt="github"), ""]
    for m in (args.sweep_tokens or args.tokens[:1]) if args.sweep else ():
        sections += [f"### Decode knobs at {m} token(s), one at a time", "",
                     tabulate(sweep_rows(m, args.hidden, args.knobs), headers="keys", tablefmt="github"), ""]
    report("\n".join(sections) + "\n", args.out, mode="a")


if __name__ == "__main__":
    main()
