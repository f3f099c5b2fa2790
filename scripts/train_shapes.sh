#!/usr/bin/env bash
# Main job: install what is missing into .venv, then train Libra R-CNN on the built-in libra_shapes
# dataset on the CPU and evaluate it with detectron2's COCOEvaluator (prints the AP table).
# Extra arguments are passed to train_net.py, e.g. `bash scripts/train_shapes.sh SOLVER.MAX_ITER 100`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
CONFIG="${CONFIG:-configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml}"
exec .venv/bin/python train_net.py --config-file "$CONFIG" "$@"
