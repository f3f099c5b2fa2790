#!/usr/bin/env python
"""
Libra R-CNN training script, in detectron2's project idiom.

Train (8 GPUs, COCO):
    ./train_net.py --num-gpus 8 --config-file configs/COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml
Evaluate a checkpoint:
    ./train_net.py --eval-only --config-file <config> MODEL.WEIGHTS /path/to/model_final.pth
CPU, built-in dataset:
    ./train_net.py --config-file configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml MODEL.DEVICE cpu
"""
import os
import sys

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results

from libra_d2 import add_libra_config  # noqa: F401  (importing libra_d2 registers its modules)
from libra_d2.checks import SetupError, load_config, preflight


class Trainer(DefaultTrainer):
    """detectron2's ``DefaultTrainer`` with COCO evaluation for COCO-format datasets."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"no evaluator for dataset '{dataset_name}' of evaluator_type '{evaluator_type}'"
            )
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args):
    """Create the config (detectron2 defaults + libra_d2 keys + file + overrides) and set up logging."""
    cfg = load_config(args.config_file, args.opts)  # get_cfg() + add_libra_config(cfg) + merges
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        # One-line errors for bad keys, datasets and weights, before any worker process starts.
        preflight(args.config_file, args.opts)
    except SetupError as e:
        sys.exit(f"train_net.py: error: {e}")
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
