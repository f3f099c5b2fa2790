#!/usr/bin/env python
"""
Run a libra_d2 (or any detectron2) detector on images and save the drawn detections.

    python demo.py --config-file configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml \\
        --input datasets/libra_shapes/val/images/00000*.png --output output/demo \\
        --opts MODEL.WEIGHTS output/shapes/libra_faster_rcnn_R_18_FPN/model_final.pth

Each input (a file or a glob pattern; several may be given) is written as ``<output>/<name>.png``
with the detections above ``--confidence-threshold`` drawn by detectron2's ``Visualizer``, with the
class names of the config's first test dataset. Before the model is built, every input must be
an existing image file, the config, ``MODEL.DEVICE``, ``MODEL.WEIGHTS`` and ``--output`` must be
usable (``libra_d2.checks``); a mistake is reported in one line (exit status 2). An image
whose data turns out unreadable while running is skipped with a warning; the exit status is 0 if
at least one image was written.
"""

import argparse
import glob
import logging
import os
import sys
import time

import libra_d2  # noqa: F401  (first: see libra_d2/__init__.py; registers its modules, datasets)

# isort: split
import cv2
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer

from libra_d2.checkpoint import LibraCheckpointer
from libra_d2.checks import (
    SetupError,
    check_device,
    check_image,
    check_model,
    check_output_dir,
    check_weights,
    load_config,
)

logger = logging.getLogger("libra_d2.demo")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="demo.py",
        description="Draw a detector's detections on images (detectron2 DefaultPredictor).",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files or glob patterns (quote them)"
    )
    parser.add_argument("--output", required=True, help="folder for the drawn images")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the detections to draw (default: 0.5)",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu",
    )
    return parser


def setup_cfg(args):
    """The config with the libra keys, the overrides and the confidence threshold, frozen, after
    the pre-flight checks of what the demo needs (no datasets: only their class names are used).
    """
    cfg = load_config(args.config_file, args.opts)
    check_device(cfg.MODEL.DEVICE)
    check_output_dir(args.output, "--output")
    check_weights(cfg.MODEL.WEIGHTS)
    check_model(cfg)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def expand_inputs(patterns):
    """Files named by ``patterns`` in order (globs expanded, sorted); unmatched ones kept as is."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        paths.extend(matches if matches else [pattern])
    return paths


def output_path(output_dir, path, used):
    """``<output_dir>/<input name>.png``, with a suffix if two inputs share a name."""
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return os.path.join(output_dir, name + ".png")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = setup_cfg(args)
        inputs = expand_inputs(args.input)
        for path in inputs:
            check_image(path)
    except SetupError as e:
        parser.exit(2, f"demo.py: error: {e}\n")
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: the detector is randomly initialised")
    # DefaultPredictor's own checkpointer neither vets nor converts (mmdetection) checkpoints.
    predictor_cfg = cfg.clone()
    predictor_cfg.defrost()
    predictor_cfg.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(predictor_cfg)
    if cfg.MODEL.WEIGHTS:
        LibraCheckpointer(predictor.model).load(cfg.MODEL.WEIGHTS)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")

    done, used = 0, set()
    for path in inputs:
        image = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR, as DefaultPredictor expects
        if image is None:
            logger.warning(f"{path}: cannot be read as an image, skipped")
            continue
        start = time.perf_counter()
        instances = predictor(image)["instances"].to("cpu")
        elapsed = time.perf_counter() - start
        visualizer = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
        drawn = visualizer.draw_instance_predictions(predictions=instances).get_image()
        out = output_path(args.output, path, used)
        if not cv2.imwrite(out, drawn[:, :, ::-1]):
            logger.warning(f"{path}: could not write {out}")
            continue
        logger.info(f"{path}: {len(instances)} detections in {elapsed:.2f} s -> {out}")
        done += 1
    if done == 0:
        logger.error("no image was processed")
        return 1
    logger.info(f"{done} image(s) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
