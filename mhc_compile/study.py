"""``mhc-compile study`` / ``benchmarks/study.py``: residual vs HC vs mHC at depth, at several learning rates.

One Hugging Face ``LlamaForCausalLM`` (random weights from a ``LlamaConfig``, byte-level:
vocabulary 256) is trained in four ways at every learning rate of ``--lrs``:

* ``residual``: the model as written (``mhc_compile`` is not called);
* ``hc``: ``mode="hc"``, unconstrained Hyper-Connections (``init="paper"``: the dynamic
  parts are on from the first step, ``b_res = I``);
* ``mhc-preserve``: ``mode="mhc"``, ``init="preserve"`` (the residual model's function at step 0);
* ``mhc-paper``: ``mode="mhc"``, ``init="paper"`` (DeepSeek's init: ``alpha = 0.01``, zero biases).

All with n = ``--n`` streams (4), the same seed (so the same base weights: they are drawn
before the connections), the same batches in the same order, the same optimiser (AdamW,
betas 0.9/0.95, weight decay on the matrices of the original model, linear warm-up then
cosine decay to 10% of the peak, gradient clipping at ``--grad-clip``) and the same token
budget (``--steps`` x ``--batch`` x ``--seq-len`` tokens per run). Each model is built and
converted once; every learning rate starts from a copy of its initial weights.

Data: the source text of Python's standard library (``demo.stdlib_corpus(recursive=True)``,
about 11 MB of bytes on Python 3.11, no download), split into 64 KiB blocks of which every
tenth is the held-out validation text.

On CUDA: bf16 autocast, ``layer.compile()`` on every decoder layer (regional compilation:
equal layers share one graph, so a converted model compiles three, for its first, middle
and last layers, and the residual model one; the runs of a model, and mHC's second init,
reuse them), the Triton kernels
(``backend="auto"``). Evaluation and the gain measurement run eagerly
(``torch.compiler.set_stance("force_eager")``), so they compile nothing. On the CPU:
float32, no compilation (the smoke test), smaller default batches.

Recorded per run (all in the JSON next to the markdown):

* train loss and global gradient norm (before clipping) every step; validation loss every
  ``--eval-every`` steps (mean over ``--val-batches`` fixed batches);
* every ``--gain-every`` steps, on the first validation batch: the paper's Amax gain
  magnitude of the composite mixing ``H_res_l @ ... @ H_res_1`` at every depth l, forward
  (max absolute row sum, max over tokens) and backward (max absolute column sum), its max
  over depth, and the largest gain of a single layer's ``H_res`` (``mhc.diagnostics``).
  A residual model has no mixing: its gain is 1 by definition (the identity), recorded as 1;
* loss spikes: step t is a spike when its train loss exceeds the exponential moving
  average of the losses before it (``ema = 0.9 ema + 0.1 loss``, started at step 1's loss)
  by more than ``--spike-margin`` nats; the count is the number of such steps;
* a run whose loss or gradient norm turns non-finite stops there and is recorded as
  diverged (that is a result, not a crash); a run that raises is recorded as failed and
  the study goes on;
* tokens/s over the timed steps (after ``--warmup-timing-steps`` steps, whose time,
  compilation included, is reported separately as warm-up), excluding evaluation; wall
  time of the run; peak CUDA memory (``torch.cuda.max_memory_allocated``).

Time on one H200 with the defaults (24 layers, width 512, 4 heads of 128, seq 512,
batch 32, 300 steps = 4.9M tokens per run, 8 runs; about 77M parameters): an estimate, not a measurement. Training costs about 0.5 GFLOP per token
(6 x 77M + attention), 2.5 PFLOP per run: about 12 s per residual run at 200 TFLOP/s. The
mHC ops are memory-bound, about 100 KB per token per connection forward + backward with
float32 streams, 48 connections: about 7 s more per run at 3.5 TB/s, so 20-25 s per HC or
mHC run: about 170 s of training for the eight runs. Compilation (the least certain
part): one graph for the residual model, three each for HC and mHC, 20-40 s each, 2-4
minutes; conversion of three models, 10-20 s each; evaluation and gain measurement (eager),
a few seconds per run. In all 6-8 minutes. The script prints each run's ETA after its
first timed steps and each run's warm-up (compilation) time, so a slower machine shows
early; ``--steps`` scales the training part linearly.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import diagnostics
from .api import mhc_compile, mhc_parameters
from .demo import VOCAB, sample_batch, save_figure, stdlib_corpus


@dataclass(frozen=True)
class RunSpec:
    """One way of building the model: ``mode`` and ``init`` of ``mhc_compile`` (``residual``: not converted)."""

    name: str
    mode: str
    init: Optional[str]


RUNS = (
    RunSpec("residual", "residual", None),
    RunSpec("hc", "hc", "paper"),
    RunSpec("mhc-preserve", "mhc", "preserve"),
    RunSpec("mhc-paper", "mhc", "paper"),
)


@dataclass
class RunRecord:
    """Curves and summary of one run (one model, one learning rate); floats are plain Python."""

    name: str
    mode: str
    init: Optional[str]
    lr: float
    params: int = 0
    mhc_params: int = 0
    train_loss: list = field(default_factory=list)  # one per step, from step 1
    grad_norm: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    gain_steps: list = field(default_factory=list)
    forward_gain: list = field(default_factory=list)  # max over depth of the composite's gain
    backward_gain: list = field(default_factory=list)
    layer_gain: list = field(default_factory=list)  # max over layers of one H_res's forward gain
    forward_gain_per_depth: list = field(default_factory=list)  # per gain step: [depth] values
    backward_gain_per_depth: list = field(default_factory=list)
    spikes: list = field(default_factory=list)  # steps
    diverged_at: Optional[int] = None
    error: Optional[str] = None
    warmup_s: float = 0.0
    timed_steps: int = 0
    timed_s: float = 0.0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    peak_memory_gib: Optional[float] = None
    graphs_compiled: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# pieces


def spike_steps(losses: list[float], margin: float, beta: float = 0.9) -> list[int]:
    """Steps (1-based) whose loss exceeds the EMA of the losses before it by more than ``margin``.

    The EMA starts at the first loss; non-finite losses end the scan (the run diverged).
    """
    spikes, ema = [], None
    for step, loss in enumerate(losses, start=1):
        if not math.isfinite(loss):
            break
        if ema is not None and loss > ema + margin:
            spikes.append(step)
        ema = loss if ema is None else beta * ema + (1 - beta) * loss
    return spikes


def split_corpus(data: torch.Tensor, val_every: int = 10, block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)``: every ``val_every``-th block of ``block`` bytes is validation text."""
    blocks = list(torch.split(data, block))
    val = [b for i, b in enumerate(blocks) if i % val_every == val_every - 1]
    train = [b for i, b in enumerate(blocks) if i % val_every != val_every - 1]
    if not val:
        raise ValueError(f"the corpus ({data.numel()} bytes) is too small for a validation split of {block}-byte blocks")
    return torch.cat(train), torch.cat(val)


