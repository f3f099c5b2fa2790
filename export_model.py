#!/usr/bin/env python
"""
Export a libra_d2 (or detectron2) detector for deployment, as detectron2's
``tools/deploy/export_model.py --export-method tracing`` does: TorchScript (``model.ts``) or ONNX
(``model.onnx``).

    ./export_model.py --config-file configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml \\
        --format torchscript --output output/export \\
        MODEL.WEIGHTS output/shapes/libra_faster_rcnn_R_18_FPN/model_final.pth

The model is traced on one sample image (``--sample-image``; default: the first image of the
config's first test dataset), resized like ``DefaultPredictor`` does. The exported model takes a
float32 ``(3, H, W)`` image and returns ``pred_boxes``, ``pred_classes``, ``scores`` (mask models:
also ``pred_masks``, each detection's 28x28 mask probabilities) and ``image_size`` without the
final resize to the original image size (see ``libra_d2/export.py``). The saved file is then
loaded back (TorchScript: ``torch.jit.load``; ONNX: onnxruntime) and run on the sample image; exit
status 0 only if it gives the same classes as eager inference and boxes, scores and mask
probabilities within ``--atol``; 1 if they differ or the check could not run (onnxruntime
missing).
"""

import argparse
import logging
import os
import sys
import warnings

import libra_d2  # noqa: F401  (first: see libra_d2/__init__.py; registers its modules, datasets)

# isort: split
import torch
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.modeling import build_model

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
from libra_d2.data import ensure_shapes_dataset, is_shapes_dataset
from libra_d2.export import (
    ONNX_OPSET,
    ExportError,
    check_onnx_opset,
    detections,
    export_onnx,
    export_torchscript,
    preprocess_image,
    run_eager,
    run_onnx,
)

logger = logging.getLogger("libra_d2.export_model")

FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def get_parser():
    parser = argparse.ArgumentParser(
        prog="export_model.py",
        description="Export a detector to TorchScript or ONNX by tracing (detectron2 style).",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--format", choices=sorted(FILE_NAMES), default="torchscript")
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image to trace with (default: the first image of the config's first test dataset)",
    )
    parser.add_argument("--output", required=True, help="folder for model.ts / model.onnx")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset, >= 16")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="largest accepted |exported - eager| of boxes (pixels) and scores (default: 1e-3)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS /path/to/model_final.pth",
    )
    return parser


def default_sample_image(cfg):
    """Path of the first image of ``cfg.DATASETS.TEST[0]``."""
    if not cfg.DATASETS.TEST:
        raise SetupError("the config has no DATASETS.TEST to take a sample image from; give one")
    name, hint = cfg.DATASETS.TEST[0], "or give --sample-image"
    if is_shapes_dataset(name):
        ensure_shapes_dataset()
    if name not in DatasetCatalog:
        raise SetupError(f"test dataset '{name}' is not registered with detectron2; {hint}")
    try:
        dicts = DatasetCatalog.get(name)
    except Exception as e:  # a registered loader may fail in many ways (missing files, bad json)
        raise SetupError(
            f"test dataset '{name}' cannot be loaded ({type(e).__name__}: {e}); {hint}"
        )
    if not dicts:
        raise SetupError(f"test dataset '{name}' has no images; {hint}")
    return dicts[0]["file_name"]


def read_sample(cfg, path):
    """The model input made from the image file ``path`` (see ``preprocess_image``)."""
    check_image(path)
    try:
        image = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
    except Exception as e:  # PIL raises several types for unreadable or truncated files
        raise SetupError(f"'{path}' cannot be read as an image ({type(e).__name__})") from None
    return preprocess_image(cfg, image)


def exported_detections(fmt, path, adapter, image):
    """Detections of the saved file ``path`` on ``image`` (ImportError without onnxruntime)."""
    with torch.no_grad():
        if fmt == "torchscript":
            outputs = torch.jit.load(path, map_location=image.device)(image)
        else:
            outputs = run_onnx(path, image)
    return detections(adapter, outputs)


def max_differences(expected, actual):
    """Max |difference| of boxes and of scores; inf if the numbers or classes of detections
    differ."""
    if len(expected) != len(actual) or not torch.equal(
        expected.pred_classes.cpu(), actual.pred_classes.cpu()
    ):
        return float("inf"), float("inf")
    if len(expected) == 0:
        return 0.0, 0.0
    boxes = (expected.pred_boxes.tensor.cpu() - actual.pred_boxes.tensor.cpu()).abs().max()
    scores = (expected.scores.cpu() - actual.scores.cpu()).abs().max()
    return boxes.item(), scores.item()


def max_mask_difference(expected, actual):
    """Max |difference| of the mask probabilities of detections with the same classes (see
    :func:`max_differences`); 0 for models without masks or without detections."""
    if not expected.has("pred_masks") or len(expected) == 0:
        return 0.0
    return (expected.pred_masks.cpu() - actual.pred_masks.cpu()).abs().max().item()


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not args.atol >= 0:
            raise SetupError(f"--atol must be >= 0, got {args.atol}")
        if args.format == "onnx":
            check_onnx_opset(args.opset)
        cfg = load_config(args.config_file, args.opts or [])
        check_device(cfg.MODEL.DEVICE)
        check_output_dir(args.output, "--output")
        check_weights(cfg.MODEL.WEIGHTS)
        check_model(cfg)
        cfg.freeze()
        sample = args.sample_image or default_sample_image(cfg)
        image = read_sample(cfg, sample)
        model = build_model(cfg)
    except (SetupError, ExportError) as e:
        parser.exit(2, f"export_model.py: error: {e}\n")

    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    LibraCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    image = image.to(model.device)
    path = os.path.join(args.output, FILE_NAMES[args.format])
    logger.info(f"Tracing on {sample} (input {tuple(image.shape)})")
    try:
        if args.format == "torchscript":
            _, adapter = export_torchscript(model, image, path)
        else:
            adapter = export_onnx(model, image, path, opset_version=args.opset)
    except ExportError as e:
        parser.exit(1, f"export_model.py: error: {e}\n")
    logger.info(f"Wrote {path}")

    expected = run_eager(adapter, image)
    try:
        actual = exported_detections(args.format, path, adapter, image)
    except ImportError:
        logger.error(f"{path} was not compared with eager inference: install onnxruntime")
        return 1
    boxes, scores = max_differences(expected, actual)
    masks = max_mask_difference(expected, actual) if boxes < float("inf") else float("inf")
    logger.info(
        f"{path} vs eager on {sample}: {len(actual)} vs {len(expected)} detections, "
        f"max |boxes diff| = {boxes:.3g}, max |scores diff| = {scores:.3g}"
        + (f", max |mask probabilities diff| = {masks:.3g}" if expected.has("pred_masks") else "")
    )
    if not (boxes <= args.atol and scores <= args.atol and masks <= args.atol):
        logger.error(f"the exported model differs from eager inference by more than {args.atol}")
        return 1
    return 0


if __name__ == "__main__":
    # TorchScript, and the TorchScript-based ONNX exporter, are formats asked for here: torch's
    # deprecation notices for torch.jit and that exporter are not news to users of this script.
    warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
    # Python-side checks in detectron2's inference code; the exported model is compared with
    # eager inference below, which is what tells whether the trace is right.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    sys.exit(main())
