#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the benchmarks; everything lands in $OUT.
#   bash benchmarks/run_gpu.sh            (from the repository root)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/local}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # optional wheels carried along (Liger-Kernel)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -m gpu -p no:logging --tb=short ${MHC_TESTS:-tests/test_kernels.py} > "$OUT/gpu-tests.log" 2>&1
grep -E "passed|failed|Error|error" "$OUT/gpu-tests.log" | tail -15
for script in ${MHC_BENCH:-kernels}; do
  timeout 400 python3 "benchmarks/$script.py" --out "$OUT/$script.md" ${MHC_BENCH_ARGS:-} > "$OUT/$script.log" 2>&1
  tail -45 "$OUT/$script.log"
done
