#!/usr/bin/env bash
# The GPU check: on a machine whose python3 already has a CUDA build of torch and Triton (and nvcc),
# with no package registry and no ruff. Writes everything into OUT_DIR (default runs/gpu_check).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--phase quick|tests|bench|bench-ops|bench-models|train|run10|all] [--dry-run]
#       [--tar FILE]
#
# --tar FILE: at the end, also when a part failed or the script stopped, pack OUT_DIR into FILE (.tar.gz): all the
#   reports in one file, for taking them off the machine.
#
# Each phase is meant to fit one 10-minute call; a phase that fails is reported and the next one still runs,
# and the script exits 1 at the end if any did.
# Phase "quick" (the first call on a GPU when device time is short): the whole check in QUICK_SECONDS (default
#   510, counted from the start of the script, the install included; each of the 5 parts may run 10 s over its
#   share, so allow QUICK_SECONDS + 60 s), each part cut off at its share of the time the install leaves, so that
#   a call that runs out still returns what finished: the CUDA tests alone (tests_cuda.log; 45%), the headline kernel benchmarks (the
#   residual block's forward + backward in bf16 channels_last on the CIFAR shapes against eager cuDNN and
#   torch.compile of the reference, and the memory-bound ops at their largest shapes: bench_quick_*.json, .md;
#   30%), then with MATNET_DATA_DIR the cifar10 training step at batch TRAIN_BATCH (default 256): reference ops
#   fp32 eager, then bf16 channels_last with fused and reference ops, eager and compiled (train_quick.md and
#   .json; the rest of the time; skipped without MATNET_DATA_DIR).
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
#   each preset of TRAIN_PRESETS (default "mnist cifar10"; one preset per call keeps a call short), cifar10 at
#   global batch TRAIN_BATCH (default 256): train_PRESET.md and .json.
# Phase "run10" (not in "all"; needs MATNET_DATA_DIR): the "cifar10" preset trained on one GPU for RUN_MINUTES
#   (default 6, leaving a 10-minute call room for the install and the evaluation; 10 is the goal where a
#   call allows it) or RUN_STEPS (default 4000) steps, whichever ends first (batch RUN_BATCH, default 512, sqrt LR
#   rule, 500 warm-up steps, bf16, channels_last), then its test bits/dim (ELBO on all 10,000 images, IWAE
#   k=100 on the first 1,000): run10/ (checkpoint, samples.png, kl_per_module.png), run10_train.log and
#   run10_eval.json.
# Data: MATNET_DATA_DIR holds mnist/ and either cifar-10-batches-py/ or the JPEG copy's
#   cifar-10-jpeg/cifar10-jpeg.zip with its to_cifar_batches.py, decoded into MATNET_DATA_DIR on first use.
# --dry-run (CI, on a CPU machine): the same steps with CPU stand-ins (no CUDA build or asserts, test
#   collection only, one CPU benchmark of each part in quick mode, one 3-step training run), so that the
#   script cannot rot.
# Environment: PYTHON (default python3), MATNET_DATA_DIR, QUICK_SECONDS, TRAIN_PRESETS, TRAIN_BATCH, BENCH_MAX_TIME,
#   RUN_MINUTES, RUN_STEPS, RUN_BATCH.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check
PHASE=all
DRY=0
TAR=
while [ $# -gt 0 ]; do
  case "$1" in
    --phase) PHASE=${2:?--phase needs a phase}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --tar) TAR=${2:?--tar needs a file}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/!p}' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
case "$PHASE" in quick|tests|bench|bench-ops|bench-models|train|run10|all) ;;
  *) echo "gpu_check.sh: --phase must be quick, tests, bench, bench-ops, bench-models, train, run10 or all" >&2
     exit 2 ;;
