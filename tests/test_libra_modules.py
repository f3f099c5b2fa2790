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
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from libra_d2 import add_libra_config
from libra_d2.modeling import (
    BalancedFPN,
    IoUBalancedROIHeads,
    LibraROIHeads,
    LibraRPN,
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


def _image(gts, proposal_boxes, size=(200, 200)):
    """(proposals, targets) Instances of one image; ``gts`` is a list of (x0, y0, x1, y1)."""
    proposals = Instances(size)
    proposals.proposal_boxes = Boxes(proposal_boxes)
    proposals.objectness_logits = torch.zeros(len(proposal_boxes))
    targets = Instances(size)
    targets.gt_boxes = Boxes(torch.tensor(gts, dtype=torch.float32).reshape(-1, 4))
    targets.gt_classes = torch.ones(len(gts), dtype=torch.int64)
    return proposals, targets


def _negative_ious(sampled, targets):
    """Max IoU with the ground truth of each sampled negative (background = class 3)."""
    boxes = sampled.proposal_boxes[sampled.gt_classes == 3]
    if len(targets) == 0:
        return torch.zeros(len(boxes))
    return pairwise_iou(boxes, targets.gt_boxes).max(dim=1).values


def _low_high_layout(gt, n_low, n_high, rng):
    """Negatives with IoU in [0, 0.05) and [0.35, 0.5) against ``gt``, then 64 positives."""
    low = torch.rand(n_low, generator=rng) * 0.05
    high = 0.35 + torch.rand(n_high, generator=rng) * 0.15
    pos = 0.6 + torch.rand(64, generator=rng) * 0.35
    return low, high, pos


@pytest.mark.parametrize(
    "overrides,low,high",
    [
        # 6 bins of width 1/6: 32 from [0, 1/6) (low), 32 from [1/3, 1/2) (high), 128 filled at
        # random from 868 low + 68 high (9.3 +- 2.7 high).
        ({"MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS": 6}, 32, 56),
        # IoU >= 0.2 (the 100 high ones) give int(192 * (1 - 0.5)) = 96, the floor the other 96.
        (
            {
                "MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_THR": 0.2,
                "MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_FRACTION": 0.5,
            },
            96,
            96,
        ),
    ],
    ids=["num_bins", "floor"],
)
def test_non_default_iou_balanced_keys_reach_the_sampler(overrides, low, high):
    """The layout of test_iou_balanced_roi_heads_sample_evenly_across_iou_bins (defaults: 64 to
    79 of the 192 negatives are high): other IOU_BALANCED values change how many are."""
    torch.manual_seed(0)
    heads = _roi_heads(**{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 256, **overrides})
    gt = (0.0, 0.0, 100.0, 100.0)
    low_ious, high_ious, pos = _low_high_layout(gt, 900, 100, torch.Generator().manual_seed(0))
    proposals, targets = _image([gt], _boxes_with_iou(gt, torch.cat([low_ious, high_ious, pos])))
    with EventStorage(0):
        (sampled,) = heads.label_and_sample_proposals([proposals], [targets])
    neg_iou = _negative_ious(sampled, targets)
    assert len(neg_iou) == 192
    assert low <= int((neg_iou >= 0.35).sum()) <= high


def test_positives_are_uniform_without_instance_balancing():
    """Two objects: A with 300 + 1 (its GT box) positives, B with 20 + 1; quota 64. Instance-
    balanced, B keeps all 21 (round(64 / 2) + 1 = 33 > 21). Uniform, B's count over 10 draws is
    hypergeometric: mean 10 * 64 * 21 / 322 = 41.7, sd 5.6."""
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    gt_a, gt_b = (0.0, 0.0, 100.0, 100.0), (150.0, 0.0, 190.0, 100.0)
    boxes = torch.cat(
        [
            _boxes_with_iou(gt_a, 0.6 + torch.rand(300, generator=rng) * 0.35),
            _boxes_with_iou(gt_b, 0.6 + torch.rand(20, generator=rng) * 0.35),
            _boxes_with_iou(gt_a, torch.rand(500, generator=rng) * 0.3),
        ]
    )
    proposals, targets = _image([gt_a, gt_b], boxes)

    def b_counts(heads, draws):
        counts = []
        for _ in range(draws):
            with EventStorage(0):
                (sampled,) = heads.label_and_sample_proposals([proposals], [targets])
            fg = sampled.gt_classes != 3
            assert int(fg.sum()) == 64
            counts.append(int((sampled.proposal_boxes.tensor[fg, 0] >= 150).sum()))
        return counts

    key = "MODEL.ROI_HEADS.IOU_BALANCED.INSTANCE_BALANCED_POS"
    batch = {"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 256}
    assert b_counts(_roi_heads(**batch, **{key: True}), 2) == [21, 21]
    uniform = b_counts(_roi_heads(**batch, **{key: False}), 10)
    assert abs(sum(uniform) - 41.7) < 5 * 5.6 and max(uniform) < 21


def test_iou_balanced_roi_heads_batch_of_images_with_different_layouts():
    """Three images sampled in one call, each binned on its own IoUs: A (GT top-left) has 900
    high and 100 low negatives, B has no ground truth, C (GT elsewhere, 1114 proposals) has 100
    high and 950 low. IoU-balanced, the rarer kind gives at least int(192 / 3) = 64 negatives
    in A and C (plus ~2.6 from the fill); B's 256 negatives all have IoU 0."""
    torch.manual_seed(0)
    heads = _roi_heads(**{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 256})
    rng = torch.Generator().manual_seed(0)
    gt_a, gt_c = (0.0, 0.0, 100.0, 100.0), (100.0, 50.0, 180.0, 150.0)
    low, high, pos = _low_high_layout(gt_a, 100, 900, rng)
    image_a = _image([gt_a], _boxes_with_iou(gt_a, torch.cat([high, low, pos])))
    xy = torch.rand(300, 2, generator=rng) * 150
    image_b = _image([], torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=rng) * 40], 1))
    low, high, pos = _low_high_layout(gt_c, 950, 100, rng)
    image_c = _image([gt_c], _boxes_with_iou(gt_c, torch.cat([high, low, pos])))
    images = [image_a, image_b, image_c]
    with EventStorage(0) as storage:
        sampled = heads.label_and_sample_proposals([p for p, _ in images], [t for _, t in images])
        neg_mean_iou = storage.latest()["roi_head/neg_mean_iou"][0]
    ious = [_negative_ious(s, t) for s, (_, t) in zip(sampled, images)]
    assert [len(s) for s in sampled] == [256, 256, 256]
    assert [len(i) for i in ious] == [192, 256, 192]
    assert 64 <= int((ious[0] < 0.35).sum()) <= 79  # A: the 100 low ones are the rare kind
    assert bool((ious[1] == 0).all())
    assert 64 <= int((ious[2] >= 0.35).sum()) <= 79  # C: the 100 high ones
    assert neg_mean_iou == pytest.approx(float(torch.cat(ious).mean()), rel=1e-5)


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