def build_model(args: argparse.Namespace, spec: RunSpec, device: torch.device) -> nn.Module:
    """The byte-level Llama of ``args``, converted as ``spec`` says (same base weights for every spec)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = args.heads or max(1, args.width // 128)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.width, intermediate_size=(8 * args.width // 3 + 63) // 64 * 64,
        num_hidden_layers=args.depth, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.seq_len, use_cache=False, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if spec.mode != "residual":
        options = {} if args.stream_dtype == "default" else {"stream_dtype": getattr(torch, args.stream_dtype)}
        mhc_compile(model, n_streams=args.n, mode=spec.mode, init=spec.init, **options)
    return model


def make_optimizer(model: nn.Module, lr: float, args: argparse.Namespace, device: torch.device):
    """AdamW (weight decay on the original model's matrices) and its warm-up + cosine schedule."""
    extra = {id(p) for p in mhc_parameters(model)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in extra]
    rest = [p for p in model.parameters() if p.ndim < 2 or id(p) in extra]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    warmup = max(1, round(args.warmup_frac * args.steps))

    def factor(step: int) -> float:  # step 0 is the first update
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Stopwatch:
    """Accumulated wall time of the intervals between ``start()`` and ``stop()``, synchronised on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.total = 0.0
        self._since: Optional[float] = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self.total += self._now() - self._since
            self._since = None


class Trainer:
    """One run: train ``model`` from its current weights at learning rate ``lr`` and record it."""

    def __init__(self, model: nn.Module, record: RunRecord, args: argparse.Namespace, data: dict,
                 device: torch.device) -> None:
        self.model, self.record, self.args, self.data, self.device = model, record, args, data, device

    def autocast(self) -> torch.autocast:
        """bf16 autocast on CUDA; float32 (autocast off) on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        with torch.compiler.set_stance("force_eager"):
            total = sum(self.loss(x, y) for x, y in self.data["val_batches"])
        self.model.train()
        return float(total) / len(self.data["val_batches"])

    def measure_gain(self, step: int) -> None:
        r = self.record
        r.gain_steps.append(step)
        if r.mode == "residual":  # no mixing: the identity, gain 1 by definition
            for curve in (r.forward_gain, r.backward_gain, r.layer_gain):
                curve.append(1.0)
            return
        self.model.eval()
        with torch.compiler.set_stance("force_eager"), diagnostics.observe() as rec, self.autocast():
            self.model(input_ids=self.data["val_batches"][0][0], use_cache=False)
        self.model.train()
        if not rec.h_res:
            raise RuntimeError("the gain forward observed no H_res: the connections did not run eagerly")
        fwd, bwd = [], []
        for chain in diagnostics.chains(rec.h_res):
            f, b = diagnostics.composite_gains(chain)
            fwd.extend(f.tolist())
            bwd.extend(b.tolist())
        r.forward_gain.append(max(fwd))
        r.backward_gain.append(max(bwd))
        r.layer_gain.append(max(float(diagnostics.composite_gains([h])[0][0]) for h in rec.h_res))
        r.forward_gain_per_depth.append(fwd)
        r.backward_gain_per_depth.append(bwd)

    def run(self, on_eta: Callable[[float], None]) -> None:
        a, r, model = self.args, self.record, self.model
        params = [p for p in model.parameters() if p.requires_grad]
        opt, schedule = make_optimizer(model, r.lr, a, self.device)
        gen = torch.Generator().manual_seed(a.seed)  # same batches, same order, in every run
        clip = a.grad_clip if a.grad_clip > 0 else float("inf")
        warm, timed = Stopwatch(self.device), Stopwatch(self.device)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        model.train()
        self.measure_gain(0)
        r.val_steps.append(0)
        r.val_loss.append(self.evaluate())
        warm.start()
        for step in range(1, a.steps + 1):
            if step == a.warmup_timing_steps + 1:
                warm.stop()
                timed.start()
            x, y = sample_batch(self.data["train"], a.batch, a.seq_len, gen, str(self.device))
            loss = self.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            schedule.step()
            pending.append((loss.detach(), norm.detach()))
            evaluating = step % a.eval_every == 0 or step == a.steps
            gaining = step % a.gain_every == 0 or step == a.steps
            if step % a.log_every and not (evaluating or gaining):
                continue
            if self._flush(pending):  # syncs; False: diverged
                break
            pending = []
            if step > a.warmup_timing_steps:
                timed.stop()
                r.timed_steps = step - a.warmup_timing_steps
                if r.timed_s == 0.0:
                    on_eta(timed.total / r.timed_steps * (a.steps - step))
                r.timed_s = timed.total
            if gaining:
                self.measure_gain(step)
            if evaluating:
                r.val_steps.append(step)
                r.val_loss.append(self.evaluate())
                print(f"  [{r.name:>12} lr {r.lr:g}] step {step:5d}/{a.steps}  train {r.train_loss[-1]:.3f}  "
                      f"val {r.val_loss[-1]:.3f}  gain fwd {r.forward_gain[-1]:.3g} bwd {r.backward_gain[-1]:.3g}  "
                      f"|g| {r.grad_norm[-1]:.3g}", flush=True)
            if step > a.warmup_timing_steps:
                timed.start()
        warm.stop()
        timed.stop()
        r.warmup_s = warm.total
        tokens = r.timed_steps * a.batch * a.seq_len
        r.tokens_per_s = tokens / r.timed_s if r.timed_s > 0 else 0.0

    def _flush(self, pending: list) -> bool:
        """Move the pending losses and norms to the record; True (and ``diverged_at``) at a non-finite one."""
        if not pending:
            return False
        values = torch.stack([torch.stack(p) for p in pending]).float().tolist()
        for loss, norm in values:
            self.record.train_loss.append(loss)
            self.record.grad_norm.append(norm)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self.record.diverged_at = len(self.record.train_loss)
                print(f"  [{self.record.name:>12} lr {self.record.lr:g}] diverged at step "
                      f"{self.record.diverged_at} (loss {loss}, grad norm {norm}): stopping this run", flush=True)
                return True
        return False


# ---------------------------------------------------------------------------------------------
# the study


def _device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Device-dependent defaults (the CPU ones keep the smoke test short)."""
    cuda = device.type == "cuda"
    if args.seq_len is None:
        args.seq_len = 512 if cuda else 32
    if args.batch is None:
        args.batch = 32 if cuda else 4
    if args.val_batches is None:
        args.val_batches = 8 if cuda else 1
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // (6 if cuda else 4))
    if args.gain_every is None:
        args.gain_every = max(1, args.steps // (12 if cuda else 4))
    args.compile = cuda if args.compile is None else args.compile


def device_slug(device: torch.device) -> str:
    """``"h200"`` for an NVIDIA H200, ``"cpu"`` on the CPU."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def _environment(device: torch.device) -> str:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"{where}; torch {torch.__version__}, triton {triton_version}, transformers {transformers.__version__}, "
            f"Python {sys.version.split()[0]}")


