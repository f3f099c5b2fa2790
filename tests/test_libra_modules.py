"""The registered Libra R-CNN modules inside detectron2: ROI heads, box predictor, BFP backbone."""

import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from libra_d2 import add_libra_config
from libra_d2.modeling import (
    BalancedFPN,
    BalancedL1FastRCNNOutputLayers,
    IoUBalancedROIHeads,
    LibraROIHeads,
)


def small_cfg(**overrides):
    """A tiny R-18-FPN Faster R-CNN config (random init, CPU) with the libra_d2 keys."""
    cfg = add_libra_config(get_cfg())
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
            "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
            "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
            "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128], [256]],
            "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
            "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
            "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
            "MODEL.ROI_HEADS.NUM_CLASSES", 3,
        ]
    )  # fmt: skip
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


# ---------------------------------------------------------------- ROI heads: IoU-balanced sampling
def _boxes_with_iou(gt, ious):
    """Boxes inside ``gt`` (x0, y0, x1, y1) with the given IoUs against it (width scaled)."""
    x0, y0, x1, y1 = gt
    x1s = x0 + (x1 - x0) * torch.as_tensor(ious)
    n = len(x1s)
    return torch.stack([torch.full((n,), x0), torch.full((n,), y0), x1s, torch.full((n,), y1)], 1)


def _roi_heads(**overrides):
    cfg = small_cfg(**{"MODEL.ROI_HEADS.NAME": "IoUBalancedROIHeads", **overrides})
    model = build_model(cfg)
    assert isinstance(model.roi_heads, IoUBalancedROIHeads)
    return model.roi_heads


def test_iou_balanced_roi_heads_sample_evenly_across_iou_bins():
    """1000 negatives: 900 with IoU in [0, 0.05), 100 in [0.35, 0.5). Random sampling would pick
    ~90% of the 192 negatives below 0.05; IoU-balanced with 3 bins ([0,1/3), [1/3,2/3), [2/3,1))
    takes int(192/3) = 64 from each of the first two bins (the third is empty) and fills the
    other 64 at random from the 872 negatives left (~2.6 of them high)."""
    torch.manual_seed(0)
    heads = _roi_heads(
        **{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 256, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True}
    )
    rng = torch.Generator().manual_seed(0)
    gt = (0.0, 0.0, 100.0, 100.0)
    low = torch.rand(900, generator=rng) * 0.05
    high = 0.35 + torch.rand(100, generator=rng) * 0.15
    pos = 0.6 + torch.rand(64, generator=rng) * 0.35
    boxes = _boxes_with_iou(gt, torch.cat([low, high, pos]))
    proposals = Instances((200, 200))
    proposals.proposal_boxes = Boxes(boxes)
    proposals.objectness_logits = torch.zeros(len(boxes))
    targets = Instances((200, 200))
    targets.gt_boxes = Boxes(torch.tensor([gt]))
    targets.gt_classes = torch.tensor([1])
    with EventStorage(0) as storage:
        (sampled,) = heads.label_and_sample_proposals([proposals], [targets])
        hist = storage.latest()
    # 64 positives (quota 256 * 0.25 = 64; 64 proposals + the GT box = 65 candidates).
    is_bg = sampled.gt_classes == 3
    assert int((~is_bg).sum()) == 64 and int(is_bg.sum()) == 192
    from detectron2.structures import pairwise_iou

    neg_iou = pairwise_iou(sampled.proposal_boxes[is_bg], targets.gt_boxes)[:, 0]
    n_high, n_low = int((neg_iou >= 1 / 3).sum()), int((neg_iou < 0.05).sum())
    assert n_high + n_low == 192
    assert 64 <= n_high <= 64 + 15 and n_low >= 64  # 15: > 7 sd above the fill's mean of 2.6
    # detectron2's counters are kept, the mean IoU of sampled negatives is added.
    assert hist["roi_head/num_fg_samples"][0] == 64 and hist["roi_head/num_bg_samples"][0] == 192
    expected_mean = float(neg_iou.mean())
    assert hist["roi_head/neg_mean_iou"][0] == pytest.approx(expected_mean, rel=1e-5)
    assert expected_mean > 0.1  # random sampling: ~0.9 * 0.025 + 0.1 * 0.425 ~= 0.065


