"""CPU training step of the demo's model: residual against HC and mHC, the connection ops with
and without their compiled kernels (``ops/csrc``, ``MHC_CPU_KERNELS``), in one process.

    python benchmarks/cpu_step.py --out benchmarks/results/cpu-step.md

The demo's byte-level GPT (``mhc_compile.demo.TinyGPT``: 8 blocks, width 64, batch 12 x 64
tokens) and its AdamW step. Each configuration is built once; then ``--rounds`` rounds
time ``--steps`` steps of every configuration in turn (after ``--warmup`` steps each), so
that a slow spell of the machine falls on all of them. Reported: the median step and its
split into forward, backward and optimiser step (medians), and the time inside the
connection ops (``ops/cpu.py``, ``ops/cpu_compiled.py``; perf_counter around each call,
forward and backward). ``--kernels``: each compiled kernel's time per call inside the mHC
step, and the same call replayed alone, hot and with the caches flushed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, ".")
from mhc_compile.api import mhc_compile  # noqa: E402
from mhc_compile.demo import TinyGPT  # noqa: E402
from mhc_compile.ops import cpu, cpu_compiled, native  # noqa: E402

CONFIGS = (  # name, mode, compiled CPU kernels
    ("residual", "residual", None),
    ("hc, whole-tensor ops", "hc", False),
    ("hc, compiled kernels", "hc", True),
    ("mhc, whole-tensor ops", "mhc", False),
    ("mhc, compiled kernels", "mhc", True),
)


class OpTimer:
    """Seconds spent in the connection ops' autograd nodes (forward and backward)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for module in (cpu, cpu_compiled):
            for name in ("_PreSide", "_PostSide", "_PostPreSide"):
                node = getattr(module, name, None)
                if node is not None:
                    for method in ("forward", "backward"):
                        self._wrap(node, method)

    def _wrap(self, node, method: str) -> None:
        original = getattr(node, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(node, method, staticmethod(timed))


class KernelTimer:
    """Per-call seconds of each compiled CPU kernel inside the model's step, and one call's
    arguments kept for replaying it alone (hot: the same call again and again; cold: after a
    pass over a buffer larger than the caches)."""

    def __init__(self) -> None:
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.example = {}
        self._real = native.ops

    def __enter__(self) -> "KernelTimer":
        real, timer = self._real(), self

        class Timed:
            def __getattr__(self, name):
                op = getattr(real, name)

                def call(*args):
                    start = time.perf_counter()
                    out = op(*args)
                    timer.seconds[name] += time.perf_counter() - start
                    timer.calls[name] += 1
                    timer.example.setdefault(name, args)
                    return out
                return call

        native.ops = lambda: Timed()
        return self

    def __exit__(self, *exc) -> None:
        native.ops = self._real

    def replay(self, name: str, cold: bool, reps: int = 50) -> float:
        op, args = getattr(self._real(), name), self.example[name]
        flush = torch.empty(64 << 20, dtype=torch.uint8) if cold else None
        times = []
        for _ in range(reps + 5):
            if flush is not None:
                flush.add_(1)
            start = time.perf_counter()
            op(*args)
            times.append(time.perf_counter() - start)
        return statistics.median(times[5:])


def kernel_table(model, opt, batches) -> str:
    """Each compiled kernel: us per call inside the step, replayed hot and replayed cold."""
    timer = KernelTimer()
    with timer:
        time_steps(model, opt, batches, None)
    rows = [[name, timer.calls[name] // len(batches), round(1e6 * timer.seconds[name] / timer.calls[name], 1),
             round(1e6 * timer.replay(name, cold=False), 1), round(1e6 * timer.replay(name, cold=True), 1)]
            for name in timer.calls]
    return tabulate(rows, headers=["kernel", "calls/step", "us/call in the step", "replayed hot", "replayed cold"],
                    tablefmt="github")


def build(args: argparse.Namespace, mode: str):
    torch.manual_seed(args.seed)
    model = TinyGPT(args.width, args.depth, seq_len=args.seq_len)
    if mode != "residual":
        example = torch.zeros(2, args.seq_len, dtype=torch.long)
        mhc_compile(model, n_streams=args.n, mode=mode, init="paper", example_inputs=example)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def set_kernels(on) -> None:
    if on is None:
        return
    os.environ[native.ENV_SWITCH] = "1" if on else "0"


def time_steps(model, opt, batches, timer: "OpTimer | None") -> dict:
    parts = defaultdict(list)
    for x, y in batches:
        if timer is not None:
            timer.seconds = 0.0
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for key, value in (("step", t3 - t0), ("forward", t1 - t0), ("backward", t2 - t1),
                           ("optimiser", t3 - t2), ("connection ops", timer.seconds if timer else 0.0)):
            parts[key].append(value)
    return parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", action="store_true",
                        help="also time each compiled kernel in the mHC step and replayed alone, hot and cold")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.available():
        print("the compiled CPU kernels are not built here: their rows are the whole-tensor ops", file=sys.stderr)

    gen = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randint(0, 256, (args.batch, args.seq_len), generator=gen),
                torch.randint(0, 256, (args.batch, args.seq_len), generator=gen)) for _ in range(args.steps)]
    timer = OpTimer()
    built = {}
    for name, mode, kernels in CONFIGS:
        set_kernels(kernels)
        built[name] = build(args, mode)
        time_steps(*built[name], batches[: args.warmup], timer)
    samples = {name: defaultdict(list) for name, _, _ in CONFIGS}
    for _ in range(args.rounds):
        for name, _, kernels in CONFIGS:
            set_kernels(kernels)
            for key, values in time_steps(*built[name], batches, timer).items():
                samples[name][key] += values
    os.environ.pop(native.ENV_SWITCH, None)

    keys = ("step", "forward", "backward", "optimiser", "connection ops")
    medians = {name: {k: 1000 * statistics.median(v[k]) for k in keys} for name, v in samples.items()}
    base = medians["residual"]["step"]
    rows = [[name, *(round(medians[name][k], 1) for k in keys), f"{medians[name]['step'] / base:.2f}x"]
            for name, _, _ in CONFIGS]
    headers = ["model", "step ms", "forward ms", "backward ms", "optimiser ms", "in connection ops ms",
               "step vs residual"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    command = "python benchmarks/cpu_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"Command: `{command.strip()}`\n\n"
            f"torch {torch.__version__}, {args.threads} threads, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; width {args.width}, depth {args.depth}, n = {args.n}, "
            f"batch {args.batch} x {args.seq_len} tokens; medians of {args.rounds} rounds x {args.steps} steps.\n\n"
            f"{table}\n")
    if args.kernels and native.available():
        set_kernels(True)
        text += ("\nEach compiled kernel of the mHC step (`--kernels`): us per call inside the step, then the "
                 "same call replayed alone, hot (again and again) and cold (after a pass over 64 MiB):\n\n"
                 + kernel_table(*built["mhc, compiled kernels"], batches) + "\n")
        os.environ.pop(native.ENV_SWITCH, None)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# CPU training step of the demo's model\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
