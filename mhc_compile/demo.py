"""``mhc-compile demo``: plain residual vs HC vs mHC, trained on real text.

The corpus is the source code of Python's standard library on the machine running the
demo (no download). A small byte-level GPT is built three times with the same seed, data
and budget: as written (residual), converted with ``mode="hc"`` and with ``mode="mhc"``.
The demo prints a table (losses, gain magnitude, time per step, parameters) and writes a
PNG of the loss curves and the gain magnitude over steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import diagnostics
from .api import mhc_compile

VOCAB = 256  # bytes


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads = heads

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Byte-level decoder ``[B, T] int64 -> [B, T, 256]`` logits."""

    def __init__(self, dim: int = 64, depth: int = 8, heads: int = 4, seq_len: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def stdlib_corpus(max_bytes: int = 2_000_000, *, recursive: bool = False) -> torch.Tensor:
    """The standard library's ``.py`` sources as a byte tensor (sorted, so every run sees the same text).

    ``recursive=False``: the top-level modules only (about 4.7 MB on Python 3.11);
    ``recursive=True``: also the packages below them, without ``site-packages``, the test
    suites and ``idlelib`` (about 11 MB on Python 3.11).
    """
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in _stdlib_sources(root, recursive):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {root} to train the demo on")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


_SKIPPED_PACKAGES = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def _stdlib_sources(root: str, recursive: bool) -> list[str]:
    """Paths of the ``.py`` files under ``root``, in sorted order (top level first)."""
    if not recursive:
        return [os.path.join(root, name) for name in sorted(os.listdir(root)) if name.endswith(".py")]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED_PACKAGES)
        paths.extend(os.path.join(folder, name) for name in sorted(files) if name.endswith(".py"))
    return paths


@dataclass
class RunResult:
    """Curves and summary of one training run."""

    name: str
    params: int
    steps: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    gain: list = field(default_factory=list)
    ms_per_step: float = 0.0


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator, device: str):
    """``batch`` random windows of ``data``: inputs and next-byte targets, each ``[batch, seq_len]`` int64."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    rows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1].to(device), rows[:, 1:].to(device)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


class Run:
    """One model's training run, advanced a step at a time by :meth:`step` (the demo runs the
    three models in lockstep, so that a slow spell of a shared machine falls on all of them)."""

    def __init__(self, name: str, mode: str, args: argparse.Namespace, train: torch.Tensor,
                 val: torch.Tensor) -> None:
        torch.manual_seed(args.seed)
        self.model = TinyGPT(args.width, args.depth, seq_len=args.seq_len).to(args.device)
        example = torch.zeros(2, args.seq_len, dtype=torch.long, device=args.device)
        if mode != "residual":
            mhc_compile(self.model, n_streams=args.n, mode=mode, init="paper", example_inputs=example)
        self.result = RunResult(name, sum(p.numel() for p in self.model.parameters()))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.args, self.train = args, train
        self.gen = torch.Generator().manual_seed(args.seed)
        val_gen = torch.Generator().manual_seed(args.seed + 1)
        self.val_batches = [sample_batch(val, args.batch, args.seq_len, val_gen, args.device) for _ in range(4)]
        self.step_seconds: list[float] = []

    def step(self, step: int) -> None:
        """Training step ``step`` (1-based): timed; evaluated and logged every ``--log-every``."""
        args, model, result = self.args, self.model, self.result
        x, y = sample_batch(self.train, args.batch, args.seq_len, self.gen, args.device)
        start = time.perf_counter()
        model.train()
        loss = _loss(model, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - start)
        if step % args.log_every == 0 or step == args.steps:
            model.eval()
            with diagnostics.observe() as rec:
                val_loss = sum(_loss(model, vx, vy).item() for vx, vy in self.val_batches) / len(self.val_batches)
            gain = diagnostics.summarize(rec)["forward_gain"] if rec.h_res else 1.0
            result.steps.append(step)
            result.train_loss.append(loss.item())
            result.val_loss.append(val_loss)
            result.gain.append(gain)
            print(f"  [{result.name:>8}] step {step:4d}/{args.steps}  train {loss.item():.3f}  "
                  f"val {val_loss:.3f}  gain {gain:.3g}", flush=True)

    def finish(self) -> RunResult:
        """The run's curves and its median step time (robust to the first steps' warm-up)."""
        self.result.ms_per_step = 1000 * statistics.median(self.step_seconds)
        return self.result


def plot(results: list[RunResult], path: str) -> bool:
    """Loss curves and gain magnitude over steps; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax_loss, ax_gain) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(results):
        color = f"C{i}"
        ax_loss.plot(r.steps, r.val_loss, color=color, label=f"{r.name} (val)")
        ax_loss.plot(r.steps, r.train_loss, color=color, linestyle=":", alpha=0.6, label=f"{r.name} (train)")
        if r.name != "residual":
            ax_gain.plot(r.steps, r.gain, color=color, marker="o", label=r.name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/byte)")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    ax_gain.set_xlabel("step")
    ax_gain.set_ylabel("max forward gain of the composite H_res")
    ax_gain.set_yscale("log")
    ax_gain.axhline(1.0, color="gray", linewidth=0.8)
    ax_gain.set_title("Amax gain magnitude")
    ax_gain.legend(fontsize=8)
    save_figure(fig, path)
    return True


