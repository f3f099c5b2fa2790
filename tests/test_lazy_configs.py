"""LazyConfig files: every one loads and builds, each Lazy model is its YAML twin, and
train_net.py trains, resumes and evaluates them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from omegaconf import DictConfig, ListConfig, OmegaConf

from libra_d2.checks import load_config
from libra_d2.modeling import BalancedFPN, IoUBalancedROIHeads, LibraRetinaNet, LibraRPN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LAZY_FILES = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.py"))
# (LazyConfig, YAML config of the same model)
TWINS = [
    ("libra_shapes/libra_faster_rcnn_R_18_FPN.py", "libra_shapes/libra_faster_rcnn_R_18_FPN.yaml"),
    (
        "COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.py",
        "COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml",
    ),
    (
        "COCO-Detection/libra_retinanet_R_50_FPN_1x.py",
        "COCO-Detection/libra_retinanet_R_50_FPN_1x.yaml",
    ),
    (
        "COCO-InstanceSegmentation/libra_mask_rcnn_R_50_FPN_1x.py",
        "COCO-InstanceSegmentation/libra_mask_rcnn_R_50_FPN_1x.yaml",
    ),
    (
        "Misc/libra_cascade_mask_rcnn_R_50_FPN_1x.py",
        "Misc/libra_cascade_mask_rcnn_R_50_FPN_1x.yaml",
    ),
]


def _plain(value):
    """``value`` as nested tuples, dicts and scalars; a plain object as (class name, attributes)."""
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (torch.nn.Module, torch.Tensor)):  # compared as modules / state
        return None
    if hasattr(value, "__dict__"):  # Matcher, Box2BoxTransform, ...
        return type(value).__name__, _plain(vars(value))
    return value


def _settings(model):
    """Every module's public attributes: thresholds, top-k, sampling sizes, matchers, coders."""
    settings = {
        f"{name}.{k}": _plain(v)
        for name, module in model.named_modules()
        for k, v in vars(module).items()
        if not k.startswith("_") and k != "training"
    }
    for k, v in settings.items():  # a missing loss weight is 1.0 (FastRCNNOutputLayers.losses)
        if "box_predictor" in k and k.endswith(".loss_weight"):
            settings[k] = {"loss_cls": 1.0, **v}
    return settings


def test_lazy_files_are_found():
    assert len(LAZY_FILES) >= 7 and {lazy for lazy, _ in TWINS} <= set(LAZY_FILES)


