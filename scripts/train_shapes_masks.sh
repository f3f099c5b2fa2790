#!/usr/bin/env bash
# Train and evaluate the four instance-segmentation configs on libra_shapes (baseline / Libra Mask
# R-CNN and Cascade Mask R-CNN), one run at a time, for the seeds given (default: 1 2), on the
# shortened CPU schedule of docs/BENCHMARKS.md (200 iterations of 4 images, no lr decay).
# Outputs: output/shapes_masks/<config>_seed<s>/.
# $CONFIGS picks some of the configs; extra train_net.py overrides come from $OPTS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEEDS=("${@:-1 2}")
for seed in ${SEEDS[*]}; do
  for cfg in ${CONFIGS:-mask_rcnn_R_18_FPN libra_mask_rcnn_R_18_FPN cascade_mask_rcnn_R_18_FPN \
    libra_cascade_mask_rcnn_R_18_FPN}; do
    out="output/shapes_masks/${cfg}_seed${seed}"
    [ -f "$out/model_final.pth" ] && continue
    .venv/bin/python train_net.py --config-file "configs/libra_shapes/$cfg.yaml" SEED "$seed" \
      SOLVER.MAX_ITER 200 SOLVER.STEPS "()" SOLVER.CHECKPOINT_PERIOD 100 \
      ${OPTS:-} OUTPUT_DIR "$out" > "$out.log" 2>&1 || echo "failed: $out"
  done
done
