#!/usr/bin/env python
"""
Export a libra_d2 (or detectron2) detector for deployment:

* ``--format export`` (default): ``torch.export`` with dynamic height and width (``model.pt2``);
* ``--format aoti``: that program compiled by AOTInductor (``model_aoti.pt2``);
* ``--format onnx``: ONNX (``model.onnx``), by default from that program through the dynamo
  exporter (``--onnx-exporter dynamo``), or by tracing with the TorchScript-based exporter
  (``--onnx-exporter torchscript``, deprecated in torch);
* ``--format torchscript``: ``torch.jit.trace`` (``model.ts``), as detectron2's
  ``tools/deploy/export_model.py --export-method tracing`` does (deprecated in torch).

    ./export_model.py --config-file configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml \\
        --output output/export \\
        MODEL.WEIGHTS output/shapes/libra_faster_rcnn_R_18_FPN/model_final.pth

The ``torch.export`` formats cover Faster, Mask and Cascade (Mask) R-CNN and RetinaNet (Libra and
detectron2's; ``libra_d2/deploy.py``); other models are refused in one line. The model is exported
with one sample image (``--sample-image``; default: the first image of the config's first test
dataset), resized like ``DefaultPredictor`` does. The exported model takes a float32 ``(3, H, W)``
image and returns ``pred_boxes``, ``pred_classes``, ``scores``, mask models ``pred_masks`` (each
detection's 28x28 mask probabilities) and ``image_size``, without the final resize to the original
image size. The saved file is then run in a fresh process that cannot import detectron2,
libra_d2, fvcore or mmdet (``libra_d2/run_exported.py``) on the sample image, on it resized to a
smaller landscape and portrait size, and on an image without detections: one of NaNs
(``export`` and dynamo ``onnx``) or, for ``aoti`` (whose fused ReLUs turn NaN into 0), the
mean image, zero after normalisation (a trained model should detect nothing there); exit status
0 only if every image gives eager inference's number and classes of detections (paired by class,
box and score: detections whose scores nearly tie may swap), boxes and mask probabilities within
``--atol`` and scores within ``--score-atol``; 1 if they differ or the check could not run.
"""

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import warnings

import libra_d2  # noqa: F401  (first: see libra_d2/__init__.py; registers its modules, datasets)

# isort: split
import torch
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

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
from libra_d2.deploy import (
    ONNX_OPSET_DYNAMO,
    compile_aoti,
    eager_detections,
    export_onnx_dynamo,
    export_program,
    output_names,
    unsupported_reason,
)
from libra_d2.export import (
    ONNX_OPSET,
    ExportError,
    check_onnx_opset,
    detections,
    export_onnx,
    export_torchscript,
    preprocess_image,
    run_eager,
)

logger = logging.getLogger("libra_d2.export_model")

FILE_NAMES = {
    "export": "model.pt2",
    "aoti": "model_aoti.pt2",
    "onnx": "model.onnx",
    "torchscript": "model.ts",
}
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libra_d2", "run_exported.py")


