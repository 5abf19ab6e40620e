#!/usr/bin/env bash
# The prepared GPU check (issue 13), for a CUDA machine; under 8 minutes in all:
#   1. the CUDA tests:  pytest -m cuda  (tests/test_cuda.py, the fused AdamW test; <= 140 s)
#   2. benchmarks/gpu_check.py: decode at batch 1 and 8 against generate(); training steps at
#      8x128 and 64x1024 in fp32 (TF32) / bf16 / fp16 + GradScaler, ours eager, then compiled
#      (reduce-overhead) at 8x128, against transformers + torch AdamW, with MFU against the
#      measured bf16 matmul peak (<= 320 s; on the time limit it is interrupted and still prints
#      what it timed)
# Ends with a Markdown table. Without CUDA it stops at once with one line (exit 1).
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --shapes 8x128 --budget 200]
set -u
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was run" >&2
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
echo "== CUDA tests: pytest -m cuda"
timeout 140 python -m pytest -m cuda -q -rs --durations=5 -p no:cacheprovider tests/
tests=$?
echo "== timings: benchmarks/gpu_check.py"
timeout -s INT -k 10 320 python benchmarks/gpu_check.py --budget 280 "$@"
timings=$?
echo "gpu_check: CUDA tests exit $tests, timings exit $timings"
[ "$tests" -eq 0 ] && [ "$timings" -eq 0 ]
