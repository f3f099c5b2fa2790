"""detectron2 with the ``*_mmdet.yaml`` configs computes what mmdetection computes at inference.

mmdetection 3.3.0 builds Libra Faster R-CNN and Libra RetinaNet from its own config files with
random weights, saved in mmdetection's checkpoint format (``mmdet_reference.py``). detectron2
loads that file through ``MODEL.WEIGHTS``; both run a real photograph at its own size (no resizing
on either side) and must agree on the preprocessed input, the BFP features, the first stage (RPN
proposals; RetinaNet's head outputs) and the final detections of each framework's full inference
path.
"""

import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from mmdet_reference import (
    BOX_TOL,
    COCO_CONFIGS,
    HEIGHT,
    MODELS,
    PHOTO,
    SCORE_TOL,
    WIDTH,
    max_diff,
    mmdet_config,
)

from libra_d2 import add_libra_config
from libra_d2.checkpoint import LibraCheckpointer
from libra_d2.mmdet_checkpoint import MMDetCheckpointError, convert_mmdet_state_dict


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, random_models):
    """The same random model in both frameworks, and what each computes on the photo."""
    from mmdet.apis import inference_detector, init_detector

    mm_cfg, mm_model, batch, checkpoint = random_models[request.param]
    # mmdetection: its stages on the preprocessed batch, then its full path from the file
    with torch.no_grad():
        mm_feats = mm_model.extract_feat(batch["inputs"])
        mm_rpn = None
        if hasattr(mm_model, "rpn_head"):
            mm_rpn = mm_model.rpn_head.predict(mm_feats, batch["data_samples"], rescale=False)[0]
    mm_dets = inference_detector(init_detector(mm_cfg, checkpoint, device="cpu"), PHOTO)

    # detectron2: MODEL.WEIGHTS is the mmdetection file
    cfg = add_libra_config(get_cfg())
    cfg.merge_from_file(str(COCO_CONFIGS / f"{MODELS[request.param][1]}.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", checkpoint])
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", min(HEIGHT, WIDTH), "INPUT.MAX_SIZE_TEST", 1333])
    predictor_cfg = cfg.clone()
    predictor_cfg.MODEL.WEIGHTS = ""  # DefaultPredictor's own checkpointer does not convert
    predictor = DefaultPredictor(predictor_cfg)  # detectron2's full path: resize, model, rescale
    d2_model = predictor.model
    LibraCheckpointer(d2_model).load(cfg.MODEL.WEIGHTS)
    bgr = cv2.imread(PHOTO, cv2.IMREAD_COLOR)
    with torch.no_grad():
        rgb = torch.as_tensor(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))
        images = d2_model.preprocess_image([{"image": rgb, "height": HEIGHT, "width": WIDTH}])
        d2_feats = d2_model.backbone(images.tensor)
        d2_feats = [d2_feats[f] for f in d2_model.backbone._out_features]
        if mm_rpn is not None:
            proposals = d2_model.proposal_generator(
                images, dict(zip(["p2", "p3", "p4", "p5", "p6"], d2_feats))
            )
            first_stage = (mm_rpn, proposals[0][0])
        else:  # RetinaNet's head outputs: class logits and box deltas, anchors in each one's order
            first_stage = (mm_model.bbox_head(mm_feats), d2_model.head(d2_feats))
    d2_dets = predictor(bgr)["instances"]
    return types.SimpleNamespace(
        name=request.param,
        inputs=(batch["inputs"], images.tensor),
        feats=(list(mm_feats), d2_feats),
        first_stage=first_stage,
        dets=(mm_dets.pred_instances, d2_dets),
    )


def test_inputs_and_balanced_features_match(pair):
    mm_input, d2_input = pair.inputs
    assert mm_input.shape == d2_input.shape == (1, 3, 608, 512)  # padded to a multiple of 32
    torch.testing.assert_close(d2_input, mm_input, rtol=0, atol=1e-5)
    mm_feats, d2_feats = pair.feats
    assert len(mm_feats) == len(d2_feats) == 5
    for mm, d2 in zip(mm_feats, d2_feats):
        assert mm.shape == d2.shape
        scale = mm.abs().max().item()
        assert scale > 0.1  # features are non-trivial
        assert max_diff(d2, mm) <= 1e-4 * scale
    print(
        f"\n{pair.name}: max |feature diff| per level",
        [f"{max_diff(a, b):.2e}" for a, b in zip(*pair.feats)],
    )