# ----------------------------------------------------------- LibraRPN: the official RPN recipe
def _libra_rpn(**overrides):
    cfg = small_cfg(**{"MODEL.PROPOSAL_GENERATOR.NAME": "LibraRPN", **overrides})
    rpn = build_model(cfg).proposal_generator
    assert isinstance(rpn, LibraRPN)
    return rpn


def _anchor_labels(num_pos, num_neg, num_ignored=0):
    return torch.tensor([1] * num_pos + [0] * num_neg + [-1] * num_ignored)


def test_libra_rpn_defaults_are_detectron2s_rpn():
    """Default keys: the same sampled anchors and the same losses as detectron2's RPN."""
    cfg = small_cfg()
    images = ImageList(torch.rand(2, 3, 96, 128), [(96, 128), (80, 120)])
    gt = [
        Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 10, 50, 60], [60, 20, 120, 90]])))
    ]
    gt.append(Instances((80, 120), gt_boxes=Boxes(torch.tensor([[5.0, 30, 40, 70]]))))
    features = {f"p{i}": torch.rand(2, 32, 96 // 2**i, 128 // 2**i) for i in range(2, 7)}
    losses = []
    for name in ("RPN", "LibraRPN"):
        torch.manual_seed(0)
        rpn = build_model(small_cfg(**{"MODEL.PROPOSAL_GENERATOR.NAME": name})).proposal_generator
        torch.manual_seed(1)
        with EventStorage():
            losses.append(rpn(images, features, gt)[1])
    assert cfg.MODEL.RPN.NEG_POS_UB == -1 and cfg.MODEL.RPN.LOSS_NORMALIZER == "batch_size"
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        assert torch.equal(losses[0][k], losses[1][k]), k


@pytest.mark.parametrize(
    "num_pos, num_neg, kept_pos, kept_neg",
    [(10, 1000, 10, 50), (0, 1000, 0, 5), (100, 1000, 100, 156), (300, 1000, 128, 128)],
)
def test_libra_rpn_caps_negatives_at_neg_pos_ub_per_positive(num_pos, num_neg, kept_pos, kept_neg):
    """mmdetection's BaseSampler: at most int(5 * max(1, #positives)) of the 256 - #positives."""
    rpn = _libra_rpn(**{"MODEL.RPN.NEG_POS_UB": 5.0})
    label = rpn._subsample_labels(_anchor_labels(num_pos, num_neg, num_ignored=50))
    assert (label == 1).sum() == kept_pos and (label == 0).sum() == kept_neg
    assert (label[num_pos + num_neg :] == -1).all()


def test_libra_rpn_capped_negatives_are_uniformly_random():
    """Each negative is kept with the same probability, wherever it lies in anchor order."""
    rpn = _libra_rpn(**{"MODEL.RPN.NEG_POS_UB": 5.0})
    torch.manual_seed(0)
    kept = sum((rpn._subsample_labels(_anchor_labels(10, 1000)) == 0).float() for _ in range(400))
    kept = kept[10:] / 400  # 50 of 1000: 0.05 each
    assert kept.mean() == pytest.approx(0.05)
    for part in kept.view(4, 250):  # first to last quarter of the anchors
        assert part.mean() == pytest.approx(0.05, abs=0.005)


@pytest.mark.parametrize("normalizer", ["batch_size", "num_sampled"])
def test_libra_rpn_loss_normalizer(normalizer):
    """Zero logits and zero deltas. Each sampled anchor's objectness loss is ln 2; each positive
    anchor (0, 0, 10, 10) against the box (1, 2, 13, 8) has L1 box loss |dx| + |dy| + |dw| + |dh|
    = 0.2 + 0 + ln(12 / 10) + |ln(6 / 10)|. Both sums are divided by 256 anchors per image
    (detectron2) or by the sampled anchors, each image's positive and negative counts taken as at
    least 1 (mmdetection's avg_factor): 131 here for 130 sampled."""
    rpn = _libra_rpn(**{"MODEL.RPN.LOSS_NORMALIZER": normalizer})
    assert rpn.box_reg_loss_type == "smooth_l1" and rpn.smooth_l1_beta == 0  # L1
    labels = [_anchor_labels(10, 50, 40), _anchor_labels(0, 70, 30)]  # 60 and 70 sampled
    anchors = [Boxes(torch.tensor([[0.0, 0, 10, 10]]).repeat(100, 1))]
    gt_boxes = [torch.tensor([[1.0, 2, 13, 8]]).repeat(100, 1)] * 2
    with EventStorage():
        losses = rpn.losses(
            anchors, [torch.zeros(2, 100)], labels, [torch.zeros(2, 100, 4)], gt_boxes
        )
    normalizer = {"batch_size": 256 * 2, "num_sampled": 60 + 1 + 70}[normalizer]
    box_loss = 0.2 + math.log(12 / 10) + abs(math.log(6 / 10))
    assert losses["loss_rpn_cls"].item() == pytest.approx(130 * math.log(2) / normalizer, rel=1e-6)
    assert losses["loss_rpn_loc"].item() == pytest.approx(10 * box_loss / normalizer, rel=1e-6)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("MODEL.RPN.NEG_POS_UB", -2.0, r"MODEL\.RPN\.NEG_POS_UB = -2\.0 is out of range"),
        ("MODEL.RPN.NEG_POS_UB", float("nan"), r"MODEL\.RPN\.NEG_POS_UB = nan is out of range"),
        ("MODEL.RPN.LOSS_NORMALIZER", "mean", r"MODEL\.RPN\.LOSS_NORMALIZER = 'mean': must be"),
    ],
)
def test_libra_rpn_config_validation(key, value, match):
    with pytest.raises(ValueError, match=match):
        _libra_rpn(**{key: value})


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


