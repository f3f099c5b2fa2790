#!/usr/bin/env python
"""
Libra R-CNN training script, in detectron2's project idiom, for YAML and LazyConfig (``.py``)
config files alike.

Train (8 GPUs, COCO):
    ./train_net.py --num-gpus 8 \
        --config-file configs/COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml
Evaluate a checkpoint:
    ./train_net.py --eval-only --config-file <config> MODEL.WEIGHTS /path/to/model_final.pth
CPU, built-in dataset (2 processes, Gloo):
    ./train_net.py --num-gpus 2 --config-file configs/libra_shapes/libra_faster_rcnn_R_18_FPN.yaml
LazyConfig, with overrides as in detectron2's tools/lazyconfig_train_net.py:
    ./train_net.py --config-file configs/libra_shapes/libra_faster_rcnn_R_18_FPN.py train.max_iter=9
"""

import logging
import os
import weakref

import libra_d2  # noqa: F401  (first: see libra_d2/__init__.py; registers its modules, datasets)

# isort: split
import detectron2.utils.comm as comm
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.evaluation import (
    COCOEvaluator,
    LVISEvaluator,
    PascalVOCDetectionEvaluator,
    inference_on_dataset,
    print_csv_format,
    verify_results,
)
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from libra_d2.checkpoint import LibraCheckpointer
from libra_d2.checks import (
    SetupError,
    check_datasets,
    check_device,
    check_model,
    check_output_dir,
    check_proposals,
    check_weights,
    is_lazy_config,
    load_config,
    load_lazy_config,
)


class Trainer(DefaultTrainer):
    """
    detectron2's ``DefaultTrainer`` with detectron2's detection evaluators, a crash-safe
    checkpointer (:class:`LibraCheckpointer`: atomic saves, no code execution on load) and
    multi-process training that also works on CPU (Gloo).
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ builds the same objects in the same order, but hard-codes two
        # things this trainer must change and offers no hook for: create_ddp_model(model) passes
        # device_ids=[local_rank], which DistributedDataParallel rejects for a CPU model, and the
        # checkpointer is a plain DetectionCheckpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, **_ddp_device(cfg.MODEL.DEVICE))
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = LibraCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """
        The detection evaluator of the dataset's ``evaluator_type``: coco, lvis (box AP, and mask
        AP for ``MODEL.MASK_ON`` models) or pascal_voc (box AP).
        """
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
        if evaluator_type == "lvis":  # lvis 0.5.3 with numpy >= 1.24: libra_d2/evaluation.py
            return LVISEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise NotImplementedError(
            f"no evaluator for dataset '{dataset_name}' of evaluator_type '{evaluator_type}'"
        )


def _ddp_device(device):
    """``create_ddp_model`` keyword arguments for a model on ``device`` (no device_ids on CPU)."""
    return {"device_ids": None} if device == "cpu" else {}


def lazy_test(cfg, model):
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``; ``None``
    (no evaluation) for a config without an evaluator, as in detectron2's lazyconfig_train_net."""
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def lazy_main(args, cfg):
    """
    Train or evaluate a LazyConfig (``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``,
    ``train``; detectron2's ``configs/common/train.py``) as detectron2's
    ``tools/lazyconfig_train_net.py`` does, with :class:`LibraCheckpointer`.
    """
    model = instantiate(cfg.model).to(cfg.train.device)
    if args.eval_only:
        LibraCheckpointer(model, cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return lazy_test(cfg, model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    ddp = {**cfg.train.ddp, **_ddp_device(cfg.train.device)}
    model = create_ddp_model(model, **ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, instantiate(cfg.dataloader.train), optimizer
    )
    checkpointer = LibraCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if main_process
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: lazy_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main_process
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def setup(args):
    """Build the config (detectron2 defaults + libra_d2 keys + file + overrides), set up logging."""
    cfg = load_config(args.config_file, args.opts)  # get_cfg(), add_libra_config(cfg), merges
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    if is_lazy_config(args.config_file):
        cfg = load_lazy_config(args.config_file, args.opts)
        default_setup(cfg, args)
        return lazy_main(args, cfg)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        LibraCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_setup(args):
    """
    This script's pre-flight, in the launching process: the config file and overrides, the
    device for ``--num-gpus`` processes, the output folder, the datasets (to evaluate: the test
    sets only) with their proposal files, the initial weights and the model's own config checks.

    Raises:
        SetupError: the first problem found, in one line.
    """
    if is_lazy_config(args.config_file):
        return _check_lazy_setup(args)
    cfg = load_config(args.config_file, args.opts)
    check_device(cfg.MODEL.DEVICE, args.num_gpus)
    check_output_dir(cfg.OUTPUT_DIR)
    splits = ("TEST",) if args.eval_only else ("TRAIN", "TEST")
    if not cfg.DATASETS[splits[0]]:
        raise SetupError(
            f"DATASETS.{splits[0]} is empty; name the datasets to use, e.g. "
            f"DATASETS.{splits[0]} \"('my_dataset',)\""
        )
    check_datasets([name for split in splits for name in cfg.DATASETS[split]])
    check_proposals(cfg, splits)
    check_weights(cfg.MODEL.WEIGHTS)
    check_model(cfg)


def _check_lazy_setup(args):
    """:func:`check_setup` of a LazyConfig file (detectron2's ``configs/common/train.py`` keys)."""
    cfg = load_lazy_config(args.config_file, args.opts)
    evaluates = "evaluator" in cfg.get("dataloader", {})  # as lazy_test decides
    if args.eval_only:
        needed, loaders = ["model", "train", "dataloader.test", "dataloader.evaluator"], ["test"]
    else:
        needed = ["model", "train", "dataloader.train", "optimizer", "lr_multiplier"]
        needed += ["dataloader.test"] if evaluates else []
        loaders = ["train", "test"] if evaluates else ["train"]
    for key in needed:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise SetupError(
                f"{args.config_file} has no '{key}', which train_net.py needs "
                "(see detectron2's configs/common/train.py and configs/COCO-Detection/*.py)"
            )
    check_device(cfg.train.device, args.num_gpus, "train.device")
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    # Loaders built from dataset names (detectron2's get_detection_dataset_dicts); a loader of
    # the user's own dataset function is left to it.
    groups = [OmegaConf.select(cfg, f"dataloader.{s}.dataset.names") for s in loaders]
    groups = [[g] if isinstance(g, str) else list(g) for g in groups if g is not None]
    check_datasets([name for group in groups for name in group])
    check_weights(cfg.train.init_checkpoint, "train.init_checkpoint")
    check_model(cfg)


def invoke_main() -> None:
    parser = default_argument_parser()
    args = parser.parse_args()
    print("Command Line Args:", args)
    setup_logger(name="libra_d2")  # progress of the pre-flight checks (e.g. dataset generation)
    try:
        check_setup(args)
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