def test_first_stage_outputs_match(pair):
    mm, d2 = pair.first_stage
    if pair.name == "retinanet":
        (mm_logits, mm_deltas), (d2_logits, d2_deltas) = mm, d2
        for mm_out, d2_out in zip(mm_logits + mm_deltas, d2_logits + d2_deltas):
            n, c, h, w = mm_out.shape  # mmdetection: anchor (ratio r, scale s) at r * 3 + s
            mm_out = mm_out.view(n, 3, 3, c // 9, h, w).transpose(1, 2).reshape(n, c, h, w)
            diff = max_diff(d2_out, mm_out)
            assert diff <= 1e-4 * mm_out.abs().max().item(), diff
        print(f"\n{pair.name}: head outputs max |diff| {diff:.2e} (coarsest level)")
        return
    assert len(mm) == len(d2) == 1000
    mm_boxes, d2_boxes = mm.bboxes, d2.proposal_boxes.tensor
    # Same boxes with the same scores; near-tied scores may come in either order.
    nearest = (d2_boxes[:, None] - mm_boxes[None]).abs().amax(dim=2).argmin(dim=1)
    assert nearest.unique().numel() == 1000
    box = max_diff(d2_boxes, mm_boxes[nearest])
    score = max_diff(d2.objectness_logits.sigmoid(), mm.scores[nearest])
    swapped = (nearest != torch.arange(1000)).sum().item()
    print(
        f"\n{pair.name}: 1000 proposals, max |box diff| {box:.2e} px, |score diff| {score:.2e}, "
        f"{swapped} in another order (score gap {max_diff(mm.scores, mm.scores[nearest]):.1e})"
    )
    assert box <= BOX_TOL and score <= SCORE_TOL


def test_final_detections_match(pair):
    mm, d2 = pair.dets
    assert len(mm) > 20  # the random model detects something
    assert len(d2) == len(mm)
    assert torch.equal(d2.pred_classes, mm.labels)
    box = max_diff(d2.pred_boxes.tensor, mm.bboxes)
    score = max_diff(d2.scores, mm.scores)
    print(
        f"\n{pair.name}: {len(mm)} detections, max |box diff| {box:.2e}, |score diff| {score:.2e}"
    )
    assert box <= BOX_TOL and score <= SCORE_TOL


def test_retinanet_anchor_order_is_converted(mmdet):
    """The head's channel permutation maps mmdetection's anchors onto detectron2's, one to one."""
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
    from mmdet.models.task_modules.prior_generators import AnchorGenerator

    from libra_d2.mmdet_checkpoint import _to_size_major

    mm = AnchorGenerator(
        strides=[8], ratios=[0.5, 1.0, 2.0], octave_base_scale=4, scales_per_octave=3
    ).base_anchors[0]
    cfg = add_libra_config(get_cfg())
    cfg.merge_from_file(str(COCO_CONFIGS / "libra_retinanet_R_50_FPN_1x_mmdet.yaml"))
    sizes, ratios = cfg.MODEL.ANCHOR_GENERATOR.SIZES[:1], cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
    d2 = DefaultAnchorGenerator(sizes=sizes, aspect_ratios=ratios, strides=[8], offset=0.0)
    # the converter moves mmdetection's anchor order[i] to detectron2's position i
    order = _to_size_major(torch.arange(9), (3, 3))
    torch.testing.assert_close(list(d2.cell_anchors)[0], mm[order], rtol=0, atol=1e-4)
    assert not torch.equal(order, torch.arange(9))


def _d2_model(config, **overrides):
    cfg = add_libra_config(get_cfg())
    cfg.merge_from_file(str(COCO_CONFIGS / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *sum(overrides.items(), ())])
    return build_model(cfg).eval()


def test_a_checkpoint_that_does_not_fill_the_model_is_refused(random_models, tmp_path):
    faster = _d2_model("libra_faster_rcnn_R_50_FPN_1x_mmdet.yaml")
    with pytest.raises(MMDetCheckpointError, match="'neck.0.fpn_convs.3.conv.weight'"):
        LibraCheckpointer(faster).load(random_models["retinanet"][3])  # another architecture
    loaded = torch.load(random_models["faster_rcnn"][3], weights_only=True)
    del loaded["state_dict"]["neck.1.refine.phi.conv.bias"]
    torch.save(loaded, tmp_path / "incomplete.pth")
    with pytest.raises(MMDetCheckpointError, match="'backbone.bfp.refine.phi.bias'"):
        LibraCheckpointer(faster).load(str(tmp_path / "incomplete.pth"))


def test_converter_script_writes_what_plain_detectron2_loads(random_models, tmp_path):
    mm_checkpoint = random_models["retinanet"][3]
    model = _d2_model("libra_retinanet_R_50_FPN_1x_mmdet.yaml")
    LibraCheckpointer(model).load(mm_checkpoint)
    script = Path(__file__).resolve().parents[1] / "convert_mmdet_checkpoint.py"
    plain = _d2_model("libra_retinanet_R_50_FPN_1x_mmdet.yaml")
    for out in (tmp_path / "d2.pth", tmp_path / "d2.pkl"):
        subprocess.run([sys.executable, str(script), mm_checkpoint, str(out)], check=True)
        for p in plain.parameters():
            torch.nn.init.zeros_(p)
        DetectionCheckpointer(plain).load(str(out))
        for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), name


