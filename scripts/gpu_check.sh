#!/usr/bin/env bash
# The GPU check: on a machine whose python3 already has a CUDA build of torch and Triton (and nvcc),
# with no package registry and no ruff. Writes everything into OUT_DIR (default runs/gpu_check).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--phase tests|bench|train|all] [--dry-run]
#
# Phase "tests" (under 9 min on an H100): installs matnet in place with its CUDA kernels
#   (pip --no-index --no-deps --no-build-isolation -e ., MATNET_WITH_CUDA=1), asserts that the extension
#   has CUDA and that the CUDA ops dispatch to Triton, then runs every test with MATNET_REQUIRE_CUDA=1,
#   which turns a skipped CUDA, Triton or extension test into a failure.
# Phase "bench" (under 9 min): the CUDA benchmarks, as JSON (bench_cuda.json) and as the markdown
#   tables of benchmarks/report.py (bench_cuda.md).
# Phase "train" (not in "all"; needs MATNET_DATA_DIR with the datasets): `matnet train` images/s on CUDA,
#   eager / compiled / CUDA graphs, fp32 / bf16, reference / fused ops (benchmarks/train_throughput.py), for
#   each preset of TRAIN_PRESETS (default "mnist cifar10"; one preset per call keeps a call under 9 min):
#   train_PRESET.md and .json.
# --dry-run (CI, on a CPU machine): the same steps with CPU stand-ins (no CUDA build or asserts, test
#   collection only, two CPU benchmarks in quick mode, one 3-step training run), so that the script cannot rot.
# Environment: PYTHON (default python3), MATNET_DATA_DIR, TRAIN_PRESETS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check
PHASE=all
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --phase) PHASE=${2:?--phase needs tests, bench, train or all}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
case "$PHASE" in tests|bench|train|all) ;; *) echo "gpu_check.sh: --phase must be tests, bench, train or all" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

install() {
  local cuda=1
  [ "$DRY" = 1 ] && cuda=0
  log "installing matnet (MATNET_WITH_CUDA=$cuda)"
  MATNET_WITH_CUDA=$cuda "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; echo "gpu_check.sh: install failed" >&2; exit 1; }
  "$PY" - "$DRY" <<'EOF' | tee "$OUT/environment.txt"
import sys

import torch

import matnet
from matnet.ops import _dispatch, backends

dry = sys.argv[1] == "1"
import triton

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, matnet {matnet.__version__}")
assert _dispatch.extension_loaded(), "matnet._C did not load"
if dry:
    print("dry run: CPU backends", backends("cpu"))
else:
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print("GPU:", torch.cuda.get_device_name(0))
    assert _dispatch.extension_has_cuda(), "matnet._C was built without CUDA"
    assert _dispatch.triton_available(), "Triton kernels did not load"
    for dtype in (torch.float32, torch.bfloat16):
        b = backends("cuda", dtype)
        print(f"CUDA {dtype} backends:", b)
        assert b["residual_conv_block"] == "triton" and b["gaussian_sample_kl"] == "triton", b
        assert b["discretized_logistic_mixture_nll"] == "ext", b
EOF
}

phase_tests() {
  log "phase tests"
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest tests benchmarks -q --collect-only -p no:cacheprovider > "$OUT/tests.log" 2>&1 \
      || { tail -30 "$OUT/tests.log"; exit 1; }
  else
    # the interpreter is for CPU machines: kernels here must run compiled
    env -u TRITON_INTERPRET MATNET_REQUIRE_CUDA=1 "$PY" -m pytest tests -q -p no:cacheprovider \
      --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
  fi
  tail -1 "$OUT/tests.log"
}

phase_bench() {
  log "phase bench"
  if [ "$DRY" = 1 ]; then
    MATNET_BENCH_QUICK=1 "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
      -k "gaussian_sample_kl and cpu and mnist-7x7" --benchmark-min-rounds=1 --benchmark-max-time=0.01 \
      --benchmark-json="$OUT/bench_cuda.json" > "$OUT/bench.log" 2>&1 || { tail -30 "$OUT/bench.log"; exit 1; }
  else
    MATNET_BENCH_NO_COMPILE=${MATNET_BENCH_NO_COMPILE:-0} "$PY" -m pytest benchmarks -q -p no:cacheprovider \
      --benchmark-only -k cuda --benchmark-json="$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log"
  fi
  "$PY" benchmarks/report.py "$OUT/bench_cuda.json" --markdown > "$OUT/bench_cuda.md"
  log "wrote $OUT/bench_cuda.json and $OUT/bench_cuda.md"
}

phase_train() {
  log "phase train"
  if [ -z "${MATNET_DATA_DIR:-}" ]; then
    [ "$DRY" = 1 ] && { log "phase train: no MATNET_DATA_DIR, skipped in the dry run"; return; }
    echo "gpu_check.sh: phase train needs MATNET_DATA_DIR (the folder with the mnist and cifar-10 data)" >&2
    exit 2
  fi
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/train_throughput.py --preset tiny --steps 3 --only 1 --threads 1 --device cpu \
      > "$OUT/train_tiny.md" 2> "$OUT/train.log" || { tail -30 "$OUT/train.log"; exit 1; }
    return
  fi
  for preset in ${TRAIN_PRESETS:-mnist cifar10}; do
    local batch=$([ "$preset" = cifar10 ] && echo 256 || echo 0)  # 0: the preset's (100 for mnist)
    "$PY" benchmarks/train_throughput.py --preset "$preset" --batch "$batch" --steps 30 --device cuda \
      --json "$OUT/train_$preset.json" 2>&1 | tee "$OUT/train_$preset.md"
  done
}

install
case "$PHASE" in
  tests) phase_tests ;;
  bench) phase_bench ;;
  train) phase_train ;;
  all) phase_tests; phase_bench; if [ "$DRY" = 1 ]; then phase_train; fi ;;
esac
log "done: $OUT"
