#!/usr/bin/env python
"""
IoU distribution of the negatives picked by random vs IoU-balanced sampling (Libra R-CNN, Fig. 2).

For ``--num-images`` images of a registered dataset, the model's RPN proposes boxes as during
training (``POST_NMS_TOPK_TRAIN`` proposals, from the checkpoint in ``MODEL.WEIGHTS``); the
proposals are matched to the ground truth as detectron2's ROI heads do (ground-truth boxes appended
as proposals, ``pairwise_iou``, the ROI heads' ``Matcher``; a proposal's IoU is its maximum over
the ground truth). Then the negatives are sampled both with detectron2's ``subsample_labels``
(random) and with :func:`~libra_d2.modeling.iou_balanced_subsample` (``MODEL.ROI_HEADS.
BATCH_SIZE_PER_IMAGE``, ``POSITIVE_FRACTION`` and ``IOU_BALANCED`` of the config), and the IoU
histograms of the picked negatives are drawn next to that of all negatives, with the share of
hard negatives (IoU > 0.05) of each.

Example::

    python benchmarks/plot_sampling.py \\
        --config-file configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml \\
        --num-images 50 --output sampling_iou.png \\
        MODEL.WEIGHTS output/shapes/libra_faster_rcnn_R_18_FPN/model_final.pth
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The libra_shapes splits live in the repository's datasets/ folder unless told otherwise
# (must be set before libra_d2 registers them).
os.environ.setdefault("DETECTRON2_DATASETS", str(ROOT / "datasets"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.matcher import Matcher  # noqa: E402
from detectron2.modeling.proposal_generator.proposal_utils import (  # noqa: E402
    add_ground_truth_to_proposals,
)
from detectron2.modeling.sampling import subsample_labels  # noqa: E402
from detectron2.structures import pairwise_iou  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from libra_d2.checkpoint import LibraCheckpointer  # noqa: E402
from libra_d2.checks import SetupError, check_weights, load_config  # noqa: E402
from libra_d2.data import ensure_shapes_dataset, is_shapes_dataset  # noqa: E402
from libra_d2.modeling import iou_balanced_subsample  # noqa: E402
from libra_d2.modeling.roi_heads import proposal_labels  # noqa: E402

logger = logging.getLogger("libra_d2.plot_sampling")

DEFAULT_CONFIG = "configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml"
HARD_IOU = 0.05  # the paper's threshold for "hard" negatives
METHODS = ("all negatives", "random sampling", "IoU-balanced sampling")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="plot_sampling.py",
        description="Histogram of the IoU of negatives picked by random vs IoU-balanced sampling "
        "(Libra R-CNN, Figure 2) on a model's RPN proposals.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config-file", default=DEFAULT_CONFIG, metavar="FILE", help="model config"
    )
    parser.add_argument("--dataset", default="libra_shapes_val", help="registered dataset name")
    parser.add_argument("--num-images", type=_positive_int, default=50)
    parser.add_argument("--output", default="sampling_iou.png", help="PNG to write")
    parser.add_argument("--json", default=None, help="also write the histograms and shares here")
    parser.add_argument("--bin-width", type=float, default=0.05, help="histogram bin width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS path/to/model_final.pth",
    )
    return parser


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def load_model(cfg):
    """The model of ``cfg`` with ``MODEL.WEIGHTS`` loaded (random init, with a warning, if none)."""
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        check_weights(cfg.MODEL.WEIGHTS)
        LibraCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning(
            "MODEL.WEIGHTS is empty: the proposals come from a randomly initialised RPN; pass "
            "MODEL.WEIGHTS path/to/model_final.pth to see a trained model's proposals"
        )
    model.eval()
    return model


def load_images(cfg, dataset, num_images):
    """The first ``num_images`` images of ``dataset`` with ground truth, mapped for testing."""
    if dataset not in DatasetCatalog.list():
        raise SetupError(f"dataset '{dataset}' is not registered with detectron2's DatasetCatalog")
    if is_shapes_dataset(dataset):
        ensure_shapes_dataset()
    try:
        dicts = DatasetCatalog.get(dataset)[:num_images]
    except (OSError, AssertionError) as e:  # e.g. a COCO json that is not there
        raise SetupError(f"dataset '{dataset}' cannot be loaded: {e}")
    if not dicts:
        raise SetupError(f"dataset '{dataset}' is empty")
    # Test-time resizing, but keep the annotations (is_train=True keeps them; no flip).
    mapper = DatasetMapper(
        cfg, is_train=True, augmentations=utils.build_augmentation(cfg, is_train=False)
    )
    return [mapper(d) for d in dicts]


@torch.no_grad()
def proposals_and_targets(model, inputs):
    """RPN proposals in training mode (train top-k) and the ground truth of one image."""
    images = model.preprocess_image([inputs])
    features = model.backbone(images.tensor)
    gt = [inputs["instances"].to(model.device)]
    rpn = model.proposal_generator
    rpn.train()
    try:
        with EventStorage():  # the RPN logs its anchor statistics in training mode
            proposals, _ = rpn(images, features, gt)
    finally:
        rpn.eval()
    return proposals, gt


def sample_negatives(cfg, proposals, gt, generator):
    """
    Match one image's proposals like ``StandardROIHeads.label_and_sample_proposals`` and sample.

    Returns:
        dict method -> float ndarray of the max IoU of the negatives it picked.
    """
    roi = cfg.MODEL.ROI_HEADS
    num_classes = roi.NUM_CLASSES
    if roi.PROPOSAL_APPEND_GT:
        proposals = add_ground_truth_to_proposals(gt, proposals)
    proposals, targets = proposals[0], gt[0]
    iou = pairwise_iou(targets.gt_boxes, proposals.proposal_boxes)
    matcher = Matcher(roi.IOU_THRESHOLDS, roi.IOU_LABELS, allow_low_quality_matches=False)
    matched_idxs, matched_labels = matcher(iou)
    labels = proposal_labels(matched_idxs, matched_labels, targets.gt_classes, num_classes)
    max_ious = iou.max(dim=0).values if len(targets) > 0 else iou.new_zeros(iou.shape[1])

    _, neg_random = subsample_labels(
        labels, roi.BATCH_SIZE_PER_IMAGE, roi.POSITIVE_FRACTION, num_classes
    )
    ib = roi.IOU_BALANCED
    _, neg_balanced = iou_balanced_subsample(
        labels,
        max_ious,
        matched_idxs,
        roi.BATCH_SIZE_PER_IMAGE,
        roi.POSITIVE_FRACTION,
        num_classes,
        num_bins=int(ib.NUM_BINS),
        floor_thr=float(ib.FLOOR_THR),
        floor_fraction=float(ib.FLOOR_FRACTION),
        instance_balanced_pos=bool(ib.INSTANCE_BALANCED_POS),
        generator=generator,
    )
    neg_all = torch.nonzero(labels == num_classes, as_tuple=True)[0]
    return {
        name: max_ious[idx].cpu().numpy()
        for name, idx in zip(METHODS, (neg_all, neg_random, neg_balanced))
    }


def summarize(ious, bin_width):
    """Histogram (share of negatives per IoU bin) and hard-negative share of each method."""
    edges = np.arange(0.0, 0.5 + bin_width / 2, bin_width)
    out = {}
    for name, values in ious.items():
        counts, _ = np.histogram(values, bins=edges)
        counts[-1] += int((values >= edges[-1]).sum())  # none for IoU < 0.5 negatives
        n = len(values)
        out[name] = dict(
            count=n,
            hard_share=float((values > HARD_IOU).mean()) if n else float("nan"),
            mean_iou=float(values.mean()) if n else float("nan"),
            histogram=(counts / max(n, 1)).tolist(),
        )
    return edges, out


def plot(edges, stats, title, output):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = (edges[1] - edges[0]) / (len(stats) + 1)
    centers = edges[:-1]
    colors = {
        "all negatives": "0.6",
        "random sampling": "tab:blue",
        "IoU-balanced sampling": "tab:red",
    }
    for i, (name, s) in enumerate(stats.items()):
        label = f"{name}: {100 * s['hard_share']:.1f}% hard (IoU > {HARD_IOU:g}), n={s['count']}"
        ax.bar(
            centers + (i + 0.5) * width,
            100 * np.asarray(s["histogram"]),
            width=width,
            color=colors.get(name),
            label=label,
            align="edge",
        )
    ax.axvline(HARD_IOU, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xticks(edges)
    ax.set_xlabel("IoU with the best-matching ground-truth box")
    ax.set_ylabel("share of negatives (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.bin_width <= 0.5:
        parser.error(f"--bin-width must be in (0, 0.5], got {args.bin_width}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config_file, args.opts)
        cfg.freeze()
        model = load_model(cfg)
        images = load_images(cfg, args.dataset, args.num_images)
    except SetupError as e:
        parser.exit(2, f"plot_sampling.py: error: {e}\n")

    torch.manual_seed(args.seed)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    ious = {name: [] for name in METHODS}
    for inputs in images:
        proposals, gt = proposals_and_targets(model, inputs)
        for name, values in sample_negatives(cfg, proposals, gt, generator).items():
            ious[name].append(values)
    ious = {k: np.concatenate(v) if v else np.zeros(0) for k, v in ious.items()}
    edges, stats = summarize(ious, args.bin_width)

    weights = cfg.MODEL.WEIGHTS or "random init"
    short_weights = "/".join(Path(weights).parts[-2:]) if cfg.MODEL.WEIGHTS else weights
    title = (
        f"{Path(args.config_file).stem} ({short_weights}), {len(images)} images of {args.dataset}\n"
        f"{cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE} ROIs/image, positive fraction "
        f"{cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION}, {cfg.MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS} "
        "IoU bins"
    )
    plot(edges, stats, title, args.output)
    print(f"Negatives over {len(images)} images of {args.dataset} ({weights}):")
    for name, s in stats.items():
        print(
            f"  {name:>22}: {s['count']:7d} negatives, {100 * s['hard_share']:5.1f}% hard "
            f"(IoU > {HARD_IOU:g}), mean IoU {s['mean_iou']:.3f}"
        )
    print(f"wrote {args.output}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    config=args.config_file,
                    weights=cfg.MODEL.WEIGHTS,
                    dataset=args.dataset,
                    num_images=len(images),
                    bin_edges=edges.tolist(),
                    hard_iou=HARD_IOU,
                    methods=stats,
                ),
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
