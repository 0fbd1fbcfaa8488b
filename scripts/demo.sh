#!/usr/bin/env bash
# The main job: set up, then train a MatNet briefly and write its figures.
#   data: $MATNET_DATA_DIR if set (with DATASET=mnist|fashion-mnist|...), else Fashion-MNIST
#         from Debian's dataset-fashion-mnist package (installed here if missing).
#   outputs: $OUT (default runs/demo): nll.png, samples.png, kl_per_module.png, metrics.jsonl, checkpoint.pt
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MATNET_DATA_DIR:-}" ]; then
  DATASET=${DATASET:-fashion-mnist}
  FM=/usr/share/datasets/fashion-mnist
  if [ ! -f "$FM/train-images-idx3-ubyte.gz" ]; then
    echo "installing Debian's dataset-fashion-mnist..."
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
  export MATNET_DATA_DIR=$FM
fi
DATASET=${DATASET:-mnist}
OUT=${OUT:-runs/demo}
.venv/bin/matnet train --preset "${PRESET:-mnist}" --dataset "$DATASET" --out "$OUT" \
  --steps "${STEPS:-300}" --eval-every "${STEPS:-300}" --iwae-k 100 --iwae-images 100 --no-resume "$@"
echo "demo done: see $OUT/nll.png $OUT/samples.png $OUT/kl_per_module.png"
