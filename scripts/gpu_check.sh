#!/usr/bin/env bash
# The GPU check: on a machine whose python3 already has a CUDA build of torch and Triton (and nvcc),
# with no package registry and no ruff. Writes everything into OUT_DIR (default runs/gpu_check).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--phase tests|bench|bench-ops|bench-models|train|all] [--dry-run]
#
# Each phase is meant to fit one 10-minute call; a phase that fails is reported and the next one still runs,
# and the script exits 1 at the end if any did.
# Phase "tests": installs matnet in place with its CUDA kernels (pip --no-index --no-deps
#   --no-build-isolation -e ., MATNET_WITH_CUDA=1), asserts that the extension has CUDA and that the CUDA ops
#   dispatch to Triton, then runs every test with MATNET_REQUIRE_CUDA=1, which turns a skipped CUDA, Triton
#   or extension test into a failure: the tests with "cuda" in their names first (tests_cuda.log), then the
#   rest (tests_rest.log); on pytest-xdist's 8 workers where it is installed.
# Phase "bench" = "bench-ops" then "bench-models": the CUDA benchmarks of benchmarks/test_bench_ops.py and
#   test_bench_model.py, each as JSON (bench_ops.json, bench_models.json, written when its part ends) and as
#   the markdown tables of benchmarks/report.py (bench_ops.md, bench_models.md). BENCH_MAX_TIME (default
#   0.25) is pytest-benchmark's seconds per case.
# Phase "train" (not in "all"; needs MATNET_DATA_DIR with the datasets): `matnet train` images/s on CUDA,
#   eager / compiled / CUDA graphs, fp32 / bf16, reference / fused ops (benchmarks/train_throughput.py), for
#   each preset of TRAIN_PRESETS (default "mnist cifar10"; one preset per call keeps a call short):
#   train_PRESET.md and .json.
# --dry-run (CI, on a CPU machine): the same steps with CPU stand-ins (no CUDA build or asserts, test
#   collection only, one CPU benchmark of each part in quick mode, one 3-step training run), so that the
#   script cannot rot.
# Environment: PYTHON (default python3), MATNET_DATA_DIR, TRAIN_PRESETS, BENCH_MAX_TIME.
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
case "$PHASE" in tests|bench|bench-ops|bench-models|train|all) ;;
  *) echo "gpu_check.sh: --phase must be tests, bench, bench-ops, bench-models, train or all" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
FAILED=()  # the parts that failed: reported at the end, the other parts still run
failed() { FAILED+=("$1"); log "FAILED: $1"; }

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
      || { tail -30 "$OUT/tests.log"; failed "test collection"; }
    tail -1 "$OUT/tests.log"
    return
  fi
  local par=()
  "$PY" -c "import xdist" 2>/dev/null && par=(-n 8 --dist loadfile)
  # the interpreter is for CPU machines: kernels here must run compiled. The CUDA tests come first, so
  # that a call that runs out of time has run the ones only a GPU can.
  local part sel
  for part in cuda rest; do
    sel="cuda"; [ "$part" = rest ] && sel="not cuda"
    env -u TRITON_INTERPRET MATNET_REQUIRE_CUDA=1 "$PY" -m pytest tests -q -p no:cacheprovider "${par[@]}" \
      -k "$sel" --junitxml="$OUT/tests_$part.xml" 2>&1 | tee "$OUT/tests_$part.log" || failed "tests ($part)"
  done
}

bench_part() {  # bench_part NAME FILE: the CUDA cases of benchmarks/FILE -> bench_NAME.{json,md}
  local name=$1 file=$2 json="$OUT/bench_$1.json"
  log "phase bench-$name"
  if [ "$DRY" = 1 ]; then
    local sel="gaussian_sample_kl and cpu and mnist-7x7"
    [ "$name" = models ] && sel="test_loader and cpu and mnist"
    MATNET_BENCH_QUICK=1 "$PY" -m pytest "benchmarks/$file" -q -p no:cacheprovider --benchmark-only -k "$sel" \
      --benchmark-min-rounds=1 --benchmark-max-time=0.01 --benchmark-json="$json" > "$OUT/bench_$name.log" 2>&1 \
      || { tail -30 "$OUT/bench_$name.log"; failed "bench-$name"; }
  else
    MATNET_BENCH_NO_COMPILE=${MATNET_BENCH_NO_COMPILE:-0} "$PY" -m pytest "benchmarks/$file" -q -p no:cacheprovider \
      --benchmark-only -k cuda --benchmark-max-time="${BENCH_MAX_TIME:-0.25}" --benchmark-json="$json" 2>&1 \
      | tee "$OUT/bench_$name.log" || failed "bench-$name"
  fi
  if [ -s "$json" ]; then  # pytest-benchmark writes what ran even when a case failed
    "$PY" benchmarks/report.py "$json" --markdown > "$OUT/bench_$name.md" || failed "bench-$name report"
    log "wrote $json and $OUT/bench_$name.md"
  fi
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
      > "$OUT/train_tiny.md" 2> "$OUT/train.log" || { tail -30 "$OUT/train.log"; failed "train (dry run)"; }
    return
  fi
  for preset in ${TRAIN_PRESETS:-mnist cifar10}; do
    local batch=$([ "$preset" = cifar10 ] && echo 256 || echo 0)  # 0: the preset's (100 for mnist)
    "$PY" benchmarks/train_throughput.py --preset "$preset" --batch "$batch" --steps 30 --device cuda \
      --json "$OUT/train_$preset.json" 2>&1 | tee "$OUT/train_$preset.md" || failed "train $preset"
  done
}

install
case "$PHASE" in
  tests) phase_tests ;;
  bench) bench_part ops test_bench_ops.py; bench_part models test_bench_model.py ;;
  bench-ops) bench_part ops test_bench_ops.py ;;
  bench-models) bench_part models test_bench_model.py ;;
  train) phase_train ;;
  all) phase_tests; bench_part ops test_bench_ops.py; bench_part models test_bench_model.py
       if [ "$DRY" = 1 ]; then phase_train; fi ;;
esac
if [ ${#FAILED[@]} -gt 0 ]; then
  log "done: $OUT; failed: ${FAILED[*]}"
  exit 1
fi
log "done: $OUT"