@pytest.mark.parametrize("name", LAZY_FILES)
def test_every_lazy_config_loads_and_builds_a_libra_model(name):
    cfg = LazyConfig.load(str(CONFIGS / name))
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model.backbone, BalancedFPN)
    if isinstance(model, LibraRetinaNet):
        assert model.balanced_l1_params["beta"] == 0.11
        return
    assert isinstance(model.proposal_generator, LibraRPN)
    assert (model.proposal_generator.neg_pos_ub, model.proposal_generator.loss_normalizer) == (
        5.0,
        "num_sampled",
    )
    assert isinstance(model.roi_heads, IoUBalancedROIHeads)
    predictors = model.roi_heads.box_predictor  # a ModuleList of one per stage in a cascade
    predictors = predictors if isinstance(predictors, torch.nn.ModuleList) else [predictors]
    assert all(p.box_reg_loss_type == "balanced_l1" for p in predictors)
    if "common" not in name:  # a full config: what train_net.py needs
        assert {"dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg)


@pytest.mark.parametrize("lazy, yaml", TWINS)
def test_lazy_and_yaml_configs_build_the_same_model(lazy, yaml):
    """Same parameter and buffer names and shapes, the same parameters trainable (frozen stages),
    the same module settings (e.g. the RPN's top-k, which a small test image cannot reach); with
    the same weights, the same features, detections and (with the same random draws)
    training losses."""
    cfg = LazyConfig.load(str(CONFIGS / lazy))
    yaml_cfg = load_config(str(CONFIGS / yaml), ["MODEL.DEVICE", "cpu"])
    # an untrained model's scores are low: keep every detection on both sides
    if "retinanet" in lazy:
        cfg.model.test_score_thresh = 0.0
        yaml_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    else:
        heads = cfg.model.roi_heads
        for predictor in (
            heads.box_predictors if "box_predictors" in heads else [heads.box_predictor]
        ):
            predictor.test_score_thresh = 0.0
        yaml_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    models = lazy_model, yaml_model = instantiate(cfg.model).eval(), build_model(yaml_cfg).eval()
    lazy_state, yaml_state = lazy_model.state_dict(), yaml_model.state_dict()
    assert {k: v.shape for k, v in lazy_state.items()} == {
        k: v.shape for k, v in yaml_state.items()
    }
    trainable = [{k: p.requires_grad for k, p in m.named_parameters()} for m in models]
    assert trainable[0] == trainable[1]
    assert _settings(lazy_model) == _settings(yaml_model)
    with torch.no_grad():
        for name, v in yaml_state.items():  # the BFP's zero-initialised output conv too
            if name.startswith("backbone.bfp."):
                v.normal_(0.0, 0.01)
    lazy_model.load_state_dict(yaml_state)
    image = torch.randint(0, 256, (3, 192, 224), dtype=torch.uint8)
    boxes = Boxes(torch.tensor([[20.0, 30.0, 120.0, 150.0], [100.0, 20.0, 210.0, 90.0]]))
    masks = torch.zeros(2, 192, 224, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.tensor.int().tolist()):
        mask[y0:y1, x0:x1] = True
    instances = Instances((192, 224), gt_boxes=boxes, gt_classes=torch.tensor([1, 3]))
    instances.gt_masks = BitMasks(masks)
    outputs = []
    for model in (lazy_model, yaml_model):
        with torch.no_grad():
            features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
            detections = model([{"image": image}])[0]["instances"].get_fields()
        torch.manual_seed(1)  # the same random draws in training
        with EventStorage():
            losses = model.train()([{"image": image, "instances": instances}])
        outputs.append({**features, **detections, **losses})
    assert outputs[0].keys() == outputs[1].keys()
    for key, value in outputs[1].items():
        other = outputs[0][key]
        if isinstance(value, Boxes):
            value, other = value.tensor, other.tensor
        assert torch.equal(other, value), key
    assert any(k.startswith("loss") for k in outputs[1]) and all(
        v.isfinite().all() for v in losses.values()
    )


def test_train_net_trains_resumes_and_evaluates_a_lazy_config(tiny_val, tmp_path):
    import train_net

    def run(*flags, max_iter, overrides=()):
        overrides = [
            *overrides,
            f"train.max_iter={max_iter}",
            "train.eval_period=3",
            "train.checkpointer.period=2",
            "train.log_period=1",
            f"train.output_dir={tmp_path}",
            "dataloader.train.total_batch_size=2",
            "dataloader.train.num_workers=0",
            "dataloader.test.num_workers=0",
            f"dataloader.test.dataset.names={tiny_val}",
            "model.roi_heads.box_predictor.test_score_thresh=0.0",  # untrained: keep boxes
        ]
        config = str(CONFIGS / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.py")
        parse = train_net.default_argument_parser().parse_args
        return train_net.main(parse([*flags, "--config-file", config, *overrides]))

    torch.manual_seed(0)
    run(max_iter=3)
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "config.yaml").is_file()
    run("--resume", max_iter=5)  # continues after the last checkpoint (model_final, iteration 2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1, 2, 3, 4]
    assert sum("bbox/AP" in r for r in rows) == 2  # evaluated at the end of each run
    final = str(tmp_path / "model_final.pth")
    results = run("--eval-only", max_iter=5, overrides=[f"train.init_checkpoint={final}"])
    assert np.isfinite(results["bbox"]["AP"])
    assert results["bbox"]["AP"] == pytest.approx(rows[-1]["bbox/AP"])


def test_lazy_shapes_optimizer_schedule_and_data_are_its_yaml_twins():
    """libra_shapes/libra_faster_rcnn_R_18_FPN.py trains as its YAML twin does under
    train_net.py: detectron2's optimizer, LR schedule (every iteration) and dataset mappers built
    from the YAML give the same parameter groups, multipliers and resized, flipped images."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper
    from detectron2.engine import DefaultTrainer
    from detectron2.solver import build_lr_scheduler

    cfg = LazyConfig.load(str(CONFIGS / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.py"))
    yaml_cfg = load_config(str(CONFIGS / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    cfg.optimizer.params.model = model
    optimizers = instantiate(cfg.optimizer), DefaultTrainer.build_optimizer(yaml_cfg, model)
    groups = [
        [{k: v for k, v in g.items() if k not in ("params", "foreach")} for g in o.param_groups]
        for o in optimizers
    ]
    assert groups[0] == groups[1] and len(groups[0]) == 2  # no weight decay on the GroupNorm
    max_iter = yaml_cfg.SOLVER.MAX_ITER
    assert cfg.train.max_iter == max_iter
    multipliers = (
        instantiate(cfg.lr_multiplier),
        build_lr_scheduler(yaml_cfg, optimizers[1])._multiplier,
    )
    lazy_lr, yaml_lr = ([m(i / max_iter) for i in range(max_iter)] for m in multipliers)
    assert lazy_lr == yaml_lr and len(set(yaml_lr)) > 3  # warm-up and two steps
    for is_train, mapper in (
        (True, cfg.dataloader.train.mapper),
        (False, cfg.dataloader.test.mapper),
    ):
        mappers = instantiate(mapper), DatasetMapper(yaml_cfg, is_train=is_train)
        settings = [{k: v for k, v in vars(m).items() if k != "augmentations"} for m in mappers]
        assert settings[0] == settings[1]  # image format, masks, keypoints, proposals
        for h, w in ((300, 400), (500, 120)):
            image = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
            outputs = []
            for m in mappers:
                np.random.seed(0)  # the same flips
                aug_input = T.AugInput(image.copy())
                m.augmentations(aug_input)
                outputs.append(aug_input.image)
            assert np.array_equal(outputs[0], outputs[1]) and max(outputs[1].shape[:2]) == 224