def _set_compile_limits() -> None:
    """Room for every graph of the study (several models share the runtime's code objects)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_study(args: argparse.Namespace) -> list[RunRecord]:
    """Train every run of the study; write the markdown, the JSON and the figure; print the table."""
    device = _device(args)
    _fill_defaults(args, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.compile:
        _set_compile_limits()
    out = args.out or os.path.join("benchmarks", "results", "")
    if out.endswith(os.sep) or os.path.isdir(out):
        out = os.path.join(out, f"study-{device_slug(device)}.md")
    corpus = stdlib_corpus(args.corpus_bytes, recursive=True)
    train, val = split_corpus(corpus)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    data = {"train": train,
            "val_batches": [sample_batch(val, args.batch, args.seq_len, val_gen, str(device))
                            for _ in range(args.val_batches)]}
    specs = [s for s in RUNS if args.only is None or s.name in args.only]
    n_runs = len(specs) * len(args.lrs)
    tokens = args.steps * args.batch * args.seq_len
    print(f"study on {_environment(device)}\ncorpus: {corpus.numel():,} bytes of Python's standard library "
          f"({train.numel():,} train, {val.numel():,} validation); {args.depth} layers x width {args.width}, "
          f"n = {args.n}; {n_runs} runs of {args.steps} steps x {args.batch} x {args.seq_len} = {tokens:,} tokens",
          flush=True)
    records: list[RunRecord] = []
    started = time.perf_counter()
    for spec in specs:
        model = None
        try:
            model = build_model(args, spec, device)
            initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if args.compile:
                for layer in model.model.layers:
                    layer.compile(backend=args.compile_backend)
        except Exception as err:  # noqa: BLE001 - one model failing is a result; the study goes on
            for lr in args.lrs:
                records.append(RunRecord(spec.name, spec.mode, spec.init, lr, error=f"{type(err).__name__}: {err}"))
            print(f"  [{spec.name}] could not be built: {type(err).__name__}: {err}", flush=True)
            del model
            continue
        for lr in args.lrs:
            model.load_state_dict(initial)
            records.append(_one_run(model, spec, lr, args, data, device, started, len(records), n_runs))
        del model, initial
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # after every model, so a study stopped at its time limit keeps the runs it finished
        write_results(records, args, out, device, corpus.numel(), train.numel(), val.numel(), final=False)
    write_results(records, args, out, device, corpus.numel(), train.numel(), val.numel())
    return records


def _one_run(model: nn.Module, spec: RunSpec, lr: float, args: argparse.Namespace, data: dict,
             device: torch.device, started: float, done: int, n_runs: int) -> RunRecord:
    record = RunRecord(spec.name, spec.mode, spec.init, lr,
                       params=sum(p.numel() for p in model.parameters()),
                       mhc_params=sum(p.numel() for p in mhc_parameters(model)))
    print(f"run {done + 1}/{n_runs}: {spec.name} at lr {lr:g}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    graphs = _graphs_compiled()
    begin = time.perf_counter()

    def on_eta(seconds: float) -> None:
        now = time.perf_counter()
        this_run = now - begin + seconds
        left = seconds + this_run * (n_runs - done - 1)
        print(f"  ETA: this run {seconds:.0f} s more ({this_run:.0f} s in all); the study {now - started:.0f} s so far, "
              f"about {left:.0f} s more if the {n_runs - done - 1} runs after this one take as long", flush=True)

    try:
        Trainer(model, record, args, data, device).run(on_eta)
    except Exception as err:  # noqa: BLE001 - recorded; the next run goes on
        record.error = f"{type(err).__name__}: {err}"
        print(f"  [{spec.name} lr {lr:g}] failed: {record.error}", flush=True)
    record.wall_s = time.perf_counter() - begin
    record.graphs_compiled = _graphs_compiled() - graphs
    if device.type == "cuda":
        record.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    record.spikes = spike_steps(record.train_loss, args.spike_margin)
    return record


# ---------------------------------------------------------------------------------------------
# results


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _max_gain(gains: list[float]) -> str:
    """The largest gain measured; ``"inf or nan"`` once one was not finite (the mixing overflowed)."""
    if not gains:
        return "-"
    if not all(math.isfinite(g) for g in gains):
        return "inf or nan"
    return format(max(gains), ".3g")


def table_rows(records: list[RunRecord]) -> list[dict]:
    """One row per run: the columns of the results table."""
    rows = []
    for r in records:
        finite_val = [v for v in r.val_loss if math.isfinite(v)]
        if r.error:
            final = f"failed: {r.error[:80]}"
        elif r.diverged_at is not None:
            final = f"diverged at step {r.diverged_at}"
        else:
            final = _fmt(r.val_loss[-1] if r.val_loss else None)
        residual = r.mode == "residual"
        rows.append({
            "run": r.name,
            "lr": f"{r.lr:g}",
            "final val loss": final,
            "best val loss": _fmt(min(finite_val) if finite_val else None),
            "max fwd gain": "1 (no mixing)" if residual else _max_gain(r.forward_gain),
            "max bwd gain": "1 (no mixing)" if residual else _max_gain(r.backward_gain),
            "spikes": len(r.spikes),
            "tokens/s": f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-",
            "peak GiB": _fmt(r.peak_memory_gib, ".2f"),
            "warm-up s": _fmt(r.warmup_s, ".1f"),
            "graphs compiled": "-" if r.graphs_compiled is None else r.graphs_compiled,
            "wall s": _fmt(r.wall_s, ".1f"),
        })
    return rows


def markdown(records: list[RunRecord], args: argparse.Namespace, device: torch.device, sizes: dict) -> str:
    from tabulate import tabulate

    first = next((r for r in records if r.params), None)
    tokens = args.steps * args.batch * args.seq_len
    model_line = (f"{first.params - first.mhc_params:,} parameters (residual); mHC adds "
                  f"{max(r.mhc_params for r in records):,}" if first else "no model was built")
    return "\n".join([
        f"# Residual vs HC vs mHC on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}",
        "",
        f"Command: `{args.command_line}` (the output paths, `--out` and `--figure`, left out)",
        "",
        f"- Environment: {_environment(device)}.",
        f"- Model: Hugging Face `LlamaForCausalLM`, byte-level (vocabulary 256), {args.depth} layers, width "
        f"{args.width}, {args.heads or max(1, args.width // 128)} heads, seq {args.seq_len}; {model_line} at n = {args.n}.",
        f"- Training: {args.steps} steps x batch {args.batch} x seq {args.seq_len} = {tokens:,} tokens per run, "
        f"AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on the original matrices), "
        f"{round(args.warmup_frac * 100)}% linear warm-up then cosine to 10%, gradient clipping at {args.grad_clip}, seed "
        f"{args.seed}; " + ("bf16 autocast, every decoder layer compiled" if device.type == "cuda" else "float32, eager")
        + (f", streams {args.stream_dtype}" if args.stream_dtype != "default" else "") + ".",
        f"- Data: {sizes['corpus']:,} bytes of Python's standard library source ({sizes['train']:,} train, "
        f"{sizes['val']:,} validation: every tenth 64 KiB block); the same batches in the same order in every run; "
        f"validation loss: mean over {args.val_batches} fixed batches every {args.eval_every} steps.",
        "",
        tabulate(table_rows(records), headers="keys", tablefmt="github"),
        "",
        "Gain: the paper's Amax gain magnitude of the composite mixing matrix `H_res_L ... H_res_1`, forward "
        "(max absolute row sum) and backward (max absolute column sum), max over tokens of the first validation "
        f"batch and over depth, measured every {args.gain_every} steps; a residual model does not mix: 1 by "
        f"definition. Spikes: steps whose train loss exceeds the EMA (0.9) of the losses before it by more than "
        f"{args.spike_margin} nats. tokens/s: training steps after the first {args.warmup_timing_steps} "
        "(warm-up s: those steps, compilation included), evaluation excluded. Graphs compiled: new Dynamo graphs "
        "during the run (0 without compilation; later runs of a model reuse its graphs).",
        "",
        f"Curves (every step's train loss and gradient norm, validation loss, gain per depth; null: not finite): "
        f"`{os.path.basename(args.json_path)}`; figure: `{_shown_path(args.figure)}`.",
        "",
    ])


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when inside it, else its file name."""
    relative = os.path.relpath(os.path.abspath(path))
    return os.path.basename(path) if relative.startswith(os.pardir) else relative


