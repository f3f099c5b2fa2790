"""mmdetection checkpoint conversion on synthetic tensors, and evaluating your own datasets."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

from libra_d2.mmdet_checkpoint import (
    MMDetCheckpointError,
    convert_mmdet_state_dict,
    is_mmdet_checkpoint,
)


def _v1_head(num_classes=80, dim=3):
    """The original release's box head: 81 score rows (background first), 81 x 4 box rows."""
    rows = num_classes + 1
    return {
        "meta": {"mmdet_version": "0.6.0"},
        "state_dict": {
            "bbox_head.shared_fcs.0.weight": torch.zeros(dim, 12544),
            "bbox_head.fc_cls.weight": torch.arange(rows, dtype=torch.float)[:, None].repeat(
                1, dim
            ),
            "bbox_head.fc_cls.bias": torch.arange(rows, dtype=torch.float),
            "bbox_head.fc_reg.weight": torch.arange(4 * rows, dtype=torch.float)[:, None].repeat(
                1, dim
            ),
            "bbox_head.fc_reg.bias": torch.arange(4 * rows, dtype=torch.float),
        },
    }


def test_v1_background_moves_last_and_its_box_rows_go():
    ckpt = _v1_head()
    assert is_mmdet_checkpoint(ckpt)
    d2 = convert_mmdet_state_dict(ckpt)
    cls_w, cls_b = (
        d2["roi_heads.box_predictor.cls_score.weight"],
        d2["roi_heads.box_predictor.cls_score.bias"],
    )
    reg_w, reg_b = (
        d2["roi_heads.box_predictor.bbox_pred.weight"],
        d2["roi_heads.box_predictor.bbox_pred.bias"],
    )
    # detectron2: scores of classes 0..79 then background; boxes of classes 0..79 only
    expected_cls = torch.tensor(list(range(1, 81)) + [0], dtype=torch.float)
    assert torch.equal(cls_b, expected_cls) and torch.equal(cls_w[:, 1], expected_cls)
    expected_reg = torch.arange(4, 324, dtype=torch.float)
    assert torch.equal(reg_b, expected_reg) and torch.equal(reg_w[:, 2], expected_reg)
    assert "roi_heads.box_head.fc1.weight" in d2


def test_v2_heads_keep_their_rows():
    ckpt = _v1_head()
    ckpt["state_dict"] = {"roi_head." + k: v for k, v in ckpt["state_dict"].items()}
    d2 = convert_mmdet_state_dict(ckpt)
    assert torch.equal(d2["roi_heads.box_predictor.cls_score.bias"], torch.arange(81.0))
    assert d2["roi_heads.box_predictor.bbox_pred.bias"].shape == (324,)


def test_unknown_and_missing_keys_are_named():
    ckpt = _v1_head()
    model_keys = [
        f"roi_heads.box_predictor.{n}.{p}"
        for n in ("cls_score", "bbox_pred")
        for p in ("weight", "bias")
    ]
    model_keys += ["roi_heads.box_head.fc1.weight"]
    convert_mmdet_state_dict(ckpt, model_keys)  # fills exactly these keys
    with pytest.raises(MMDetCheckpointError, match="'roi_head.bbox_head.shared_fcs.0.weight'"):
        convert_mmdet_state_dict(ckpt, model_keys[:-1])  # a checkpoint tensor the model lacks
    with pytest.raises(MMDetCheckpointError, match="model key 'roi_heads.box_head.fc1.bias'"):
        convert_mmdet_state_dict(ckpt, model_keys + ["roi_heads.box_head.fc1.bias"])
    ckpt["state_dict"]["neck.2.extra.weight"] = torch.zeros(1)
    with pytest.raises(MMDetCheckpointError, match="'neck.2.extra.weight' has no counterpart"):
        convert_mmdet_state_dict(ckpt)
    assert not is_mmdet_checkpoint({"model": {}, "state_dict": {}, "meta": {}})


def test_build_evaluator_supports_voc_and_coco_datasets(tmp_path, tiny_val):
    """Datasets of evaluator_type pascal_voc evaluate with detectron2's VOC evaluator."""
    import train_net

    name = "voc_2007_test"  # registered by detectron2, like every builtin dataset
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    assert isinstance(train_net.Trainer.build_evaluator(cfg, name), PascalVOCDetectionEvaluator)
    assert isinstance(train_net.Trainer.build_evaluator(cfg, tiny_val), COCOEvaluator)
    MetadataCatalog.get("libra_test_no_evaluator").set(evaluator_type="sem_seg")
    with pytest.raises(NotImplementedError, match="libra_test_no_evaluator"):
        train_net.Trainer.build_evaluator(cfg, "libra_test_no_evaluator")
