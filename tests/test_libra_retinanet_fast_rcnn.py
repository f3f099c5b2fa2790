"""Libra RetinaNet (balanced L1 box loss, BFP over p3-p7) and Libra Fast R-CNN on precomputed
proposals (proposal files, dump_proposals.py, training through train_net.main)."""

import copy
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data.build import load_proposals_into_dataset
from detectron2.modeling import RetinaNet, build_backbone, build_model
from detectron2.structures import Boxes, BoxMode
from detectron2.utils.events import EventStorage

import dump_proposals
import train_net
from libra_d2.checks import SetupError, load_config
from libra_d2.data.proposals import (
    check_proposal_file,
    check_proposal_files,
    generate_proposals,
    merge_proposals,
    save_proposals,
)
from libra_d2.modeling import BalancedFPN, LibraRetinaNet

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "libra_shapes"
LIBRA_RETINANET = str(SHAPES / "libra_retinanet_R_18_FPN.yaml")
RETINANET = str(SHAPES / "retinanet_R_18_FPN.yaml")
FASTER_RCNN = str(SHAPES / "faster_rcnn_R_18_FPN.yaml")
LIBRA_FAST_RCNN = str(SHAPES / "libra_fast_rcnn_R_18_FPN.yaml")


def _balanced_l1(d, alpha=0.5, gamma=1.5, beta=0.11):
    """The official balanced L1 of one |difference| d, written out with math."""
    b = math.exp(gamma / alpha) - 1
    if d < beta:
        return alpha / b * (b * d + 1) * math.log(b * d / beta + 1) - alpha * d
    return gamma * d + gamma / b - alpha * beta


def _final_detections(output_dir):
    """The detections of the end-of-training evaluation (``DefaultTrainer.train`` returns None)."""
    return json.loads((Path(output_dir) / "inference" / "coco_instances_results.json").read_text())


def _train_records(output_dir):
    lines = (Path(output_dir) / "metrics.json").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "total_loss" in r]


