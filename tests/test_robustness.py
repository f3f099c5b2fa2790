"""Hostile and degenerate inputs through the full Libra R-CNN (all three components on): losses
stay finite and nothing crashes; mixed precision stays numerically safe."""

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from libra_d2.checks import load_config

ROOT = Path(__file__).resolve().parents[1]
LIBRA_SHAPES = str(ROOT / "configs" / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml")


@pytest.fixture(scope="module")
def libra_model():
    torch.manual_seed(0)
    cfg = load_config(LIBRA_SHAPES, ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "200"])
    model = build_model(cfg)
    model.train()
    return model


def _image(h, w, boxes, classes=None, crowd=None):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    n = len(inst.gt_boxes)
    inst.gt_classes = torch.tensor(classes if classes is not None else [0] * n, dtype=torch.int64)
    g = torch.Generator().manual_seed(h * 1000 + w)
    return {"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "instances": inst}


def _losses(model, batch):
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    return losses


CASES = {
    # images without annotations (DATALOADER.FILTER_EMPTY_ANNOTATIONS False)
    "no_annotations": [_image(96, 96, []), _image(96, 96, [])],
    "one_empty_one_not": [_image(96, 96, []), _image(96, 96, [[10, 10, 50, 60]], [2])],
    # boxes partly outside the image
    "out_of_image_boxes": [_image(96, 96, [[-50, -50, 200, 200], [80, 80, 300, 300]])],
    # smaller than the largest stride (p6: 64) and extreme aspect ratios
    "tiny_image": [_image(32, 32, [[2, 2, 20, 20]])],
    "wide_image": [_image(32, 320, [[5, 5, 300, 25]])],
    "tall_image": [_image(320, 32, [[5, 5, 25, 300]])],
    # many objects: more positives than the quota, instance balancing across 24 objects
    "crowded": [_image(128, 128, [[4 * i, 4 * i, 4 * i + 30, 4 * i + 30] for i in range(24)])],
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_degenerate_batches_give_finite_losses(libra_model, case):
    losses = _losses(libra_model, CASES[case])
    if case == "no_annotations":
        assert float(losses["loss_box_reg"].detach()) == 0.0  # no positives: no regression


def test_every_proposal_negative_and_fewer_proposals_than_quota(libra_model):
    """Only 50 proposals per image (quota 256) and a GT that none of them overlap."""
    model = libra_model
    old = model.proposal_generator.post_nms_topk
    model.proposal_generator.post_nms_topk = {True: 50, False: 50}
    try:
        for proposal_append_gt in (True, False):
            model.roi_heads.proposal_append_gt = proposal_append_gt
            _losses(model, [_image(96, 96, [[0, 0, 3, 3]]), _image(96, 96, [[90, 90, 95, 95]])])
    finally:
        model.proposal_generator.post_nms_topk = old
        model.roi_heads.proposal_append_gt = True


def _mapped(annotations, h=64, w=64):
    """A dataset record run through detectron2's training DatasetMapper (fake pixels)."""
    record = {"file_name": "x.png", "height": h, "width": w, "annotations": annotations}
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    with mock.patch.object(utils, "read_image", return_value=np.zeros((h, w, 3), np.uint8)):
        return mapper(record)


def _ann(bbox, iscrowd=0, category_id=0):
    return {"bbox": bbox, "bbox_mode": 1, "category_id": category_id, "iscrowd": iscrowd}  # XYWH


def test_crowd_only_images(libra_model):
    """detectron2's mapper drops crowd boxes: a crowd-only image trains as an empty one."""
    out = _mapped([_ann([1, 1, 20, 20], iscrowd=1), _ann([30, 30, 20, 20], iscrowd=1)])
    assert len(out["instances"]) == 0
    _losses(libra_model, [out, _image(64, 64, [[5, 5, 30, 30]])])


def test_zero_area_and_out_of_image_boxes_from_a_dataset(libra_model):
    """Annotations as a COCO file may hold them: zero width/height, fully outside the image,
    partly outside. The mapper clips to the image and drops the empty ones; training is finite."""
    out = _mapped(
        [
            _ann([10, 10, 0, 15]),  # zero width
            _ann([20, 20, 15, 0]),  # zero height
            _ann([100, 100, 20, 20]),  # entirely outside the 64x64 image
            _ann([-10, 40, 30, 50]),  # partly outside: clipped to [0, 40, 20, 64]
            _ann([5, 5, 20, 20], category_id=2),
        ]
    )
    boxes = out["instances"].gt_boxes.tensor
    assert len(boxes) == 2 and bool((boxes >= 0).all()) and bool((boxes <= 64).all())
    _losses(libra_model, [out])


def test_bfloat16_autocast_forward_backward_close_to_fp32(libra_model):
    batch = [_image(96, 96, [[10, 10, 50, 60], [40, 30, 90, 70]], [1, 3])]
    torch.manual_seed(1)
    fp32 = _losses(libra_model, batch)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _losses(libra_model, batch)
    for k in fp32:
        assert bf16[k].dtype == torch.float32
        assert float(bf16[k]) == pytest.approx(float(fp32[k]), rel=0.1, abs=0.02), k
