"""Every YAML under configs/ loads with add_libra_config and builds its model; the COCO configs
match detectron2's model zoo 1x schedule and the restated baselines detectron2's own YAMLs; each
Libra config adds to its baseline what COCO Libra Faster R-CNN (Libra RetinaNet) adds to Faster
R-CNN (RetinaNet); the shapes configs run a training step."""

from pathlib import Path

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import RetinaNet, build_model
from detectron2.modeling.roi_heads import CascadeROIHeads
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from libra_d2.checks import load_config
from libra_d2.config import add_libra_config
from libra_d2.modeling import (
    BalancedFPN,
    BalancedL1FastRCNNOutputLayers,
    IoUBalancedROIHeads,
    LibraRetinaNet,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if not p.name.startswith("Base-"))
COCO_DIRS = ("COCO-Detection", "COCO-InstanceSegmentation", "Misc")
COCO_CONFIGS = [p for p in ALL_CONFIGS if p.parent.name in COCO_DIRS]
SHAPES_CONFIGS = [p for p in ALL_CONFIGS if p.parent.name == "libra_shapes"]


def _cfg(path, *opts):
    cfg = load_config(str(path), ["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_config_sets_are_complete():
    names = {p.stem for p in COCO_CONFIGS}
    for expected in (
        "faster_rcnn_R_50_FPN_1x",
        "libra_faster_rcnn_R_50_FPN_1x",
        "libra_faster_rcnn_R_101_FPN_1x",
        "libra_faster_rcnn_X_101_64x4d_FPN_1x",
        "libra_faster_rcnn_R_50_FPN_1x_sampling_only",
        "libra_faster_rcnn_R_50_FPN_1x_bfp_only",
        "libra_faster_rcnn_R_50_FPN_1x_balanced_l1_only",
        "retinanet_R_50_FPN_1x",
        "libra_retinanet_R_50_FPN_1x",
        "libra_fast_rcnn_R_50_FPN_1x",
        "cascade_rcnn_R_50_FPN_1x",
        "libra_cascade_rcnn_R_50_FPN_1x",
        "mask_rcnn_R_50_FPN_1x",
        "libra_mask_rcnn_R_50_FPN_1x",
        "libra_mask_rcnn_R_101_FPN_1x",
        "libra_mask_rcnn_X_101_64x4d_FPN_1x",
        "cascade_mask_rcnn_R_50_FPN_1x",
        "libra_cascade_mask_rcnn_R_50_FPN_1x",
    ):
        assert expected in names
    lvis = {p.stem for p in ALL_CONFIGS if p.parent.name == "LVISv1-InstanceSegmentation"}
    assert lvis == {"mask_rcnn_R_50_FPN_1x", "libra_mask_rcnn_R_50_FPN_1x"}
    shapes = {p.stem for p in SHAPES_CONFIGS}
    for suffix in ("", "_sampling_only", "_bfp_only", "_balanced_l1_only"):
        assert f"libra_faster_rcnn_R_18_FPN{suffix}" in shapes
    assert "faster_rcnn_R_18_FPN" in shapes
    for name in ("retinanet_R_18_FPN", "libra_retinanet_R_18_FPN", "libra_fast_rcnn_R_18_FPN"):
        assert name in shapes
    for name in ("mask_rcnn_R_18_FPN", "cascade_mask_rcnn_R_18_FPN"):
        assert {name, f"libra_{name}"} <= shapes


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_builds_its_model(path):
    cfg = _cfg(path)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    libra = "libra" in path.stem
    only = path.stem.rsplit("_only", 1)[0] if path.stem.endswith("_only") else None
    has_bfp = isinstance(model.backbone, BalancedFPN)
    if "retinanet" in path.stem:  # no sampling step: BFP + balanced L1 (LibraRetinaNet)
        expected_type = LibraRetinaNet if libra else RetinaNet
        assert (has_bfp, type(model)) == (libra, expected_type)
        return
    # Fast R-CNN: precomputed proposals, no RPN.
    assert (model.proposal_generator is None) == ("fast_rcnn" in path.stem)
    assert model.roi_heads.mask_on == ("mask_rcnn" in path.stem)
    assert isinstance(model.roi_heads, CascadeROIHeads) == ("cascade" in path.stem)
    has_sampling = isinstance(model.roi_heads, IoUBalancedROIHeads)
    has_bl1 = cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE == "balanced_l1"
    if has_bl1:  # every stage's predictor computes it
        bp = model.roi_heads.box_predictor
        predictors = list(bp) if isinstance(bp, torch.nn.ModuleList) else [bp]
        assert all(isinstance(p, BalancedL1FastRCNNOutputLayers) for p in predictors)
    if not libra:
        assert (has_bfp, has_sampling, has_bl1) == (False, False, False)
    elif only is None:
        assert (has_bfp, has_sampling, has_bl1) == (True, True, True)
    else:
        expected = (only.endswith("bfp"), only.endswith("sampling"), only.endswith("balanced_l1"))
        assert (has_bfp, has_sampling, has_bl1) == expected


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=lambda p: p.name)
def test_coco_configs_follow_the_model_zoo_1x_schedule(path):
    cfg = _cfg(path)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (60000, 80000))
    lr = 0.01 if "retinanet" in path.stem else 0.02  # RetinaNet's model zoo lr
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, lr)
    if "fast_rcnn" in path.stem:  # detectron2's published RPN R-50-FPN 1x proposals
        assert cfg.MODEL.LOAD_PROPOSALS and len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) == 1
        assert cfg.DATASETS.PROPOSAL_FILES_TEST[0].endswith(
            "coco_2017_val_box_proposals_ee0dad.pkl"
        )
    if path.stem.endswith("_mmdet"):  # mmdetection's official Libra COCO weights
        assert cfg.MODEL.WEIGHTS.startswith(
            "https://download.openmmlab.com/mmdetection/v2.0/libra_rcnn/"
        )
    elif "_R_50_" in path.name:
        assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    elif "_R_101_" in path.name:
        assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-101.pkl"