def test_fine_tune_on_shapes_from_an_mmdet_checkpoint(
    random_models, tiny_train, tiny_val, short_run, tmp_path
):
    """
    80-class mmdetection weights -> 6 libra_shapes classes: only the box predictor's weights are
    skipped (shape mismatch, with a warning), everything else loads, and training and
    evaluation run.
    """
    import train_net

    mm_checkpoint = random_models["faster_rcnn"][3]
    records = []  # what the checkpointer logs while loading MODEL.WEIGHTS
    handler = logging.Handler()
    handler.emit = records.append
    checkpoint_logger = logging.getLogger("fvcore.common.checkpoint")
    checkpoint_logger.addHandler(handler)
    config = str(COCO_CONFIGS / "libra_faster_rcnn_R_50_FPN_1x_mmdet.yaml")
    size = ["INPUT.MIN_SIZE_TRAIN", "(224,)", "INPUT.MAX_SIZE_TRAIN", "224"]
    size += ["INPUT.MIN_SIZE_TEST", "224", "INPUT.MAX_SIZE_TEST", "224"]
    opts = [*short_run(tmp_path, tiny_val, max_iter=2), *size, "MODEL.WEIGHTS", mm_checkpoint]
    opts += ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "6", "DATASETS.TEST", "()"]
    opts += ["DATASETS.TRAIN", f"('{tiny_train}',)", "SOLVER.BASE_LR", "0.0025"]  # 0.02 * 2 / 16
    # CPU-sized second stage (its fc1 is 12544 x 1024 per RoI)
    opts += ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64"]
    opts += ["MODEL.RPN.POST_NMS_TOPK_TEST", "50"]
    parse = train_net.default_argument_parser().parse_args
    try:
        train_net.main(parse(["--config-file", config, *opts]))
    finally:
        checkpoint_logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any("Converted the mmdetection checkpoint" in m for m in messages)
    skipped = {m.split("'")[1] for m in messages if m.startswith("Skip loading parameter")}
    predictor = "roi_heads.box_predictor."
    assert skipped == {
        f"{predictor}{p}.{t}" for p in ("cls_score", "bbox_pred") for t in ("weight", "bias")
    }
    [missing] = [m for m in messages if "not found in the checkpoint" in m]
    assert missing.count(predictor) == 2 and missing.count("\n") == 2  # those two layers only
    assert not any("not used by the model" in m for m in messages)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    last = [r for r in metrics if "total_loss" in r][-1]
    assert last["iteration"] == 1 and np.isfinite(last["total_loss"])

    final = str(tmp_path / "model_final.pth")
    evaluate = ["--eval-only", "--config-file", config, *opts, "MODEL.WEIGHTS", final]
    results = train_net.main(parse(evaluate + ["DATASETS.TEST", f"('{tiny_val}',)"]))
    assert np.isfinite(results["bbox"]["AP"])  # the fine-tuned model detects


@pytest.mark.parametrize(
    "mm_file, config",
    [
        ("libra-faster-rcnn_r101_fpn_1x_coco.py", "libra_faster_rcnn_R_101_FPN_1x_mmdet.yaml"),
        (
            "libra-faster-rcnn_x101-64x4d_fpn_1x_coco.py",
            "libra_faster_rcnn_X_101_64x4d_FPN_1x_mmdet.yaml",
        ),
    ],
)
def test_deeper_configs_have_mmdetection_tensors(mmdet, mm_file, config):
    """R-101 / X-101-64x4d: every mmdetection tensor fills one model tensor of the same shape."""
    from mmdet.registry import MODELS as MMDET_MODELS

    mm_state = MMDET_MODELS.build(mmdet_config(mmdet, mm_file).model).state_dict()
    model = _d2_model(config)
    converted = convert_mmdet_state_dict({"meta": {}, "state_dict": mm_state}, model.state_dict())
    d2_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == d2_shapes
