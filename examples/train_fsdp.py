"""Train a Llama-style model converted to mHC on several devices with FSDP2 or DDP.

    torchrun --nproc-per-node 2 examples/train_fsdp.py --mode fsdp --compile
    torchrun --nproc-per-node 2 examples/train_fsdp.py --mode ddp --steps 50
    torchrun --nproc-per-node 1 examples/train_fsdp.py --resume-from ckpt   # other world size

Uses NCCL on CUDA (bf16 mixed precision) and gloo on the CPU (float32). Every rank builds
the same model from a config (random weights, seed 0), converts it with ``mhc_compile``
and then shards it: FSDP2 ``fully_shard`` on every decoder layer and at the root, or
``DistributedDataParallel``. The mHC parameters live in the decoder layers
(``model.layers.<i>.mhc``), so they shard with their layer. Each step draws one global
batch from a seeded generator and every rank trains on its slice, so runs on different
world sizes see the same data. ``--save-dir`` writes a sharded checkpoint with
``torch.distributed.checkpoint`` after the last step; ``--resume-from`` loads one (any
world size) and goes on from there. ``--log-json`` writes the losses, gradient norms,
tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

import mhc_compile as mhc


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, all ranks together")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--recompute", action="store_true", help='mhc_compile(..., recompute="mhc")')
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-dir", default=None)
    p.add_argument("--resume-from", default=None)
    p.add_argument("--log-json", default=None)
    return p.parse_args()


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 64), vocab_size=args.vocab,
                      max_position_embeddings=args.seq, use_cache=False)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(cfg)
    example = {"input_ids": torch.randint(0, args.vocab, (2, 16), device=device)}
    return mhc.mhc_compile(model, n_streams=args.n_streams, init="paper", example_inputs=example,
                           recompute="mhc" if args.recompute else None)


def shard(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    if args.mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def batch(step: int, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """This rank's slice of the global batch of ``step`` (the same data on any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, args.vocab, (args.global_batch, args.seq), generator=g)
    per_rank = args.global_batch // world
    return ids[rank * per_rank:(rank + 1) * per_rank].to(device)


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the world size {world}")
    model = shard(build_model(args, device), args, device)
    layers = model.module.model.layers if args.mode == "ddp" else model.model.layers
    if args.compile:
        for layer in layers:
            layer.compile(backend=args.compile_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if args.resume_from:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=args.resume_from)  # in place, resharded to this world size
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        with open(os.path.join(args.resume_from, "step.json")) as f:
            start = json.load(f)["step"]
    log = {"loss": [], "grad_norm": [], "world_size": world, "mode": args.mode}
    mhc_params = [p for n, p in model.named_parameters() if ".mhc." in n]
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    log["mhc_parameters"] = len(mhc_params)
    log["mhc_in_optimizer"] = all(id(p) in in_optimizer for p in mhc_params)
    log["mhc_sharded"] = all(type(p).__name__ == "DTensor" for p in mhc_params)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0, tokens = None, 0
    for step in range(start, start + args.steps):
        if step == start + 1:  # time from the second step: the first one compiles
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = batch(step, args, rank, world, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and args.mode == "ddp"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        log["loss"].append(loss.item())
        log["grad_norm"].append(grad_norm.item())
        if step > start:
            tokens += ids.numel() * world
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  grad norm {grad_norm.item():.4f}", flush=True)
    if cuda:
        torch.cuda.synchronize()
    if t0 is not None:
        log["tokens_per_s"] = tokens / (time.perf_counter() - t0)
    if cuda:
        log["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.save_dir:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.save_dir)
        if rank == 0:
            with open(os.path.join(args.save_dir, "step.json"), "w") as f:
                json.dump({"step": start + args.steps}, f)
    if rank == 0 and args.log_json:
        with open(args.log_json, "w") as f:
            json.dump(log, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