def test_iou_balanced_roi_heads_image_without_ground_truth():
    torch.manual_seed(0)
    heads = _roi_heads(**{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64})
    proposals = Instances((100, 100))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 100))
    proposals.objectness_logits = torch.zeros(100)
    targets = Instances((100, 100))
    targets.gt_boxes = Boxes(torch.zeros(0, 4))
    targets.gt_classes = torch.zeros(0, dtype=torch.int64)
    with EventStorage(0) as storage:
        (sampled,) = heads.label_and_sample_proposals([proposals], [targets])
        assert storage.latest()["roi_head/neg_mean_iou"][0] == 0.0
    assert len(sampled) == 64 and bool((sampled.gt_classes == 3).all())


def test_rpn_keeps_detectron2_sampler_and_smooth_l1():
    model = build_model(small_cfg(**{"MODEL.ROI_HEADS.NAME": "IoUBalancedROIHeads"}))
    assert type(model.proposal_generator) is RPN
    assert model.proposal_generator.box_reg_loss_type == "smooth_l1"


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS", 0, ">= 1"),
        ("MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_FRACTION", 1.5, "[0.0, 1.0]"),
        ("MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_FRACTION", -0.1, "[0.0, 1.0]"),
        ("MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_THR", 1.0, "[0.0, 1.0)"),
        ("MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_THR", -0.5, "[0.0, 1.0)"),
    ],
)
def test_iou_balanced_config_validation(key, value, allowed):
    with pytest.raises(ValueError, match=r"^" + key.replace(".", r"\.")) as e:
        _roi_heads(**{key: value})
    assert allowed in str(e.value)


# ------------------------------------------------------------------- Balanced L1 box predictor
def _predictor(loss_type, **overrides):
    cfg = small_cfg(
        **{
            "MODEL.ROI_HEADS.NAME": "LibraROIHeads",
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": loss_type,
            **overrides,
        }
    )
    model = build_model(cfg)
    assert isinstance(model.roi_heads, LibraROIHeads)
    return model.roi_heads.box_predictor


def test_balanced_l1_box_reg_loss_closed_form():
    """Two ROIs, one foreground (class 1) whose predicted dx is off by 0.05 and dw by 2.0 (box
    coder weights (10, 10, 5, 5) do not matter: deltas are compared directly), one background.
    loss = [BL1(0.05) + BL1(2.0)] / 2 ROIs."""
    pred = _predictor("balanced_l1")
    assert isinstance(pred, BalancedL1FastRCNNOutputLayers)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 5.0, 5.0]])
    deltas = torch.zeros(2, 3 * 4)
    deltas[0, 4:8] = torch.tensor([0.05, 0.0, 2.0, 0.0])  # class 1's deltas
    deltas[1, :] = 7.0  # background: ignored
    loss = pred.box_reg_loss(boxes, boxes.clone(), deltas, torch.tensor([1, 3]))

    a, g, beta = 0.5, 1.5, 1.0
    b = math.exp(g / a) - 1

    def bl1(d):
        if d < beta:
            return a / b * (b * d + 1) * math.log(b * d / beta + 1) - a * d
        return g * d + g / b - a * beta

    assert float(loss) == pytest.approx((bl1(0.05) + bl1(2.0)) / 2, rel=1e-6)


def test_balanced_l1_predictor_uses_config_params_and_delegates_other_losses():
    pred = _predictor(
        "balanced_l1", **{"MODEL.ROI_BOX_HEAD.BALANCED_L1.BETA": 0.5,
                          "MODEL.ROI_BOX_HEAD.BALANCED_L1.GAMMA": 1.0}
    )  # fmt: skip
    assert pred.balanced_l1_params == {"alpha": 0.5, "gamma": 1.0, "beta": 0.5}
    boxes = torch.tensor([[10.0, 10.0, 50.0, 30.0]])
    deltas = torch.zeros(1, 12)
    deltas[0, 0] = 3.0  # class 0, dx off by 3 (>= beta): gamma*3 + gamma/b - alpha*beta
    b = math.exp(1.0 / 0.5) - 1
    loss = pred.box_reg_loss(boxes, boxes.clone(), deltas, torch.tensor([0]))
    assert float(loss) == pytest.approx(1.0 * 3 + 1.0 / b - 0.5 * 0.5, rel=1e-6)

    smooth = _predictor("smooth_l1")
    # detectron2's smooth L1 with beta 0 (its default) is L1: |3| / 1 ROI.
    assert float(smooth.box_reg_loss(boxes, boxes.clone(), deltas, torch.tensor([0]))) == 3.0