esac
[[ "${QUICK_SECONDS:-510}" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: QUICK_SECONDS must be whole seconds" >&2
                                                    exit 2; }
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
if [ -n "$TAR" ]; then
  [ -d "$(dirname "$TAR")" ] && [ ! -d "$TAR" ] || { echo "gpu_check.sh: --tar $TAR: give a file in an existing folder" >&2
                                                    exit 2; }
  TAR=$(cd "$(dirname "$TAR")" && pwd)/$(basename "$TAR")
  case "$TAR" in "$OUT"/*) echo "gpu_check.sh: --tar $TAR is inside OUT_DIR $OUT; give a file outside it" >&2
                           exit 2 ;; esac
  rm -f "$TAR"  # a failed packing must not leave an older run's file in its place
  trap 'tar czf "$TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")" && log "packed $OUT into $TAR"' EXIT
fi
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
  local par=() dry=() part sel
  "$PY" -c "import xdist" 2>/dev/null && par=(-n 8 --dist loadfile)
  [ "$DRY" = 1 ] && dry=(--collect-only)  # the dry run collects with the same command
  # the interpreter is for CPU machines: kernels here must run compiled. The CUDA tests come first, so
  # that a call that runs out of time has run the ones only a GPU can.
  for part in cuda rest; do
    sel="cuda"; [ "$part" = rest ] && sel="not cuda"
    rm -f "$OUT/tests_$part.xml" "$OUT/tests_$part.log"
    local cmd=(env -u TRITON_INTERPRET "MATNET_REQUIRE_CUDA=$((1 - DRY))" "$PY" -m pytest tests -q -p no:cacheprovider
               "${par[@]}" "${dry[@]}" -k "$sel" --junitxml="$OUT/tests_$part.xml")
    if [ "$DRY" = 1 ]; then
      "${cmd[@]}" > "$OUT/tests_$part.log" 2>&1 || { tail -30 "$OUT/tests_$part.log"; failed "tests ($part)"; }
      tail -1 "$OUT/tests_$part.log"
    else
      "${cmd[@]}" 2>&1 | tee "$OUT/tests_$part.log" || failed "tests ($part)"
    fi
  done
}

bench_part() {  # bench_part NAME FILE: the CUDA cases of benchmarks/FILE -> bench_NAME.{json,md}
  local name=$1 file=$2 json="$OUT/bench_$1.json"
  log "phase bench-$name"
  rm -f "$json" "$OUT/bench_$name.md"  # a part cut off before pytest writes its JSON leaves none
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

have_data() {  # have_data PHASE: MATNET_DATA_DIR is set (the dry run skips the phase without it)
  if [ -z "${MATNET_DATA_DIR:-}" ]; then
    [ "$DRY" = 1 ] && { log "phase $1: no MATNET_DATA_DIR, skipped in the dry run"; return 1; }
    echo "gpu_check.sh: phase $1 needs MATNET_DATA_DIR (the folder with the mnist and cifar-10 data)" >&2
    exit 2
  fi
  local zip="$MATNET_DATA_DIR/cifar-10-jpeg/cifar10-jpeg.zip"
  if [ "$DRY" = 0 ] && [ ! -d "$MATNET_DATA_DIR/cifar-10-batches-py" ] && [ -f "$zip" ]; then
    log "decoding $zip into $MATNET_DATA_DIR/cifar-10-batches-py"
    "$PY" "$MATNET_DATA_DIR/cifar-10-jpeg/to_cifar_batches.py" "$MATNET_DATA_DIR" || failed "decoding CIFAR-10"
  fi
}

phase_train() {
  log "phase train"
  have_data train || return 0
  if [ "$DRY" = 1 ]; then
    "$PY" benchmarks/train_throughput.py --preset tiny --steps 3 --only 1 --threads 1 --device cpu \
      > "$OUT/train_tiny.md" 2> "$OUT/train.log" || { tail -30 "$OUT/train.log"; failed "train (dry run)"; }
    return
  fi
  for preset in ${TRAIN_PRESETS:-mnist cifar10}; do
    local batch=$([ "$preset" = cifar10 ] && echo "${TRAIN_BATCH:-256}" || echo 0)  # 0: the preset's (100 for mnist)
    rm -f "$OUT/train_$preset.json"
    "$PY" benchmarks/train_throughput.py --preset "$preset" --batch "$batch" --steps 30 --device cuda \
      --timeout 300 --json "$OUT/train_$preset.json" 2>&1 | tee "$OUT/train_$preset.md" || failed "train $preset"
  done
}

phase_run10() {
  log "phase run10"
  have_data run10 || return 0
  local run="$OUT/run10" rc=0
  rm -f "$OUT/run10_eval.json"
  if [ "$DRY" = 1 ]; then  # the same two commands on a tiny MNIST model
    "$PY" -m matnet train --preset tiny --data-dir "$MATNET_DATA_DIR" --out "$run" --no-resume --device cpu --steps 3 \
      --batch-size 8 --eval-every 0 --no-progress --threads 1 > "$OUT/run10_train.log" 2>&1 || rc=$?
    [ $rc = 0 ] && "$PY" -m matnet eval "$run/checkpoint.pt" --data-dir "$MATNET_DATA_DIR" --device cpu --k 2 \
      --n-images 8 --iwae-images 2 --threads 1 --out "$OUT/run10_eval.json" >> "$OUT/run10_train.log" 2>&1 || rc=$?
    [ $rc = 0 ] || { tail -30 "$OUT/run10_train.log"; failed "run10 (dry run)"; }
    return 0
  fi
  # exit 5: stopped by --time-limit after writing its checkpoint, the expected end of this phase
  "$PY" -m matnet train --preset cifar10 --data-dir "$MATNET_DATA_DIR" --out "$run" --no-resume --device cuda \
    --batch-size "${RUN_BATCH:-512}" --lr-scaling sqrt --warmup-steps 500 --precision bf16 --channels-last \
    --steps "${RUN_STEPS:-4000}" --time-limit "${RUN_MINUTES:-6}" --eval-every 0 --log-every 100 --no-progress \
    2>&1 | tee "$OUT/run10_train.log" || rc=$?
  if [ $rc != 0 ] && [ $rc != 5 ]; then failed "run10 training (exit $rc)"; return 0; fi
  "$PY" -m matnet eval "$run/checkpoint.pt" --data-dir "$MATNET_DATA_DIR" --device cuda --k 100 \
    --iwae-images 1000 --out "$OUT/run10_eval.json" 2>&1 | tee -a "$OUT/run10_train.log" || failed "run10 eval"
}

capped() {  # capped SECONDS CMD...: CMD, interrupted by SIGINT after SECONDS (killed 10 s later); exit 124 or 137
  # when cut off. pytest still writes its reports on SIGINT, but pytest-benchmark writes no JSON when the cut
  # lands inside a case's first round: hence benchmark parts of their own, so that one cut costs one part.
  local secs=$1; shift
  [ "$secs" -gt 0 ] || { log "no time left for: $*"; return 124; }
  timeout -s INT -k 10 "$secs" "$@"
}

phase_quick() {
  log "phase quick"
  # the budget counts from the script's start (SECONDS), the install included, when quick runs alone
  local budget=${QUICK_SECONDS:-510} t0=0 rc
  [ "$PHASE" = quick ] || t0=$SECONDS
  left() { echo $((budget - (SECONDS - t0))); }
  local avail
  avail=$(left)
  local cmd=(env -u TRITON_INTERPRET "MATNET_REQUIRE_CUDA=$((1 - DRY))" "$PY" -m pytest tests -q -p no:cacheprovider
             -k cuda --junitxml="$OUT/tests_cuda.xml")
  [ "$DRY" = 1 ] && cmd+=(--collect-only)
  "$PY" -c "import xdist" 2>/dev/null && cmd+=(-n 8 --dist loadfile)
  rc=0; capped $((avail * 45 / 100)) "${cmd[@]}" > "$OUT/tests_cuda.log" 2>&1 || rc=$?
  tail -3 "$OUT/tests_cuda.log"
  [ $rc = 0 ] || failed "quick: CUDA tests (exit $rc; 124 or 137: cut off)"

  # the residual block in bf16 channels_last on the CIFAR shapes, eager; the memory-bound ops at their IWAE
  # shapes; torch.compile of the residual block last (a compile per case): a cut-off drops it first
  local part k jsons=() until=$((SECONDS + avail * 30 / 100))
  local block="residual_conv_block and fwdbwd and bf16 and cifar10 and cl"
  rm -f "$OUT"/bench_quick* "$OUT"/train_quick*
  for part in block memory compiled; do
    local json="$OUT/bench_quick_$part.json"
    case $part in
      block) k="cuda and $block and not compiled" ;;
      memory) k="cuda and bf16 and iwae and not residual" ;;
      compiled) k="cuda and $block and compiled" ;;
    esac
    if [ "$DRY" = 1 ]; then  # the same three parts at one CPU shape (quick mode skips the compiled cases)
      case $part in
        block) k="residual_conv_block and not compiled" ;;
        memory) k="gaussian_sample_kl" ;;
        compiled) k="residual_conv_block and compiled" ;;
      esac
      k="cpu and mnist-7x7 and fwdbwd and $k"
    fi
    rc=0; MATNET_BENCH_QUICK=$DRY capped "$(( until - SECONDS < $(left) ? until - SECONDS : $(left) ))" \
      "$PY" -m pytest benchmarks/test_bench_ops.py -q -p no:cacheprovider --benchmark-only -k "$k" \
      --benchmark-max-time="${BENCH_MAX_TIME:-0.1}" --benchmark-json="$json" > "$OUT/bench_quick_$part.log" 2>&1 \
      || rc=$?
    [ $rc = 0 ] || [ $rc = 5 ] || { tail -5 "$OUT/bench_quick_$part.log"  # 5: nothing selected (dry run)
                     failed "quick: $part benchmarks (exit $rc; 124 or 137: cut off)"; }
    [ -s "$json" ] && jsons+=("$json")
  done
  if [ ${#jsons[@]} -gt 0 ]; then
    "$PY" benchmarks/report.py "${jsons[@]}" --markdown | tee "$OUT/bench_quick.md" || failed "quick: benchmark report"
  fi

  [ -n "${MATNET_DATA_DIR:-}" ] || { log "no MATNET_DATA_DIR: the training step is skipped"; return 0; }
  have_data quick || return 0
  # reference fp32 eager (the baseline of the table), then fused and reference bf16 channels_last, eager before
  # compiled: the cut-off drops the compiled ones first (the JSON is written after each setting)
  local train=(--preset cifar10 --batch "${TRAIN_BATCH:-256}" --steps 20 --device cuda --only 1,6,2,7,3
               --timeout 150 --json "$OUT/train_quick.json")
  [ "$DRY" = 1 ] && train=(--preset tiny --steps 3 --only 1 --threads 1 --device cpu)
  rc=0; capped "$(left)" "$PY" benchmarks/train_throughput.py "${train[@]}" > "$OUT/train_quick.md" \
    2> "$OUT/train_quick.log" || rc=$?
  cat "$OUT/train_quick.md"
  [ -s "$OUT/train_quick.md" ] || cat "$OUT/train_quick.log"  # cut off before its table: the settings that ran
  [ $rc = 0 ] || { tail -5 "$OUT/train_quick.log"; failed "quick: training step (exit $rc; 124 or 137: cut off)"; }
}

install
case "$PHASE" in
  quick) phase_quick ;;
  tests) phase_tests ;;
  bench) bench_part ops test_bench_ops.py; bench_part models test_bench_model.py ;;
  bench-ops) bench_part ops test_bench_ops.py ;;
  bench-models) bench_part models test_bench_model.py ;;
  train) phase_train ;;
  run10) phase_run10 ;;
  all) phase_tests; bench_part ops test_bench_ops.py; bench_part models test_bench_model.py
       if [ "$DRY" = 1 ]; then phase_train; phase_run10; phase_quick; fi ;;
esac
if [ ${#FAILED[@]} -gt 0 ]; then
  log "done: $OUT; failed: ${FAILED[*]}"
  exit 1
fi
log "done: $OUT"