def get_parser():
    parser = argparse.ArgumentParser(
        prog="export_model.py",
        description="Export a detector with torch.export, AOTInductor, ONNX or TorchScript.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument(
        "--format",
        choices=sorted(FILE_NAMES),
        default="export",
        help="default: export (torch.export, which torch recommends over deprecated TorchScript)",
    )
    parser.add_argument(
        "--onnx-exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="ONNX from the torch.export program (dynamo: default, torch's default exporter since "
        "2.9) or by tracing (torchscript: deprecated, kept while torch ships it)",
    )
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="image to trace with (default: the first image of the config's first test dataset)",
    )
    parser.add_argument("--output", required=True, help="folder for the exported file")
    parser.add_argument(
        "--opset",
        type=int,
        help=f"ONNX opset (default {ONNX_OPSET}, dynamo {ONNX_OPSET_DYNAMO}); >= 16, dynamo >= 18",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-3,
        help="largest accepted |exported - eager| of boxes (pixels) and mask probabilities "
        "(default: 1e-3)",
    )
    parser.add_argument(
        "--score-atol",
        type=float,
        default=1e-4,
        help="largest accepted |exported - eager| of scores (default: 1e-4)",
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


def check_images(image):
    """The images of the parity check: ``image`` and it resized to 3/4 of its height (landscape)
    and of its width (portrait)."""
    h, w = image.shape[1:]
    sizes = [(round(0.75 * h), w), (h, round(0.75 * w))]
    resize = torch.nn.functional.interpolate
    return [image] + [resize(image[None], size=s, mode="bilinear")[0].round() for s in sizes]


def run_in_fresh_process(fmt, path, images):
    """The outputs of the exported file ``path`` on ``images``, computed by
    ``libra_d2/run_exported.py`` in a new process that cannot import detectron2 or libra_d2, with
    this process's number of threads."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "inputs.pt"), os.path.join(tmp, "outputs.pt")
        torch.save([image.cpu() for image in images], inputs)
        done = subprocess.run(
            [sys.executable, RUNNER, fmt, path, inputs, outputs, str(torch.get_num_threads())],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        return torch.load(outputs)


def instances_of(outputs, names):
    """The ``Instances`` of the outputs of a ``torch.export`` format, named ``names``
    (:func:`libra_d2.deploy.output_names`)."""
    fields = dict(zip(names, outputs))
    instances = Instances(tuple(int(s) for s in fields.pop("image_size")))
    fields["pred_boxes"] = Boxes(fields["pred_boxes"])
    for name, value in fields.items():
        instances.set(name, value)
    return instances


def paired(expected, actual):
    """``actual``'s detections in the order of ``expected``'s, each paired with the one of the
    same class nearest in box and score (detections whose scores nearly tie may come out in either
    order); None if the numbers of detections differ or no one-to-one pairing exists."""
    if len(expected) != len(actual):
        return None
    if len(expected) == 0:
        return actual
    e, a = expected.pred_boxes.tensor.cpu(), actual.pred_boxes.tensor.cpu()
    cost = (e[:, None] - a[None]).abs().amax(-1)
    cost += (expected.scores.cpu()[:, None] - actual.scores.cpu()[None]).abs()
    cost[expected.pred_classes.cpu()[:, None] != actual.pred_classes.cpu()[None]] = float("inf")
    index = cost.argmin(1)
    if len(set(index.tolist())) < len(index) or not cost.gather(1, index[:, None]).isfinite().all():
        return None
    return actual[index]


def max_differences(expected, actual):
    """Max |difference| of boxes and of scores between the detections :func:`paired`; inf if
    they cannot be paired (other numbers or classes of detections)."""
    actual = paired(expected, actual)
    if actual is None:
        return float("inf"), float("inf")
    if len(expected) == 0:
        return 0.0, 0.0
    boxes = (expected.pred_boxes.tensor.cpu() - actual.pred_boxes.tensor.cpu()).abs().max()
    scores = (expected.scores.cpu() - actual.scores.cpu()).abs().max()
    return boxes.item(), scores.item()


def max_mask_difference(expected, actual):
    """Max |difference| of the mask probabilities of the detections :func:`paired`; 0 for
    models without masks or without detections, inf if they cannot be paired."""
    if not expected.has("pred_masks") or len(expected) == 0:
        return 0.0
    actual = paired(expected, actual)
    if actual is None:
        return float("inf")
    return (expected.pred_masks.cpu() - actual.pred_masks.cpu()).abs().max().item()


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for flag, value in (("--atol", args.atol), ("--score-atol", args.score_atol)):
            if not value >= 0:
                raise SetupError(f"{flag} must be >= 0, got {value}")
        if args.format == "onnx" and args.onnx_exporter == "dynamo":
            args.opset = args.opset or ONNX_OPSET_DYNAMO
            if args.opset < ONNX_OPSET_DYNAMO:
                raise SetupError(f"--opset {args.opset}: the dynamo exporter needs >= 18")
        elif args.format == "onnx":
            args.opset = args.opset or ONNX_OPSET
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
    traced = args.format == "torchscript" or (
        args.format == "onnx" and args.onnx_exporter == "torchscript"
    )
    reason = None if traced else unsupported_reason(model)
    if reason:
        parser.exit(2, f"export_model.py: error: --format {args.format}: {reason}\n")
    logger.info(f"Exporting with {sample} (input {tuple(image.shape)})")
    try:
        if args.format == "torchscript":
            _, adapter = export_torchscript(model, image, path)
        elif traced:
            adapter = export_onnx(model, image, path, opset_version=args.opset)
        else:
            pt2 = os.path.join(args.output, FILE_NAMES["export"])
            program, seconds = export_program(model, image, cfg.INPUT.MAX_SIZE_TEST, pt2)
            logger.info(f"torch.export: {seconds:.1f} s, wrote {pt2}")
            if args.format == "aoti":
                logger.info(f"AOTInductor compile: {compile_aoti(program, path):.1f} s")
            elif args.format == "onnx":
                names = output_names(model)
                seconds = export_onnx_dynamo(program, path, names, opset_version=args.opset)
                logger.info(f"ONNX (dynamo) export: {seconds:.1f} s")
    except ExportError as e:
        parser.exit(1, f"export_model.py: error: {e}\n")
    logger.info(f"Wrote {path}")

    images = check_images(image)
    if not traced:  # and an image without detections: NaNs, or for AOTInductor, whose fused
        # ReLUs turn NaN into 0, the mean image (zero after normalisation)
        if args.format == "aoti":
            images.append(model.pixel_mean.to(image).expand_as(image).clone())
        else:
            images.append(torch.full_like(image, float("nan")))
    runtime = "onnx" if args.format == "onnx" else args.format
    try:
        outputs = run_in_fresh_process(runtime, path, images)
    except RuntimeError as e:
        logger.error(f"{path} could not be run without detectron2: {e}")
        return 1
    status = 0
    for image, output in zip(images, outputs):
        if traced:
            expected, actual = run_eager(adapter, image), detections(adapter, output)
        else:
            expected = eager_detections(model, image)
            actual = instances_of(output, output_names(model))
        boxes, scores = max_differences(expected, actual)
        masks = max_mask_difference(expected, actual)
        logger.info(
            f"{path} vs eager at {tuple(image.shape[1:])}: {len(actual)} vs {len(expected)} "
            f"detections, max |boxes diff| = {boxes:.3g}, max |scores diff| = {scores:.3g}"
            + (
                f", max |mask probabilities diff| = {masks:.3g}"
                if expected.has("pred_masks")
                else ""
            )
        )
        if not (boxes <= args.atol and scores <= args.score_atol and masks <= args.atol):
            status = 1
    if status:
        logger.error(
            f"the exported model differs from eager inference by more than --atol {args.atol} "
            f"(boxes, masks) or --score-atol {args.score_atol} (scores)"
        )
    return status


if __name__ == "__main__":
    # TorchScript, and the TorchScript-based ONNX exporter, are formats asked for here: torch's
    # deprecation notices for torch.jit and that exporter are not news to users of this script.
    warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
    # Python-side checks in detectron2's inference code; the exported model is compared with
    # eager inference below, which is what tells whether the trace is right.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    sys.exit(main())