def save_figure(fig, path: str) -> None:
    """Lay out ``fig``, write it as a PNG to ``path`` (making its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--depth", type=int, default=8, help="transformer blocks (2 connections each)")
    parser.add_argument("--width", type=int, default=64, help="hidden size C")
    parser.add_argument("--n", type=int, default=4, help="number of streams")
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--out", default="mhc-demo.png", help="where to write the plot")


def _prepare_cpu_kernels() -> None:
    """Build (first run: about 20 s) or load the compiled CPU connection kernels, saying so."""
    from .ops import native

    if not native.enabled():
        print(f"compiled CPU connection kernels off ({native.ENV_SWITCH}=0): whole-tensor ops", flush=True)
        return
    print("preparing the compiled CPU connection kernels (built once, about 20 s) ...", end=" ", flush=True)
    start = time.perf_counter()
    built = native.available()
    print(f"{'ready' if built else 'not built: whole-tensor ops'} ({time.perf_counter() - start:.1f} s)", flush=True)


def run(args: argparse.Namespace) -> list[RunResult]:
    from tabulate import tabulate

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.device == "cpu":
        _prepare_cpu_kernels()
    data = stdlib_corpus(args.corpus_bytes)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    print(f"corpus: {data.numel():,} bytes of Python's standard library; {args.depth} blocks, "
          f"width {args.width}, n = {args.n}, {args.steps} steps on {args.device}", flush=True)
    runs = [Run(name, mode, args, train, val) for name, mode in (("residual", "residual"), ("hc", "hc"), ("mhc", "mhc"))]
    print("training residual, hc and mhc in lockstep (a step of each in turn) ...", flush=True)
    for step in range(1, args.steps + 1):
        for one in runs:
            one.step(step)
    results = [one.finish() for one in runs]
    rows = [
        {
            "model": r.name,
            "params": f"{r.params:,}",
            "final train loss": round(r.train_loss[-1], 3),
            "final val loss": round(r.val_loss[-1], 3),
            "max gain": "1 (no mixing)" if r.name == "residual" else f"{max(r.gain):.3g}",
            "ms/step": round(r.ms_per_step, 1),
        }
        for r in results
    ]
    print()
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if plot(results, args.out):
        print(f"\nplot written to {os.path.abspath(args.out)}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mhc-compile demo", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["TinyGPT", "stdlib_corpus", "sample_batch", "save_figure", "run", "main", "add_arguments"]