def test_predictor_is_chosen_from_the_registry():
    pred = _predictor("smooth_l1", **{"MODEL.ROI_BOX_HEAD.PREDICTOR_NAME": "FastRCNNOutputLayers"})
    assert type(pred) is FastRCNNOutputLayers
    with pytest.raises(KeyError, match="NoSuchPredictor"):
        _predictor("smooth_l1", **{"MODEL.ROI_BOX_HEAD.PREDICTOR_NAME": "NoSuchPredictor"})


@pytest.mark.parametrize("name", ["ALPHA", "GAMMA", "BETA"])
def test_balanced_l1_config_validation(name):
    key = f"MODEL.ROI_BOX_HEAD.BALANCED_L1.{name}"
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r" = 0\.0 .*> 0"):
        _predictor("balanced_l1", **{key: 0.0})


# -------------------------------------------------------------------------------- BFP backbone
def test_bfp_backbone_keeps_fpn_interface():
    cfg = small_cfg()
    fpn = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    cfg.MODEL.BACKBONE.NAME = "build_resnet_bfp_backbone"
    bfp = build_backbone(cfg)
    assert isinstance(bfp, BalancedFPN)
    assert bfp.output_shape() == fpn.output_shape()
    assert bfp.size_divisibility == fpn.size_divisibility
    assert bfp.padding_constraints == fpn.padding_constraints
    assert bfp.bfp.num_levels == 5 and bfp.bfp.refine_level == 2  # p2-p6, refined at p4
    x = torch.rand(1, 3, 64, 96)
    out, ref = bfp(x), fpn(x)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}


def test_bfp_backbone_applies_bfp_to_every_fpn_output():
    """With the FPN weights copied and a fresh (identity) non-local block, the BFP backbone's
    output is FPN output + rescaled mean of the gathered levels, for p2..p6 (p6 included)."""
    torch.manual_seed(0)
    cfg = small_cfg(**{"MODEL.BACKBONE.NAME": "build_resnet_bfp_backbone"})
    bfp = build_backbone(cfg)
    x = torch.rand(1, 3, 64, 64)  # p2..p6: 16, 8, 4, 2, 1
    feats = super(BalancedFPN, bfp).forward(x)
    out = bfp(x)
    p4 = feats["p4"]  # 4x4: max-pool p2 (4x4 blocks), p3 (2x2); nearest-upsample p5, p6
    gathered = [
        torch.nn.functional.max_pool2d(feats["p2"], 4),
        torch.nn.functional.max_pool2d(feats["p3"], 2),
        p4,
        feats["p5"].repeat_interleave(2, 2).repeat_interleave(2, 3),
        feats["p6"].expand_as(p4),
    ]
    mean = sum(gathered) / 5
    torch.testing.assert_close(out["p4"], p4 + mean)
    torch.testing.assert_close(
        out["p2"], feats["p2"] + mean.repeat_interleave(4, 2).repeat_interleave(4, 3)
    )
    torch.testing.assert_close(out["p6"], feats["p6"] + mean.amax(dim=(2, 3), keepdim=True))


def test_detectron2_fpn_checkpoint_loads_with_only_bfp_missing(tmp_path):
    torch.manual_seed(0)
    base = build_model(small_cfg())
    DetectionCheckpointer(base, save_dir=str(tmp_path)).save("faster_rcnn")
    libra = build_model(
        small_cfg(**{"MODEL.BACKBONE.NAME": "build_resnet_bfp_backbone",
                     "MODEL.ROI_HEADS.NAME": "IoUBalancedROIHeads"})
    )  # fmt: skip
    DetectionCheckpointer(libra).load(str(tmp_path / "faster_rcnn.pth"))
    result = libra.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("backbone.bfp.") for k in result.missing_keys)
    for k, v in base.state_dict().items():  # every shared parameter was loaded by the checkpointer
        torch.testing.assert_close(libra.state_dict()[k], v)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("MODEL.BFP.REFINE_TYPE", "attention", r"MODEL\.BFP\.REFINE_TYPE = 'attention'"),
        ("MODEL.BFP.REFINE_LEVEL", 5, r"MODEL\.BFP\.REFINE_LEVEL = 5 .*\[0, 5\)"),
        ("MODEL.BFP.REFINE_LEVEL", -1, r"MODEL\.BFP\.REFINE_LEVEL = -1 .*\[0, 5\)"),
    ],
)
def test_bfp_config_validation(key, value, match):
    cfg = small_cfg(**{"MODEL.BACKBONE.NAME": "build_resnet_bfp_backbone", key: value})
    with pytest.raises(ValueError, match=match):
        build_backbone(cfg)
