"""Host time of the connection ops at batch-1 decode size, and what the Python garbage collector adds.

    python benchmarks/host_costs.py --out benchmarks/results/host-costs-<gpu>.md

Part 1, microseconds of host time per call (best of 3 rounds of ``--calls`` calls, no grad,
``[1, n, C]`` bf16 streams, the GPU kept busy so that no call waits for it):

* a reference point: ``torch.add_`` on a small tensor, and a 3-argument Triton kernel
  launched by ``kernel[grid](...)``;
* each fused op (``ops.library.mhc_pre``, ``mhc_post_pre``, ``mhc_post``) as the decode
  path calls it, then the same with ``ops.library.launch`` replaced by a no-op (its Python
  without the launches);
* the parts of one direct launch of the pre side (see ``ops/triton/launch.py``): the call
  form ``_form``, the compiled kernel's own launcher ``CompiledKernel.run``, and
  ``launch_metadata``.

Part 2 (``--decode``): ms per generated token of the eager rows of ``benchmarks/decode.py``
(both models), once as is and once with ``gc.disable()`` around the measurement.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from tabulate import tabulate

sys.path.insert(0, ".")
from benchmarks.common import report  # noqa: E402
from mhc_compile.ops import library  # noqa: E402
from mhc_compile.ops.triton import launch as launcher  # noqa: E402


def host_us(fn, calls: int) -> float:
    """Best-of-3 host microseconds per call of ``fn`` (the GPU is synchronised between rounds only)."""
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return round(best, 1)


def op_rows(n: int, c: int, calls: int) -> list[dict]:
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(p, count, B: tl.constexpr):
        o = tl.arange(0, B)
        tl.store(p + o, tl.load(p + o, mask=o < count) + 1, mask=o < count)

    small = torch.zeros(16, device="cuda")
    rows = [{"what": "torch add_ (reference point)", "us": host_us(lambda: small.add_(1.0), calls)},
            {"what": "3-argument Triton kernel, kernel[grid](...)", "us": host_us(lambda: add_one[(1,)](small, 16, B=16), calls)}]
    x = torch.randn(1, n, c, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(1, c, device="cuda", dtype=torch.bfloat16)
    phi = torch.randn(n * c, n * n + 2 * n, device="cuda") * 0.01
    bias = torch.randn(n * n + 2 * n, device="cuda") * 0.1
    alpha = torch.full((3,), 0.1, device="cuda")
    h_post, h_res = torch.rand(1, n, device="cuda"), torch.rand(1, n, n, device="cuda")
    ops = {"mhc_pre": lambda: library.mhc_pre(x, phi, bias, alpha),
           "mhc_post_pre": lambda: library.mhc_post_pre(x, y, h_post, h_res, phi, bias, alpha),
           "mhc_post": lambda: library.mhc_post(x, y, h_post, h_res)}
    real = library.launch
    recorded = []
    with torch.no_grad():
        for name, fn in ops.items():
            rows.append({"what": f"{name}, launches included", "us": host_us(fn, calls)})
        library.launch = lambda *args, **kwargs: None
        try:
            for name, fn in ops.items():
                rows.append({"what": f"{name}, launches replaced by a no-op", "us": host_us(fn, calls)})
            library.launch = lambda *args, **kwargs: (recorded.append((args, kwargs)), real(*args, **kwargs))
            ops["mhc_pre"]()
        finally:
            library.launch = real
    device = torch.cuda.current_device()
    stream = launcher.driver.active.get_current_stream(device)
    for (kernel, grid, *args), kwargs in recorded:
        name = f"mhc_pre's {kernel.fn.__name__} ({len(args)} arguments)"
        compiled, keyword_names = launcher._FORMS[kernel].compiled[launcher._form(device, tuple(args), kwargs)]
        values = launcher._Forms.values(tuple(args), kwargs, keyword_names)
        grid_1 = grid[1] if len(grid) > 1 else 1

        def run():
            compiled.run(grid[0], grid_1, 1, stream, compiled.function, compiled.packed_metadata,
                         None, None, None, *values)

        rows += [{"what": f"{name}: call form (_form)", "us": host_us(lambda: launcher._form(device, tuple(args), kwargs), calls)},
                 {"what": f"{name}: CompiledKernel.run", "us": host_us(run, calls)},
                 {"what": f"{name}: launch_metadata", "us": host_us(lambda: compiled.launch_metadata(grid, stream, *values), calls)}]
    return rows


def decode_rows(args: argparse.Namespace) -> list[dict]:
    from benchmarks import decode

    options = argparse.Namespace(hidden=args.hidden, layers=args.layers, vocab=32000, prompt=128, new_tokens=64,
                                 warmup=2, reps=3, device="cuda", profile=None, profile_modes=[], only=["eager"])
    rows = []
    for collector in ("on", "off"):
        for converted in (False, True):
            if collector == "off":
                gc.collect()
                gc.disable()
            try:
                row = decode.measure(options, converted, "eager")
            finally:
                gc.enable()
            rows.append({"model": row["model"], "garbage collector": collector, "eager ms/token": row["ms/token"]})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--decode", action="store_true", help="also part 2: eager decode with the collector on and off")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import triton

    command = "python benchmarks/host_costs.py" + (f" --hidden {args.hidden}" if args.hidden != 4096 else "") + (
        " --decode" if args.decode else "")
    parts = [f"# Host costs of the connection ops on {torch.cuda.get_device_name()}", "",
             f"Command: `{command}` (torch {torch.__version__}, triton {triton.__version__}).", "",
             f"## Host time per call (us): n = 4, C = {args.hidden}, one token, bf16 streams", "",
             tabulate(op_rows(4, args.hidden, args.calls), headers="keys", tablefmt="github"), ""]
    if args.decode:
        parts += [f"## Eager decode, hidden {args.hidden}, {args.layers} layers (the eager rows of benchmarks/decode.py)", "",
                  tabulate(decode_rows(args), headers="keys", tablefmt="github"), ""]
    report("\n".join(parts), args.out)

if __name__ == "__main__":
    main()
