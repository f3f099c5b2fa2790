#!/usr/bin/env python
"""
Write the proposals of a trained RPN / Faster R-CNN for every image of a dataset, in detectron2's
proposal-file format, for (Libra) Fast R-CNN training with precomputed proposals
(``MODEL.LOAD_PROPOSALS True``, ``DATASETS.PROPOSAL_FILES_TRAIN`` / ``_TEST``).

    ./dump_proposals.py --config-file configs/libra_shapes/faster_rcnn_R_18_FPN.yaml \\
        --dataset libra_shapes_train --output output/shapes/proposals/libra_shapes_train.pkl \\
        MODEL.WEIGHTS output/shapes/faster_rcnn_R_18_FPN/model_final.pth

Images are read by detectron2's test loader (test-time resize, no flip); each image keeps the
``MODEL.RPN.POST_NMS_TOPK_TEST`` best proposals, boxes in original image coordinates. Every image
of the dataset is covered, including those without annotations. ``--num-gpus N`` shards the images
over N processes; the main process writes the file (atomically).
"""

import argparse
import logging
import os

import libra_d2  # noqa: F401  (first: see libra_d2/__init__.py; registers its modules, datasets)

# isort: split
import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from libra_d2.checkpoint import LibraCheckpointer
from libra_d2.checks import (
    SetupError,
    check_datasets,
    check_device,
    check_model,
    check_output_dir,
    check_weights,
    load_config,
)
from libra_d2.data.proposals import generate_proposals, merge_proposals, save_proposals

logger = logging.getLogger("libra_d2.dump_proposals")


def get_parser():
    parser = argparse.ArgumentParser(
        description="Dump the RPN proposals of a trained model for a dataset (detectron2 format)."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--dataset", required=True, help="registered dataset name")
    parser.add_argument("--output", required=True, metavar="FILE", help="output .pkl path")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="see detectron2's launch()")
    parser.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS /path/to/model_final.pth",
    )
    return parser


def check_setup(args):
    """This script's pre-flight: the config, the device for ``--num-gpus`` processes,
    ``--output``'s folder, the dataset (only that one) and the weights of a model with a proposal
    generator. Raises SetupError."""
    cfg = load_config(args.config_file, args.opts or [])
    check_device(cfg.MODEL.DEVICE, args.num_gpus)
    check_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output folder")
    if os.path.isdir(args.output):
        raise SetupError(f"--output '{args.output}' is a folder; give the .pkl file to write")
    if cfg.MODEL.LOAD_PROPOSALS or cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals":
        raise SetupError(
            f"{args.config_file} uses precomputed proposals (MODEL.LOAD_PROPOSALS / "
            "PrecomputedProposals): give the config of the RPN / Faster R-CNN to dump them from"
        )
    check_datasets([args.dataset])
    check_weights(cfg.MODEL.WEIGHTS)
    check_model(cfg)


def main(args):
    """Generate and save the proposals; returns the proposal dict (main process) or ``None``.
    The checks of :func:`check_setup` are run once, by :func:`invoke_main`, before the workers
    start."""
    cfg = load_config(args.config_file, args.opts or [])
    cfg.freeze()
    for name in ("fvcore", "detectron2", "libra_d2"):
        setup_logger(distributed_rank=comm.get_rank(), name=name)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        LibraCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: dumping the proposals of a random-init model")
    data_loader = build_detection_test_loader(cfg, args.dataset)
    logger.info(f"Generating proposals for {len(data_loader.dataset)} images of {args.dataset}")
    parts = comm.gather(generate_proposals(model, data_loader), dst=0)
    if not comm.is_main_process():
        return None
    proposals = merge_proposals(parts)  # rank order = dataset order (InferenceSampler shards)
    save_proposals(proposals, args.output)
    return proposals


def invoke_main() -> None:
    parser = get_parser()
    args = parser.parse_args()
    try:
        check_setup(args)  # one-line errors before any worker process starts
    except SetupError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
