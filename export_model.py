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
float32 ``(3, H, W)`` image and returns ``pred_boxes``, ``pred_classes``, ``scores`` and
``image_size`` without the final resize to the original image size (see ``libra_d2/export.py``).
The saved file is then loaded back and run on the sample image (TorchScript: ``torch.jit.load``;
ONNX: onnxruntime, or only ``onnx.checker`` if onnxruntime is not installed), and the maximum
absolute differences of its boxes and scores from eager inference are logged; the exit status is
1 if they exceed ``--atol``.
"""

import argparse
import logging
import os
import sys
import warnings

import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import libra_d2  # noqa: F401  (registers the libra_d2 modules and the libra_shapes datasets)
from libra_d2.checkpoint import LibraCheckpointer
from libra_d2.checks import SetupError, check_weights, load_config
from libra_d2.data import ensure_shapes_dataset, is_shapes_dataset
from libra_d2.export import (
    MIN_ONNX_OPSET,
    ONNX_OPSET,
    ExportError,
    compare_detections,
    export_onnx,
    export_torchscript,
    preprocess_image,
    read_image,
    run_eager,
    run_onnx,
    run_torchscript,
)

logger = logging.getLogger("libra_d2.export_model")

FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def get_parser():
    parser = argparse.ArgumentParser(
        prog="export_model.py",
        description="Export a detector to TorchScript or ONNX by tracing (detectron2 style).",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument(
        "--format", choices=sorted(FILE_NAMES), default="torchscript", help="output format"
    )
    parser.add_argument(
        "--sample-image",
        default=None,
        metavar="FILE",
        help="image to trace with (default: the first image of the config's first test dataset)",
    )
    parser.add_argument("--output", required=True, help="folder for model.ts / model.onnx")
    parser.add_argument(
        "--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset, >= 16 (default: {ONNX_OPSET})"
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="largest accepted |exported - eager| of boxes (pixels) and scores (default: 1e-3)",
    )
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS /path/to/model_final.pth",
    )
    return parser


def setup_cfg(args):
    """The frozen config of ``args``, after checking the weights file and the device."""
    cfg = load_config(args.config_file, args.opts or [])
    cfg.freeze()
    check_weights(cfg.MODEL.WEIGHTS)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(
            f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' but CUDA is not available; add MODEL.DEVICE cpu"
        )
    return cfg


def default_sample_image(cfg):
    """Path of the first image of ``cfg.DATASETS.TEST[0]``."""
    if not cfg.DATASETS.TEST:
        raise SetupError("the config has no DATASETS.TEST to take a sample image from; give one")
    name = cfg.DATASETS.TEST[0]
    hint = "or give --sample-image"
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


def check_export(fmt, path, adapter, image, expected):
    """
    Run the exported file on ``image`` and compare it with the eager detections ``expected``.

    Returns:
        dict or None: :func:`libra_d2.export.compare_detections`; None when the ONNX file could
        only be checked structurally (onnxruntime missing).
    """
    if fmt == "torchscript":
        actual = run_torchscript(torch.jit.load(path, map_location=image.device), adapter, image)
    else:
        try:
            actual = run_onnx(path, adapter, image)
        except ImportError:
            try:
                import onnx
            except ImportError:
                logger.warning(f"{path} not checked: neither onnxruntime nor onnx is installed")
                return None
            onnx.checker.check_model(path)
            logger.info(f"{path} passes onnx.checker (install onnxruntime to run it)")
            return None
    return compare_detections(expected, actual)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not args.atol >= 0:
            raise SetupError(f"--atol must be >= 0, got {args.atol}")
        if args.format == "onnx" and args.opset < MIN_ONNX_OPSET:
            raise SetupError(
                f"--opset {args.opset} is too old: torchvision exports ROIAlign(aligned=True) "
                f"from opset {MIN_ONNX_OPSET} on"
            )
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise SetupError(f"--output '{args.output}' is a file, not a folder")
        cfg = setup_cfg(args)
        sample = args.sample_image or default_sample_image(cfg)
        image = preprocess_image(cfg, read_image(sample, cfg.INPUT.FORMAT))
        os.makedirs(args.output, exist_ok=True)
    except (SetupError, ExportError) as e:
        parser.exit(2, f"export_model.py: error: {e}\n")
    except OSError as e:  # --output cannot be created
        parser.exit(2, f"export_model.py: error: --output '{args.output}': {e.strerror}\n")

    try:
        model = build_model(cfg)
    except ValueError as e:  # a libra_d2 module rejected its config keys
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
    expected = run_eager(adapter, image)
    fields = sorted(expected.get_fields().items())
    shapes = ", ".join(f"{k} {tuple(getattr(v, 'tensor', v).shape)}" for k, v in fields)
    logger.info(f"Wrote {path}: input image {tuple(image.shape)}, outputs {shapes}, image_size")

    diff = check_export(args.format, path, adapter, image, expected)
    if diff is None:
        return 0
    logger.info(
        f"{path} vs eager on {sample}: {diff['num_actual']} vs {diff['num_expected']} detections, "
        f"max |boxes diff| = {diff['boxes']:.3g}, max |scores diff| = {diff['scores']:.3g}"
    )
    if not (diff["boxes"] <= args.atol and diff["scores"] <= args.atol):
        logger.error(f"the exported model differs from eager inference by more than {args.atol}")
        return 1
    return 0


if __name__ == "__main__":
    # TorchScript is the format asked for: its deprecation notices are not news here.
    warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
    sys.exit(main())