def test_libra_r50_config_has_the_official_settings():
    cfg = _cfg(CONFIG_DIR / "COCO-Detection" / "libra_faster_rcnn_R_50_FPN_1x.yaml")
    assert (cfg.MODEL.BFP.REFINE_LEVEL, cfg.MODEL.BFP.REFINE_TYPE) == (2, "non_local")
    ib = cfg.MODEL.ROI_HEADS.IOU_BALANCED
    assert (ib.NUM_BINS, ib.FLOOR_THR, ib.FLOOR_FRACTION, ib.INSTANCE_BALANCED_POS) == (
        3,
        -1.0,
        0.0,
        True,
    )
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512
    assert cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION == 0.25
    bl1 = cfg.MODEL.ROI_BOX_HEAD.BALANCED_L1
    assert (bl1.ALPHA, bl1.GAMMA, bl1.BETA) == (0.5, 1.5, 1.0)
    assert tuple(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS) == (10.0, 10.0, 5.0, 5.0)
    # The RPN keeps detectron2's random sampler and smooth L1.
    assert cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE == "smooth_l1"


@pytest.mark.parametrize(
    "name",
    [
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
        "LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    ],
)
def test_restated_baselines_equal_detectron2s_model_zoo_configs(name):
    """The baselines are detectron2's own model zoo configs, key for key."""
    theirs = add_libra_config(get_cfg())
    theirs.merge_from_file(model_zoo.get_config_file(name))
    assert load_config(str(CONFIG_DIR / name), []) == theirs


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(cfg, base):
    a, b = _flat(cfg), _flat(base)
    return {k: a[k] for k in a if a[k] != b[k] and k != "OUTPUT_DIR"}


_LIBRA_CONFIGS = [
    "COCO-InstanceSegmentation/libra_mask_rcnn_R_50_FPN_1x",
    "COCO-Detection/libra_cascade_rcnn_R_50_FPN_1x",
    "Misc/libra_cascade_mask_rcnn_R_50_FPN_1x",
    "LVISv1-InstanceSegmentation/libra_mask_rcnn_R_50_FPN_1x",
    "libra_shapes/libra_faster_rcnn_R_18_FPN",
    "libra_shapes/libra_mask_rcnn_R_18_FPN",
    "libra_shapes/libra_cascade_mask_rcnn_R_18_FPN",
    "libra_shapes/libra_retinanet_R_18_FPN",
]


@pytest.mark.parametrize("libra", _LIBRA_CONFIGS)
def test_libra_configs_add_what_the_coco_libra_configs_add(libra):
    """Each Libra config differs from its baseline in exactly the keys (and values) in which
    COCO Libra Faster R-CNN (Libra RetinaNet) differs from Faster R-CNN (RetinaNet), the cascade
    taking the cascade's IoU-balanced heads. The shapes configs restate the Libra values of
    Base-Libra-*.yaml (a YAML file has one _BASE_): this is where they cannot drift."""
    arch = "retinanet" if "retinanet" in libra else "faster_rcnn"
    expected = _diff(
        _cfg(CONFIG_DIR / "COCO-Detection" / f"libra_{arch}_R_50_FPN_1x.yaml"),
        _cfg(CONFIG_DIR / "COCO-Detection" / f"{arch}_R_50_FPN_1x.yaml"),
    )
    if "cascade" in libra:
        expected["MODEL.ROI_HEADS.NAME"] = "IoUBalancedCascadeROIHeads"
    base = libra.replace("/libra_", "/")  # the baseline of the same folder
    assert _diff(_cfg(CONFIG_DIR / f"{libra}.yaml"), _cfg(CONFIG_DIR / f"{base}.yaml")) == expected


def _batch(n=2, size=96):
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(n):
        inst = Instances((size, size))
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(3, 2, generator=g) * 30], 1))
        inst.gt_classes = torch.randint(0, 6, (3,), generator=g)
        inst.gt_masks = PolygonMasks(  # the box outlines, for the mask configs
            [[b[[0, 1, 2, 1, 2, 3, 0, 3]].numpy()] for b in inst.gt_boxes.tensor]
        )
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        proposals = Instances((size, size))  # for the precomputed-proposal (Fast R-CNN) configs
        xy = torch.rand(20, 2, generator=g) * size * 0.6
        proposals.proposal_boxes = Boxes(
            torch.cat([xy, xy + 4 + torch.rand(20, 2, generator=g) * 30], 1)
        )
        proposals.objectness_logits = torch.randn(20, generator=g)
        batch.append(
            {
                "image": image,
                "instances": inst,
                "proposals": proposals,
                "height": size,
                "width": size,
            }
        )
    return batch