def _bl1(d, alpha=0.5, gamma=1.5, beta=1.0):
    """The official balanced L1 of one |difference| d, written out with math."""
    b = math.exp(gamma / alpha) - 1
    if d < beta:
        return alpha / b * (b * d + 1) * math.log(b * d / beta + 1) - alpha * d
    return gamma * d + gamma / b - alpha * beta


@pytest.mark.parametrize("agnostic", [False, True], ids=["class_specific", "class_agnostic"])
def test_balanced_l1_box_reg_loss_closed_form(agnostic):
    """Three ROIs: background first, then two foreground ROIs whose ground truth is offset from
    the proposal. Targets by hand with detectron2's box coder weights (10, 10, 5, 5):
    dx = 10 * (gt_cx - cx) / w, dy = 10 * (gt_cy - cy) / h, dw = 5 * ln(gt_w / w),
    dh = 5 * ln(gt_h / h). loss = sum of BL1(|pred - target|) over fg deltas / 3 ROIs."""
    pred = _predictor("balanced_l1", **{"MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": agnostic})
    assert tuple(pred.box2box_transform.weights) == (10.0, 10.0, 5.0, 5.0)
    proposals = torch.tensor(
        [[0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 20.0, 40.0]]
    )
    gt = torch.tensor(
        [
            [0.0, 0.0, 5.0, 5.0],  # background: not regressed
            # proposal 1 (w 40, h 20, centre (30, 20)): centre +4 in x, -2 in y, width doubled,
            # height halved -> centre (34, 18), w 80, h 10
            [-6.0, 13.0, 74.0, 23.0],
            [3.0, 0.0, 23.0, 40.0],  # proposal 2 (w 20, h 40): shifted +3 in x
        ]
    )
    gt_classes = torch.tensor([3, 1, 0])
    targets = [[1.0, -1.0, 5 * math.log(2), 5 * math.log(0.5)], [1.5, 0.0, 0.0, 0.0]]
    fg_pred = torch.tensor([[1.05, 0.0, 0.0, -3.0], [0.0, 0.2, -0.4, 0.0]])
    if agnostic:
        deltas = torch.cat([torch.full((1, 4), 7.0), fg_pred])
    else:
        deltas = torch.full((3, 3 * 4), 7.0)  # other classes and background: must not count
        deltas[1, 4:8] = fg_pred[0]  # class 1
        deltas[2, 0:4] = fg_pred[1]  # class 0
    loss = pred.box_reg_loss(proposals, gt, deltas, gt_classes)

    expected = sum(
        _bl1(abs(p - t))
        for row, target in zip(fg_pred.tolist(), targets)
        for p, t in zip(row, target)
    )
    assert float(loss) == pytest.approx(expected / 3, rel=1e-5)