# ------------------------------------------------------------------------------ Libra RetinaNet
def test_balanced_l1_box_loss_matches_the_closed_form():
    cfg = load_config(LIBRA_RETINANET, ["MODEL.RETINANET.NUM_CLASSES", "3"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, LibraRetinaNet)
    assert model.balanced_l1_params == {"alpha": 0.5, "gamma": 1.5, "beta": 0.11}
    assert model.box_reg_loss_type == "smooth_l1"  # detectron2's type, for super().losses

    # Two levels, 5 anchors; BBOX_REG_WEIGHTS (1, 1, 1, 1).
    anchor_t = torch.tensor(
        [[0, 0, 10, 20], [0, 0, 8, 8], [10, 10, 30, 30], [0, 0, 16, 16], [40, 40, 48, 56]],
        dtype=torch.float32,
    )
    anchors = [Boxes(anchor_t[:3]), Boxes(anchor_t[3:])]
    gt_labels = [torch.tensor([0, 3, 1, -1, 2])]  # fg 0, 2, 4; 3 = background; -1 = ignored
    # Matched ground truth and its deltas (dx, dy, dw, dh), worked out by hand:
    #   anchor 0 (w 10, h 20): gt shifted by +1 in x, height doubled about the centre
    #   anchor 2 (w 20, h 20): gt = anchor
    #   anchor 4 (w 8, h 16):  gt shifted by -2 in y, width halved about the centre
    gt = torch.tensor(
        [[1, -10, 11, 30], [0, 0, 1, 1], [10, 10, 30, 30], [0, 0, 1, 1], [42, 38, 46, 54]],
        dtype=torch.float32,
    )
    targets = {
        0: [1 / 10, 0.0, 0.0, math.log(2)],
        2: [0.0, 0.0, 0.0, 0.0],
        4: [0.0, -2 / 16, math.log(0.5), 0.0],
    }
    # Prediction - target for the foreground anchors, on both sides of beta = 0.11.
    offsets = {0: [0.05, -0.2, 0.0, 1.5], 2: [0.11, 0.001, -0.3, 0.0], 4: [-0.02, 0.5, 0.1, -3.0]}
    pred = torch.full((5, 4), 7.0)  # background and ignored anchors: large, must not count
    for i in targets:
        pred[i] = torch.tensor(targets[i]) + torch.tensor(offsets[i])
    pred.requires_grad_(True)
    pred_deltas = [pred[None, :3], pred[None, 3:]]
    pred_logits = [torch.zeros(1, 3, 3), torch.zeros(1, 2, 3)]

    with EventStorage(0) as storage:
        losses = model.losses(anchors, pred_logits, gt_labels, pred_deltas, [gt])
        assert storage.latest()["num_pos_anchors"][0] == 3
    # detectron2: loss_normalizer starts at 100 and is updated by EMA with momentum 0.9 before
    # use, with max(#foreground anchors, 1) = 3: 0.9 * 100 + 0.1 * 3 = 90.3.
    normalizer = 0.9 * 100 + 0.1 * 3
    assert model.loss_normalizer == pytest.approx(normalizer)
    expected = sum(_balanced_l1(abs(d)) for i in offsets for d in offsets[i]) / normalizer
    assert losses["loss_box_reg"].item() == pytest.approx(expected, rel=1e-5)

    losses["loss_box_reg"].backward()
    assert (pred.grad[[1, 3]] == 0).all() and (pred.grad[[0, 2, 4]] != 0).any()
    # Beyond beta the gradient is gamma / normaliser, with the sign of the difference.
    assert pred.grad[0, 3].item() == pytest.approx(1.5 / normalizer, rel=1e-5)
    assert pred.grad[4, 3].item() == pytest.approx(-1.5 / normalizer, rel=1e-5)

    # The focal loss is detectron2's, unchanged.
    del model.loss_normalizer
    with EventStorage(0):
        reference = RetinaNet.losses(model, anchors, pred_logits, gt_labels, pred_deltas, [gt])
    assert losses["loss_cls"].item() == pytest.approx(reference["loss_cls"].item())


def test_balanced_l1_box_loss_on_two_images_and_the_normaliser_ema():
    """Two images with different foreground anchors, two calls: the loss is the sum over both
    images' foreground deltas divided by detectron2's EMA normaliser (0.9 * old + 0.1 *
    #foreground, starting from 100), updated on every call."""
    cfg = load_config(LIBRA_RETINANET, ["MODEL.RETINANET.NUM_CLASSES", "3"])
    torch.manual_seed(0)
    model = build_model(cfg)
    anchor_t = torch.tensor(
        [[0, 0, 10, 20], [0, 0, 8, 8], [10, 10, 30, 30], [0, 0, 16, 16], [40, 40, 48, 56]],
        dtype=torch.float32,
    )
    anchors = [Boxes(anchor_t[:3]), Boxes(anchor_t[3:])]
    # Ground truth and target deltas (dx, dy, dw, dh), by hand, of each foreground anchor:
    #   image 0, anchor 0 (w 10, h 20): +1 in x, height doubled; anchor 4 (w 8, h 16): -2 in y,
    #   width halved. image 1, anchor 1 (w 8, h 8): +2 in x, width doubled; anchor 3 (w 16,
    #   h 16): +4 in y, height halved (about the shifted centre).
    fg = {
        (0, 0): ([1, -10, 11, 30], [1 / 10, 0.0, 0.0, math.log(2)], [0.05, -0.2, 0.0, 1.5]),
        (0, 4): ([42, 38, 46, 54], [0.0, -2 / 16, math.log(0.5), 0.0], [-0.02, 0.5, 0.1, -3.0]),
        (1, 1): ([-2, 0, 14, 8], [2 / 8, 0.0, math.log(2), 0.0], [0.3, 0.0, -0.01, 2.0]),
        (1, 3): ([0, 8, 16, 16], [0.0, 4 / 16, 0.0, math.log(0.5)], [0.0, 0.11, -1.0, 0.07]),
    }
    gt = [torch.zeros(5, 4), torch.zeros(5, 4)]
    pred = torch.full((2, 5, 4), 7.0)  # background and ignored anchors: must not count
    for (i, a), (box, target, offset) in fg.items():
        gt[i][a] = torch.tensor(box, dtype=torch.float32)
        pred[i, a] = torch.tensor(target) + torch.tensor(offset)
    pred_deltas = [pred[:, :3], pred[:, 3:]]
    pred_logits = [torch.zeros(2, 3, 3), torch.zeros(2, 2, 3)]

    def bl1_sum(keys):
        return sum(_balanced_l1(abs(d)) for k in keys for d in fg[k][2])

    # Call 1: both images (4 foreground anchors). Call 2: image 1 has none (2 foreground).
    labels_1 = [torch.tensor([0, 3, 3, -1, 2]), torch.tensor([3, 1, -1, 0, 3])]
    labels_2 = [labels_1[0], torch.tensor([3, 3, -1, 3, 3])]
    normalizer = 100.0
    for labels, keys in ((labels_1, list(fg)), (labels_2, [(0, 0), (0, 4)])):
        normalizer = 0.9 * normalizer + 0.1 * len(keys)
        with EventStorage(0) as storage:
            losses = model.losses(anchors, pred_logits, labels, pred_deltas, gt)
            assert storage.latest()["num_pos_anchors"][0] == len(keys) / 2  # per image
        assert model.loss_normalizer == pytest.approx(normalizer)
        expected = bl1_sum(keys) / normalizer
        assert losses["loss_box_reg"].item() == pytest.approx(expected, rel=1e-5)
    assert normalizer == pytest.approx(0.9 * (0.9 * 100 + 0.4) + 0.2)


def test_balanced_l1_params_are_validated():
    with pytest.raises(ValueError, match=r"MODEL\.RETINANET\.BALANCED_L1\.BETA"):
        build_model(load_config(LIBRA_RETINANET, ["MODEL.RETINANET.BALANCED_L1.BETA", "0.0"]))


def test_bfp_retinanet_backbone_keeps_the_fpn_outputs():
    cfg_plain, cfg_bfp = load_config(RETINANET), load_config(LIBRA_RETINANET)
    plain, bfp = build_backbone(cfg_plain), build_backbone(cfg_bfp)
    assert isinstance(bfp, BalancedFPN) and not isinstance(plain, BalancedFPN)
    assert bfp.output_shape() == plain.output_shape()
    assert list(bfp.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    refine = bfp._out_features[bfp.bfp.refine_level]
    assert refine == "p4" and bfp.output_shape()[refine].stride == 16
    assert bfp.bfp.refine_type == "non_local"
    # Same parameter names as the FPN apart from the BFP's own.
    extra = set(dict(bfp.named_parameters())) - set(dict(plain.named_parameters()))
    assert extra and all(name.startswith("bfp.") for name in extra)
    x = torch.rand(1, 3, 96, 128)
    out_plain, out_bfp = plain(x), bfp(x)
    assert {k: v.shape for k, v in out_bfp.items()} == {k: v.shape for k, v in out_plain.items()}


def test_libra_retinanet_trains_on_shapes(tiny_train, short_run, tmp_path):
    # After 3 iterations every score is still about the 0.01 prior: evaluate without threshold.
    out = tmp_path
    opts = [
        *short_run(out, tiny_train),
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100",
        "SEED", "1",
    ]  # fmt: skip
    torch.manual_seed(0)
    train_net.main(
        train_net.default_argument_parser().parse_args(["--config-file", LIBRA_RETINANET, *opts])
    )
    records = _train_records(out)
    assert records[-1]["iteration"] == 2
    for r in records:
        assert set(r) >= {"loss_cls", "loss_box_reg"} and "loss_rpn_cls" not in r
        assert all(math.isfinite(r[k]) for k in ("loss_cls", "loss_box_reg", "total_loss"))
        assert r["num_pos_anchors"] > 0
    assert _final_detections(out)


# ------------------------------------------------------------ Fast R-CNN: proposal files
def _fake_proposals(dataset_dicts, seed=0):
    rng = np.random.default_rng(seed)
    out = {"ids": [], "boxes": [], "objectness_logits": []}
    for d in dataset_dicts:
        k = int(rng.integers(1, 6))
        xy = rng.uniform(0, 150, size=(k, 2))
        out["ids"].append(d["image_id"])
        out["boxes"].append(np.concatenate([xy, xy + rng.uniform(4, 60, size=(k, 2))], 1))
        out["objectness_logits"].append(rng.normal(size=k))
    out["boxes"] = [b.astype(np.float32) for b in out["boxes"]]
    out["objectness_logits"] = [s.astype(np.float32) for s in out["objectness_logits"]]
    return out


def test_proposal_file_round_trip_through_detectron2s_loader(tiny_val, tmp_path):
    dicts = DatasetCatalog.get(tiny_val)[:5]
    proposals = _fake_proposals(dicts)
    path = tmp_path / "sub" / "proposals.pkl"
    save_proposals(proposals, str(path))
    assert [p.name for p in path.parent.iterdir()] == ["proposals.pkl"]  # no temp file left
    with open(path, "rb") as f:
        assert pickle.load(f)["bbox_mode"] == BoxMode.XYXY_ABS

    loaded = load_proposals_into_dataset(copy.deepcopy(dicts[::-1]), str(path))
    for record in loaded:
        i = proposals["ids"].index(record["image_id"])
        order = np.argsort(-proposals["objectness_logits"][i], kind="stable")
        np.testing.assert_array_equal(record["proposal_boxes"], proposals["boxes"][i][order])
        np.testing.assert_array_equal(
            record["proposal_objectness_logits"], proposals["objectness_logits"][i][order]
        )
        assert record["proposal_bbox_mode"] == BoxMode.XYXY_ABS


def test_check_proposal_file_names_the_first_missing_image(tiny_val, tmp_path):
    dicts = DatasetCatalog.get(tiny_val)
    proposals = _fake_proposals(dicts)
    path = str(tmp_path / "all.pkl")
    save_proposals(proposals, path)
    assert check_proposal_file(path, tiny_val) == len(dicts)

    for key in ("ids", "boxes", "objectness_logits"):  # drop the 3rd and the 6th image
        del proposals[key][5], proposals[key][2]
    partial = str(tmp_path / "partial.pkl")
    save_proposals(proposals, partial)
    first_missing = dicts[2]["image_id"]
    with pytest.raises(ValueError, match=rf"'.*partial\.pkl'.*image id {first_missing} .*2 image"):
        check_proposal_file(partial, tiny_val)
    with pytest.raises(ValueError, match=r"proposal file '.*nope\.pkl' does not exist"):
        check_proposal_file(str(tmp_path / "nope.pkl"), tiny_val)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"'.*junk\.pkl' is not a readable pickle"):
        check_proposal_file(str(tmp_path / "junk.pkl"), tiny_val)

    cfg = load_config(LIBRA_FAST_RCNN, ["DATASETS.TEST", f"('{tiny_val}',)"])
    with pytest.raises(ValueError, match=r"PROPOSAL_FILES_TRAIN has 0 file\(s\)"):
        check_proposal_files(cfg)
    with pytest.raises(ValueError, match="duplicated|more than once"):
        merge_proposals([_fake_proposals(dicts[:2]), _fake_proposals(dicts[1:3])])


def test_generated_proposals_are_in_original_image_coordinates(tiny_train):
    # Network input 160 px for 224 px images: boxes must come back scaled by 224 / 160.
    cfg = load_config(FASTER_RCNN, ["INPUT.MIN_SIZE_TEST", "160", "DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    proposals = generate_proposals(model, build_detection_test_loader(cfg, tiny_train))
    assert model.training  # mode restored
    dicts = DatasetCatalog.get(tiny_train)
    assert proposals["ids"] == [d["image_id"] for d in dicts]
    assert proposals["bbox_mode"] == BoxMode.XYXY_ABS
    for boxes, logits, d in zip(proposals["boxes"], proposals["objectness_logits"], dicts):
        assert boxes.dtype == np.float32 and logits.dtype == np.float32
        assert boxes.shape == (len(logits), 4) and 0 < len(logits) <= 300
        assert boxes.min() >= 0 and boxes[:, 2].max() <= d["width"]
        assert boxes[:, 3].max() <= d["height"]
    assert max(b[:, 2:].max() for b in proposals["boxes"]) > 170  # beyond the 160 px input

    with pytest.raises(ValueError, match="no proposal generator"):
        generate_proposals(build_model(load_config(LIBRA_FAST_RCNN)), [])


def test_libra_fast_rcnn_trains_on_dumped_proposals(tiny_train, short_run, tmp_path):
    # Proposals of a random-init Faster R-CNN, through the script.
    path = tmp_path / "proposals" / "tiny_train.pkl"
    argv = ["--config-file", FASTER_RCNN, "--dataset", tiny_train, "--output", str(path)]
    torch.manual_seed(0)
    dumped = dump_proposals.main(
        dump_proposals.get_parser().parse_args(argv + ["DATALOADER.NUM_WORKERS", "0"])
    )
    assert check_proposal_file(str(path), tiny_train) == 8
    with open(path, "rb") as f:
        assert pickle.load(f)["ids"] == dumped["ids"]
    with pytest.raises(SetupError, match="precomputed proposals"):
        dump_proposals.check_setup(dump_proposals.get_parser().parse_args(
            ["--config-file", LIBRA_FAST_RCNN, "--dataset", tiny_train, "--output", str(path)]
        ))  # fmt: skip

    out = tmp_path / "train"
    opts = [
        *short_run(out, tiny_train),
        "DATASETS.TRAIN", f"('{tiny_train}',)",
        "DATASETS.PROPOSAL_FILES_TRAIN", f"('{path}',)",
        "DATASETS.PROPOSAL_FILES_TEST", f"('{path}',)",
        "SEED", "1",
    ]  # fmt: skip
    check_proposal_files(load_config(LIBRA_FAST_RCNN, opts))
    torch.manual_seed(0)
    train_net.main(
        train_net.default_argument_parser().parse_args(["--config-file", LIBRA_FAST_RCNN, *opts])
    )
    records = _train_records(out)
    assert records[-1]["iteration"] == 2
    for r in records:
        assert not any(k.startswith("loss_rpn") for k in r)  # no RPN: precomputed proposals
        assert all(math.isfinite(r[k]) for k in ("loss_cls", "loss_box_reg", "total_loss"))
        assert "roi_head/neg_mean_iou" in r  # IoU-balanced ROI heads
    assert _final_detections(out)
