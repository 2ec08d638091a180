#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the benchmarks; everything lands in $OUT.
#   bash benchmarks/run_gpu.sh            (from the repository root)
# MHC_TESTS: test files (default tests/test_kernels.py; empty: skip the tests)
# MHC_KERNELS_ARGS: arguments of benchmarks/mhc_kernels.py ("skip": do not run it)
# MHC_TRAIN_ARGS: arguments of benchmarks/train_step.py ("skip": do not run it)
# MHC_LOSS_ARGS, MHC_DECODE_ARGS, MHC_DECODE_OPS_ARGS: likewise for train_step.py --loss-check, decode.py
#   and decode_ops.py (default: skip; "defaults": decode_ops.py's defaults)
# MHC_STUDY_ARGS: arguments of benchmarks/study.py ("skip": do not run it; "defaults": its defaults);
#   the results, the JSON and the figure land in $OUT (study-<gpu>.md, study-<gpu>.json, study.png)
# MHC_BASELINE_ARGS: arguments of benchmarks/mhc_kernels.py run a second time, in this same call, against
#   an older package in .whl/baseline.tar (made with `git archive <commit> mhc_compile -o .whl/baseline.tar`),
#   so that kernel changes are compared on one machine in one run ("skip" or unset: not run)
# MHC_BUNDLE=1: pack every result into $OUT/results.tgz (the GPU tool returns few files)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/local}"
mkdir -p "$OUT"
# optional wheels carried along (Liger-Kernel); TransformerEngine's wheel is not installed:
# benchmarks/mhc_kernels.py reads its mHC files from .whl/ (the package would need TE's compiled core)
wheels=$(ls .whl/*.whl 2>/dev/null | grep -v '/transformer_engine-')
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ -n "${MHC_TESTS-tests/test_kernels.py}" ]; then
  timeout "${MHC_TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:logging --tb=short ${MHC_TESTS-tests/test_kernels.py} \
    > "$OUT/gpu-tests.log" 2>&1
  grep -E "passed|failed|Error|error" "$OUT/gpu-tests.log" | tail -15
fi
run_bench() {  # name, args, timeout
  [ "$2" = "skip" ] && return
  timeout "$3" python3 "benchmarks/$1.py" --out "$OUT/$1.md" $2 > "$OUT/$1.log" 2>&1
  echo "== $1 (exit $?)"; tail -60 "$OUT/$1.log"
}
run_bench mhc_kernels "${MHC_KERNELS_ARGS:-}" "${MHC_KERNELS_TIMEOUT:-300}"
if [ "${MHC_BASELINE_ARGS:-skip}" != "skip" ] && [ -f .whl/baseline.tar ]; then
  base=$(mktemp -d) && tar xf .whl/baseline.tar -C "$base" && cp -r benchmarks "$base/" && cp -r .whl "$base/"
  (cd "$base" && PYTHONPATH="$base${PYTHONPATH#$PWD}" timeout "${MHC_BASELINE_TIMEOUT:-200}" \
    python3 benchmarks/mhc_kernels.py --out "$OUT/kernels-baseline.md" $MHC_BASELINE_ARGS > "$OUT/kernels-baseline.log" 2>&1)
  echo "== kernels, baseline package (exit $?)"; tail -40 "$OUT/kernels-baseline.log"
fi
run_bench train_step "${MHC_TRAIN_ARGS:-skip}" "${MHC_TRAIN_TIMEOUT:-400}"
if [ "${MHC_LOSS_ARGS:-skip}" != "skip" ]; then
  timeout "${MHC_LOSS_TIMEOUT:-240}" python3 benchmarks/train_step.py --out "$OUT/loss-check.md" $MHC_LOSS_ARGS \
    > "$OUT/loss-check.log" 2>&1
  echo "== loss check (exit $?)"; tail -15 "$OUT/loss-check.log"
fi
run_bench decode "${MHC_DECODE_ARGS:-skip}" "${MHC_DECODE_TIMEOUT:-300}"
if [ "${MHC_DECODE_OPS_ARGS:-skip}" != "skip" ]; then
  [ "$MHC_DECODE_OPS_ARGS" = "defaults" ] && MHC_DECODE_OPS_ARGS=""
  timeout "${MHC_DECODE_OPS_TIMEOUT:-200}" python3 benchmarks/decode_ops.py --out "$OUT/decode-ops.md" $MHC_DECODE_OPS_ARGS \
    > "$OUT/decode-ops.log" 2>&1
  echo "== decode_ops (exit $?)"; tail -30 "$OUT/decode-ops.log"
fi
if [ "${MHC_STUDY_ARGS:-skip}" != "skip" ]; then
  [ "$MHC_STUDY_ARGS" = "defaults" ] && MHC_STUDY_ARGS=""
  timeout "${MHC_STUDY_TIMEOUT:-600}" python3 benchmarks/study.py --out "$OUT/" --figure "$OUT/study.png" $MHC_STUDY_ARGS \
    > "$OUT/study.log" 2>&1
  echo "== study (exit $?)"; tail -40 "$OUT/study.log"
fi
if [ "${MHC_BUNDLE:-0}" = "1" ]; then
  (cd "$OUT" && tar czf /tmp/results.tgz --exclude results.tgz . && mv /tmp/results.tgz results.tgz \
    && find . -type f ! -name results.tgz ! -name '*.md' ! -name '*.png' -delete)
fi