def test_balanced_l1_predictor_uses_config_params_and_delegates_other_losses():
    pred = _predictor(
        "balanced_l1", **{"MODEL.ROI_BOX_HEAD.BALANCED_L1.BETA": 0.5,
                          "MODEL.ROI_BOX_HEAD.BALANCED_L1.GAMMA": 1.0}
    )  # fmt: skip
    assert pred.balanced_l1_params == {"alpha": 0.5, "gamma": 1.0, "beta": 0.5}
    boxes = torch.tensor([[10.0, 10.0, 50.0, 30.0]])
    gt = torch.tensor([[14.0, 10.0, 54.0, 30.0]])  # +4 in x: target dx = 10 * 4 / 40 = 1
    deltas = torch.zeros(1, 12)
    deltas[0, 0] = 4.0  # class 0, dx off by 3 (>= beta): gamma*3 + gamma/b - alpha*beta
    b = math.exp(1.0 / 0.5) - 1
    loss = pred.box_reg_loss(boxes, gt, deltas, torch.tensor([0]))
    assert float(loss) == pytest.approx(1.0 * 3 + 1.0 / b - 0.5 * 0.5, rel=1e-6)

    smooth = _predictor("smooth_l1")
    # detectron2's smooth L1 with beta 0 (its default) is L1: |4 - 1| / 1 ROI.
    loss = smooth.box_reg_loss(boxes, gt, deltas, torch.tensor([0]))
    assert float(loss) == pytest.approx(3.0, rel=1e-6)


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
    """A detectron2 Faster R-CNN checkpoint fills every Libra R-CNN tensor but the BFP's."""
    torch.manual_seed(0)
    base = build_model(small_cfg())
    DetectionCheckpointer(base, save_dir=str(tmp_path)).save("faster_rcnn")
    torch.manual_seed(1)  # different initial weights
    libra = build_model(
        small_cfg(**{"MODEL.BACKBONE.NAME": "build_resnet_bfp_backbone",
                     "MODEL.ROI_HEADS.NAME": "IoUBalancedROIHeads"})
    )  # fmt: skip
    base_state, libra_state = base.state_dict(), libra.state_dict()
    assert not torch.equal(
        libra_state["backbone.fpn_lateral2.weight"], base_state["backbone.fpn_lateral2.weight"]
    )
    checkpointer = DetectionCheckpointer(libra)
    results = []
    load_model = checkpointer._load_model  # what Checkpointer.load reports (and logs)

    def recording_load_model(checkpoint):
        results.append(load_model(checkpoint))
        return results[-1]

    checkpointer._load_model = recording_load_model
    checkpointer.load(str(tmp_path / "faster_rcnn.pth"))
    (result,) = results
    assert result.unexpected_keys == [] and result.incorrect_shapes == []
    bfp_keys = sorted(set(libra_state) - set(base_state))
    assert bfp_keys and all(k.startswith("backbone.bfp.") for k in bfp_keys)
    assert sorted(result.missing_keys) == bfp_keys
    for k, v in base_state.items():  # every shared tensor now holds the checkpoint's value
        torch.testing.assert_close(libra.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("refine_type", ["conv", "none"])
def test_bfp_refine_type_reaches_the_backbone(refine_type):
    """MODEL.BFP.REFINE_TYPE through the builder: "conv" refines the gathered mean with its 3x3
    conv + ReLU, "none" leaves it as is and has no parameters."""
    torch.manual_seed(0)
    bfp = build_backbone(
        small_cfg(**{"MODEL.BACKBONE.NAME": "build_resnet_bfp_backbone",
                     "MODEL.BFP.REFINE_TYPE": refine_type})
    )  # fmt: skip
    params = {k: v for k, v in bfp.state_dict().items() if k.startswith("bfp.")}
    x = torch.rand(1, 3, 64, 64)  # p2..p6: 16, 8, 4, 2, 1
    feats = super(BalancedFPN, bfp).forward(x)
    out = bfp(x)
    mean = (
        torch.nn.functional.max_pool2d(feats["p2"], 4)
        + torch.nn.functional.max_pool2d(feats["p3"], 2)
        + feats["p4"]
        + feats["p5"].repeat_interleave(2, 2).repeat_interleave(2, 3)
        + feats["p6"].expand_as(feats["p4"])
    ) / 5
    if refine_type == "none":
        assert params == {}
        refined = mean
    else:
        (weight,) = [v for v in params.values() if v.dim() == 4]
        (bias,) = [v for v in params.values() if v.dim() == 1]
        assert len(params) == 2 and weight.shape == (32, 32, 3, 3)
        refined = torch.relu(torch.nn.functional.conv2d(mean, weight, bias, padding=1))
    torch.testing.assert_close(out["p4"], feats["p4"] + refined)
    torch.testing.assert_close(out["p6"], feats["p6"] + refined.amax(dim=(2, 3), keepdim=True))


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
