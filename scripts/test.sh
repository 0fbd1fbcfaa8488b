#!/usr/bin/env bash
# The whole test suite from nothing: set up, lint, C++ unit tests (ctest), pytest (tests and every
# benchmark once in quick mode), the static sm_90 kernel report and the GPU check's CPU dry run.
# Real-MNIST tests use $MATNET_DATA_DIR, else ../shared/datasets when present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MATNET_DATA_DIR:-}" ] && [ -d ../shared/datasets ]; then
  export MATNET_DATA_DIR=$(cd ../shared/datasets && pwd)
fi
.venv/bin/ruff check .
if [ -f CMakeLists.txt ] && command -v cmake >/dev/null; then
  TORCH_PREFIX=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
  cmake -S . -B build/cpp -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/cpp -j2 >/dev/null
  ctest --test-dir build/cpp --output-on-failure
fi
targets="tests"
[ -d benchmarks ] && ls benchmarks/test_*.py >/dev/null 2>&1 && targets="tests benchmarks"
.venv/bin/python -m pytest $targets -q --benchmark-disable "$@"
# the static sm_90 report of every Triton kernel config: fails on spills, shared memory over the H100's, or a
# bf16/fp16 convolution without wgmma (no GPU needed)
mkdir -p build
.venv/bin/python benchmarks/kernel_report.py --arch sm_90 --json build/kernel_report_sm90.json --markdown \
  > build/kernel_report_sm90.md
# the GPU check's CPU dry run, so that scripts/gpu_check.sh cannot rot
PYTHON=.venv/bin/python bash scripts/gpu_check.sh build/gpu_check_dry_run --dry-run --tar build/gpu_check_dry_run.tar.gz
tar xzOf build/gpu_check_dry_run.tar.gz gpu_check_dry_run/environment.txt > /dev/null  # --tar packed the reports
