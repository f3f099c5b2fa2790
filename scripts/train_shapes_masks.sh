#!/usr/bin/env bash
# Train and evaluate the four instance-segmentation configs on libra_shapes (baseline / Libra Mask
# R-CNN and Cascade Mask R-CNN), one run at a time, for the seeds given (default: 1 2), on the
# configs' CPU schedule (800 iterations of 4 images, as the Faster R-CNN runs).
# Outputs: output/shapes_masks/<config>_seed<s>/.
# $CONFIGS picks some of the configs; extra train_net.py overrides come from $OPTS.
# Two seeds side by side on 2 cores: OMP_NUM_THREADS=1 bash scripts/train_shapes_masks.sh 1 & (and 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SEEDS=("${@:-1 2}")
mkdir -p output/shapes_masks
for seed in ${SEEDS[*]}; do
  for cfg in ${CONFIGS:-mask_rcnn_R_18_FPN libra_mask_rcnn_R_18_FPN cascade_mask_rcnn_R_18_FPN \
    libra_cascade_mask_rcnn_R_18_FPN}; do
    out="output/shapes_masks/${cfg}_seed${seed}"
    [ -f "$out/model_final.pth" ] && continue
    .venv/bin/python train_net.py --config-file "configs/libra_shapes/$cfg.yaml" SEED "$seed" \
      ${OPTS:-} OUTPUT_DIR "$out" > "$out.log" 2>&1 || echo "failed: $out"
  done
done
