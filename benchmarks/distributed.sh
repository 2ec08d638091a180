#!/usr/bin/env bash
# Multi-GPU run of examples/train_fsdp.py (NCCL, bf16 mixed precision, compiled layers, mHC
# kernels): loss curves of 1 vs 2 GPUs at the same global batch, tokens/s, and peak memory
# with and without recompute="mhc" at hidden 4096. Writes $OUT/distributed.md.
#   bash benchmarks/distributed.sh      (from the repository root, on a machine with 2 GPUs)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0
OUT="${OUT:-benchmarks/results/local}"
mkdir -p "$OUT"
CURVE="--hidden 1024 --layers 4 --seq 1024 --global-batch 16 --vocab 32000 --steps 50 --compile"
MEM="--hidden 4096 --layers 4 --seq 2048 --global-batch 16 --vocab 32000 --steps 3 --compile --mode fsdp"
run() {  # name, nproc, args...
  local name=$1 nproc=$2; shift 2
  timeout 240 python3 -m torch.distributed.run --nproc-per-node "$nproc" --master-port $((29500 + RANDOM % 1000)) \
    examples/train_fsdp.py "$@" --log-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? $(grep -E '^step' "$OUT/$name.log" | tail -1)"
}
run fsdp-1gpu 1 $CURVE --mode fsdp
run fsdp-2gpu 2 $CURVE --mode fsdp
run ddp-2gpu 2 $CURVE --mode ddp
run mem-plain 2 $MEM
run mem-recompute 2 $MEM --recompute
python3 - "$OUT" "$CURVE" "$MEM" <<'PY'
import json, os, sys, torch
out, curve, mem = sys.argv[1:]
def load(name):
    path = os.path.join(out, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None
runs = {n: load(n) for n in ["fsdp-1gpu", "fsdp-2gpu", "ddp-2gpu", "mem-plain", "mem-recompute"]}
lines = [f"# Distributed training on {torch.cuda.device_count()} x {torch.cuda.get_device_name()}", "",
         f"torch {torch.__version__}; NCCL (NVLink multicast off), bf16 mixed precision "
         "(FSDP2 MixedPrecisionPolicy / autocast for DDP), decoder layers compiled, mHC n = 4 with the fused kernels.", "",
         f"Loss curves: `torchrun --nproc-per-node N examples/train_fsdp.py {curve} --mode fsdp|ddp`", "",
         "| run | GPUs | tokens/s | peak GiB per GPU | loss step 0 | loss step 10 | loss step 49 | max abs loss diff vs 1 GPU |",
         "|---|---|---|---|---|---|---|---|"]
ref = runs["fsdp-1gpu"]
for name in ["fsdp-1gpu", "fsdp-2gpu", "ddp-2gpu"]:
    r = runs[name]
    if r is None:
        lines.append(f"| {name} | failed (see {name}.log) | | | | | | |")
        continue
    diff = max(abs(a - b) for a, b in zip(r["loss"], ref["loss"])) if ref else float("nan")
    lines.append(f"| {r['mode']} | {r['world_size']} | {r.get('tokens_per_s', 0):,.0f} | {r.get('peak_gib', 0):.2f} | "
                 f"{r['loss'][0]:.4f} | {r['loss'][10]:.4f} | {r['loss'][-1]:.4f} | {diff:.4f} |")
lines += ["", "Per-step losses:", ""]
for name in ["fsdp-1gpu", "fsdp-2gpu", "ddp-2gpu"]:
    if runs[name]:
        lines.append(f"- {name}: " + " ".join(f"{x:.3f}" for x in runs[name]["loss"]))
lines += ["", f"Peak memory at hidden 4096 (2 GPUs, FSDP2): `torchrun --nproc-per-node 2 examples/train_fsdp.py {mem} [--recompute]`", "",
          "| recompute | peak GiB per GPU | tokens/s |", "|---|---|---|"]
for name, label in [("mem-plain", "off"), ("mem-recompute", 'recompute="mhc"')]:
    r = runs[name]
    lines.append(f"| {label} | {r['peak_gib']:.2f} | {r.get('tokens_per_s', 0):,.0f} |" if r else f"| {label} | failed | |")
if runs["mem-plain"] and runs["mem-recompute"]:
    a, b = runs["mem-plain"]["peak_gib"], runs["mem-recompute"]["peak_gib"]
    lines += ["", f"recompute lowers peak memory by {a - b:.2f} GiB ({100 * (a - b) / a:.1f}%)."]
text = "\n".join(lines) + "\n"
print(text)
open(os.path.join(out, "distributed.md"), "w").write(text)
PY