@pytest.mark.parametrize("path", SHAPES_CONFIGS, ids=lambda p: p.name)
def test_shapes_configs_train_one_step_and_infer(path):
    torch.manual_seed(0)
    model = build_model(_cfg(path))
    with EventStorage(0):
        losses = model(_batch())
    expected = {"loss_cls", "loss_box_reg"}
    if "cascade" in path.stem:
        expected = {f"{k}_stage{s}" for k in expected for s in range(3)}
    if "retinanet" not in path.stem and "fast_rcnn" not in path.stem:
        expected |= {"loss_rpn_cls", "loss_rpn_loc"}
    if "mask" in path.stem:
        expected.add("loss_mask")
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(_batch(1))
    assert out[0]["instances"].pred_boxes.tensor.shape[1] == 4
    assert out[0]["instances"].has("pred_masks") == ("mask" in path.stem)


_NAN, _INF = float("nan"), float("inf")
_LIBRA_RCNN = CONFIG_DIR / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml"
_LIBRA_RETINANET = CONFIG_DIR / "libra_shapes" / "libra_retinanet_R_18_FPN.yaml"
_INVALID = [
    *[(_LIBRA_RCNN, "MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS", v) for v in (2.5, -1, _NAN)],
    *[(_LIBRA_RCNN, "MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_THR", v) for v in (-2.0, _NAN)],
    *[(_LIBRA_RCNN, "MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_FRACTION", v) for v in (-0.5, _NAN)],
    *[(_LIBRA_RCNN, "MODEL.BFP.REFINE_LEVEL", v) for v in (1.5, -1, _NAN)],
    *[
        (path, f"MODEL.{head}.BALANCED_L1.{name}", v)
        for path, head in ((_LIBRA_RCNN, "ROI_BOX_HEAD"), (_LIBRA_RETINANET, "RETINANET"))
        for name in ("ALPHA", "GAMMA", "BETA")
        for v in (0.0, -1.0, _NAN, _INF)
    ],
]


@pytest.mark.parametrize(
    "path,key,value", _INVALID, ids=[f"{k[len('MODEL.') :]}={v}" for _, k, v in _INVALID]
)
def test_invalid_values_fail_when_the_model_is_built(path, key, value):
    """Values a YAML (``.nan``, ``.inf``) or Python code can set: build_model raises a ValueError
    whose message names the key."""
    cfg = _cfg(path)
    *parents, name = key.split(".")
    node = cfg
    for parent in parents:
        node = node[parent]
    node[name] = value
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(cfg)