def write_results(records: list[RunRecord], args: argparse.Namespace, out: str, device: torch.device,
                  corpus: int, train: int, val: int, final: bool = True) -> None:
    """The markdown at ``out``, the JSON beside it, the figure; the table on stdout
    (``final=False``: the files only, for the runs done so far)."""
    from tabulate import tabulate

    args.json_path = os.path.splitext(out)[0] + ".json"
    text = markdown(records, args, device, {"corpus": corpus, "train": train, "val": val})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, bool, type(None)))}
    with open(args.json_path, "w") as f:
        json.dump(_finite({"settings": settings, "environment": _environment(device),
                           "runs": [asdict(r) for r in records]}), f, indent=1, allow_nan=False)
    plotted = plot(records, args.figure, args.lrs)
    if not final:
        return
    print()
    print(tabulate(table_rows(records), headers="keys", tablefmt="github"))
    print(f"\nresults: {out}, {args.json_path}" + (f", {args.figure}" if plotted else " (no figure)"))


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else beta * ema + (1 - beta) * v
        out.append(ema)
    return out


def plot(records: list[RunRecord], path: str, lrs: list[float]) -> bool:
    """One column per learning rate: losses (train EMA, val) above, forward gain (log axis) below."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install matplotlib)", file=sys.stderr)
        return False
    names = list(dict.fromkeys(r.name for r in records))
    fig, axes = plt.subplots(2, len(lrs), figsize=(5.5 * len(lrs), 7.5), squeeze=False, sharex="col")
    for col, lr in enumerate(lrs):
        ax_loss, ax_gain = axes[0][col], axes[1][col]
        for r in (r for r in records if r.lr == lr):
            color = f"C{names.index(r.name)}"
            steps = range(1, len(r.train_loss) + 1)
            ax_loss.plot(steps, _ema(r.train_loss), color=color, alpha=0.5, linewidth=0.9)
            ax_loss.plot(r.val_steps, r.val_loss, color=color, marker="o", markersize=3, label=r.name)
            if r.diverged_at is not None:
                ax_loss.axvline(r.diverged_at, color=color, linestyle=":", linewidth=0.8)
            style = "--" if r.mode == "residual" else "-"
            ax_gain.plot(r.gain_steps, r.forward_gain, color=color, linestyle=style, marker=".",
                         label=r.name + (" (1: no mixing)" if r.mode == "residual" else ""))
            if r.mode != "residual":
                ax_gain.plot(r.gain_steps, r.backward_gain, color=color, linestyle=":", linewidth=0.9)
        ax_loss.set_title(f"lr {lr:g}")
        ax_loss.set_ylabel("loss (nats/byte): train EMA, val (dots)")
        ax_loss.legend(fontsize=8)
        ax_gain.set_yscale("log")
        ax_gain.set_xlabel("step")
        ax_gain.set_ylabel("Amax gain of the composite H_res: forward, backward (dotted)")
        ax_gain.legend(fontsize=8)
    save_figure(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=24, help="decoder layers (default 24)")
    parser.add_argument("--width", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default width / 128)")
    parser.add_argument("--n", type=int, default=4, help="streams of HC and mHC (default 4)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 32 on CUDA, 4 on the CPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (default 512 on CUDA, 32 on the CPU)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 4e-3], help="peak learning rates (default 1e-3 4e-3)")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in RUNS], default=None, help="a subset of the runs")
    parser.add_argument("--warmup-frac", type=float, default=0.1, help="linear warm-up, fraction of --steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global norm clipping (0: off)")
    parser.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default steps / 6; CPU: steps / 4)")
    parser.add_argument("--gain-every", type=int, default=None, help="gain measurement every N steps (default steps / 12; CPU: steps / 4)")
    parser.add_argument("--log-every", type=int, default=10, help="move losses to the host every N steps")
    parser.add_argument("--val-batches", type=int, default=None, help="validation batches (default 8 on CUDA, 1 on the CPU)")
    parser.add_argument("--spike-margin", type=float, default=0.1, help="loss rise over its EMA that counts as a spike (nats)")
    parser.add_argument("--warmup-timing-steps", type=int, default=3, help="first steps timed apart (compilation)")
    parser.add_argument("--stream-dtype", default="default", choices=["default", "float32", "bfloat16"],
                        help="dtype of the n streams (default: the package's default)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile every decoder layer (default: on CUDA)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)")
    parser.add_argument("--corpus-bytes", type=int, default=64_000_000, help="at most this much text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default 1 on the CPU: the smoke test's ops are too small to split)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default cuda when available)")
    parser.add_argument("--out", default=None, help="markdown results, or a folder for study-<gpu>.md (default "
                                                    "benchmarks/results/study-<gpu>.md); the JSON goes beside it")
    parser.add_argument("--figure", default=os.path.join("docs", "study.png"), help="the figure (default docs/study.png)")


def problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the options (checked before anything is built), or None."""
    for name in ("depth", "width", "n", "steps", "log_every", "batch", "seq_len", "val_batches",
                 "eval_every", "gain_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be a positive integer, not {value}"
    if args.warmup_timing_steps < 0:
        return "--warmup-timing-steps must be 0 or more"
    if any(lr <= 0 for lr in args.lrs):
        return f"--lrs must be positive, not {args.lrs}"
    heads = args.heads or max(1, args.width // 128)
    if args.width % heads:
        return f"--width {args.width} is not a multiple of --heads {heads}"
    return None


def recorded_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--out`` and ``--figure`` (where the files went is not part of the experiment)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--figure"):
            skip = True
        elif not arg.startswith(("--out=", "--figure=")):
            shown.append(arg)
    return shown


def main(argv: Optional[list[str]] = None, prog: str = "benchmarks/study.py") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if problem(args):
        parser.error(problem(args))
    shown = recorded_argv(argv)
    args.command_line = shlex.join(["python", prog, *shown] if prog.endswith(".py") else [*prog.split(), *shown])
    run_study(args)
    return 0


__all__ = ["RUNS", "RunSpec", "RunRecord", "spike_steps", "split_corpus", "build_model", "run_study",
           "add_arguments", "problem", "main"]
