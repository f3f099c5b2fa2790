"""Libra Mask R-CNN and Libra Cascade (Mask) R-CNN: the cascade's sampling and per-stage balanced
L1 against closed forms, detectron2 checkpoints loading into the Libra versions, short training
runs through train_net.py that evaluate masks, and LVIS / Pascal VOC evaluation of the built-in
dataset through ``Trainer.build_evaluator`` with the ground truth as predictions."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json
from detectron2.data.datasets.pascal_voc import register_pascal_voc
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances, PolygonMasks, pairwise_iou
from detectron2.utils.events import EventStorage

import train_net
from libra_d2.checkpoint import LibraCheckpointer
from libra_d2.checks import load_config
from libra_d2.config import add_libra_config
from libra_d2.modeling import BalancedL1FastRCNNOutputLayers, IoUBalancedCascadeROIHeads

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPES_CASCADE = CONFIGS / "libra_shapes" / "libra_cascade_mask_rcnn_R_18_FPN.yaml"


def _cascade_heads():
    torch.manual_seed(0)
    model = build_model(load_config(str(SHAPES_CASCADE), ["MODEL.DEVICE", "cpu"]))
    assert type(model.roi_heads) is IoUBalancedCascadeROIHeads
    return model.roi_heads.train()


def _features(size=224, channels=64):
    g = torch.Generator().manual_seed(0)
    return {
        f"p{k}": torch.randn(1, channels, size // 2**k, size // 2**k, generator=g)
        for k in range(2, 7)
    }


def test_cascade_draws_iou_balanced_negatives():
    """One object at (50, 50, 100, 100); 1000 negatives with IoU 0 and 30 with IoU in
    (0.35, 0.47) (the object shifted right by 18-24 px). The quota of 256 ROIs takes the GT box as
    its one positive and 255 negatives: detectron2's random draw would keep ~255 * 30 / 1030 = 7.4
    of the 30; IoU-balanced sampling (3 bins over [0, 1)) takes int(255 / 3) = 85 from the bin
    [1/3, 2/3), i.e. all 30. The ROIs that reach the cascade (returned in training) are these."""
    heads = _cascade_heads()
    rng = torch.Generator().manual_seed(0)
    gt = torch.tensor([[50.0, 50.0, 100.0, 100.0]])
    shift = 18 + 6 * torch.rand(30, generator=rng)
    hard = gt.repeat(30, 1) + torch.stack([shift, 0 * shift, shift, 0 * shift], 1)
    xy = 150 + 20 * torch.rand(1000, 2, generator=rng)
    easy = torch.cat([xy, xy + 40], 1).clamp(max=224)
    proposals = Instances((224, 224))
    proposals.proposal_boxes = Boxes(torch.cat([easy, hard]))
    proposals.objectness_logits = torch.zeros(1030)
    targets = Instances((224, 224))
    targets.gt_boxes = Boxes(gt)
    targets.gt_classes = torch.tensor([2])
    targets.gt_masks = PolygonMasks([[np.array([50.0, 50, 100, 50, 100, 100, 50, 100])]])
    ious = pairwise_iou(Boxes(hard), targets.gt_boxes)[:, 0]
    assert 0.34 < float(ious.min()) and float(ious.max()) < 0.5
    torch.manual_seed(0)
    with EventStorage(0) as storage:
        (sampled,), losses = heads(None, _features(), [proposals], [targets])
        stats = storage.latest()
    bg = sampled.gt_classes == heads.num_classes
    assert int((~bg).sum()) == 1 and int(bg.sum()) == 255
    neg_iou = pairwise_iou(sampled.proposal_boxes[bg], targets.gt_boxes)[:, 0]
    assert int((neg_iou > 0.3).sum()) == 30
    assert stats["roi_head/neg_mean_iou"][0] == pytest.approx(float(neg_iou.mean()), rel=1e-5)
    assert {f"loss_box_reg_stage{k}" for k in range(3)} | {"loss_mask"} <= set(losses)


def _bl1(d, alpha=0.5, gamma=1.5):
    """The paper's balanced L1 (Eq. 8, beta = 1) of one |difference| d, written out with math."""
    b = math.exp(gamma / alpha) - 1
    if d < 1:
        return alpha / b * (b * d + 1) * math.log(b * d + 1) - alpha * d
    return gamma * d + gamma / b - alpha


def test_every_cascade_stage_regresses_with_balanced_l1_and_its_own_box_coder():
    """A foreground ROI (0, 0, 10, 10) whose ground truth is shifted right by 0.5 px: the x target
    is wx * 0.5 / 10 with each stage's weights (10, 20, 30), i.e. 0.5, 1.0 and 1.5 (inlier,
    boundary, outlier); zero predictions give loss BL1(0.5), BL1(1.0), BL1(1.5) over 1 ROI."""
    heads = _cascade_heads()
    assert len(heads.box_predictor) == 3
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[0.5, 0.0, 10.5, 10.0]])
    for k, predictor in enumerate(heads.box_predictor):
        assert isinstance(predictor, BalancedL1FastRCNNOutputLayers)
        assert predictor.box_reg_loss_type == "balanced_l1"
        loss = predictor.box_reg_loss(proposal, gt, torch.zeros(1, 4), torch.tensor([0]))
        assert float(loss) == pytest.approx(_bl1(0.5 * (k + 1)), rel=1e-5)


@pytest.mark.parametrize(
    "zoo", ["COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x", "Misc/cascade_mask_rcnn_R_50_FPN_1x"]
)
def test_detectron2_checkpoint_loads_with_only_bfp_missing(zoo, tmp_path):
    """A checkpoint of detectron2's own model (its model zoo config, random weights) fills every
    tensor of the Libra version but the BFP's, with no leftover or mismatched tensor."""
    libra = zoo.replace("/", "/libra_") + ".yaml"
    cfg = add_libra_config(get_cfg())
    cfg.merge_from_file(model_zoo.get_config_file(zoo + ".yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    base = build_model(cfg)
    DetectionCheckpointer(base, save_dir=str(tmp_path)).save("d2")
    base_state = base.state_dict()
    del base
    libra = build_model(load_config(str(CONFIGS / libra), ["MODEL.DEVICE", "cpu"]))
    checkpointer = LibraCheckpointer(libra)
    results = []
    load_model = checkpointer._load_model  # what Checkpointer.load reports (and logs)
    checkpointer._load_model = lambda ckpt: results.append(load_model(ckpt)) or results[-1]
    checkpointer.load(str(tmp_path / "d2.pth"))
    (result,) = results
    assert result.unexpected_keys == [] and result.incorrect_shapes == []
    bfp_keys = sorted(set(libra.state_dict()) - set(base_state))
    assert bfp_keys and all(k.startswith("backbone.bfp.") for k in bfp_keys)
    assert sorted(result.missing_keys) == bfp_keys
    state = libra.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())


def _records(output_dir):
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name", ["libra_mask_rcnn_R_18_FPN", "libra_cascade_mask_rcnn_R_18_FPN"])
def test_libra_mask_models_train_and_evaluate_masks(name, tiny_val, short_run, tmp_path):
    """2 iterations through train_net.main, then COCOEvaluator's box and mask AP on 12 images."""
    torch.manual_seed(0)
    config = str(CONFIGS / "libra_shapes" / f"{name}.yaml")
    opts = [*short_run(tmp_path, tiny_val, 2), "TEST.DETECTIONS_PER_IMAGE", "20"]
    train_net.main(train_net.default_argument_parser().parse_args(["--config-file", config, *opts]))
    records = _records(tmp_path)
    train = [r for r in records if "total_loss" in r]
    stages = [f"_stage{k}" for k in range(3)] if "cascade" in name else [""]
    losses = ["loss_mask"] + [f"loss_box_reg{s}" for s in stages]
    for r in train:
        assert all(math.isfinite(r[k]) for k in losses)
        assert "roi_head/neg_mean_iou" in r  # IoU-balanced sampling in use
    (final,) = [r for r in records if "bbox/AP" in r]
    for task in ("bbox", "segm"):
        assert 0 <= final[f"{task}/AP"] <= 100


# ------------------------------------------------ LVIS and Pascal VOC formats of libra_shapes_val
def _gt_as_predictions(dataset_name, shift=0.0):
    """(inputs, outputs) for every image: the ground truth (boxes shifted right by ``shift`` px)
    as detections with score 1 and masks rasterised from the ground-truth polygons."""
    inputs, outputs = [], []
    for d in DatasetCatalog.get(dataset_name):
        h, w, anns = d["height"], d["width"], d["annotations"]
        inst = Instances((h, w))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        boxes = torch.tensor(boxes, dtype=torch.float32)
        boxes[:, 0::2] += shift
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
        if "segmentation" in anns[0]:
            rles = [mask_util.frPyObjects(a["segmentation"], h, w) for a in anns]
            masks = [mask_util.decode(mask_util.merge(r)) for r in rles]
            inst.pred_masks = torch.from_numpy(np.stack(masks)).bool()
        inputs.append({"image_id": d["image_id"], "height": h, "width": w})
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(cfg, dataset_name, tmp_path, shift=0.0):
    evaluator = train_net.Trainer.build_evaluator(cfg, dataset_name, str(tmp_path / "eval"))
    evaluator.reset()
    for inp, out in zip(*_gt_as_predictions(dataset_name, shift)):
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def _check_ground_truth_scores_100(dataset, mask_on, tmp_path):
    """Through build_evaluator: the ground truth as predictions scores AP 100 for boxes and, with
    MODEL.MASK_ON (only then), masks; boxes shifted by 4 px score less."""
    cfg = add_libra_config(get_cfg())
    cfg.MODEL.MASK_ON = mask_on
    results = _evaluate(cfg, dataset, tmp_path)
    assert set(results) == ({"bbox", "segm"} if mask_on else {"bbox"})
    for task in results:
        assert results[task]["AP"] == pytest.approx(100.0)
    assert _evaluate(cfg, dataset, tmp_path, shift=4.0)["bbox"]["AP"] < 90


@pytest.mark.parametrize("mask_on", [True, False], ids=["mask", "box"])
def test_coco_split_evaluates_boxes_and_masks(tiny_val, mask_on, tmp_path):
    """Through build_evaluator (COCOEvaluator): the ground truth as predictions scores AP 100 for
    boxes and, with MODEL.MASK_ON (only then), masks; boxes shifted by 4 px score less."""
    _check_ground_truth_scores_100(tiny_val, mask_on, tmp_path)


@pytest.fixture(scope="module")
def lvis_val(shapes_dataset, tmp_path_factory):
    """The first 12 images of libra_shapes_val in LVIS v1 format, registered as an LVIS dataset
    (every category frequent, every image exhaustively annotated)."""
    name = "libra_shapes_val_lvis_tiny"
    if name not in DatasetCatalog:
        json_file, image_root = shapes_dataset["val"]
        coco = json.loads(Path(json_file).read_text())
        images = coco["images"][:12]
        keep = {im["id"] for im in images}
        for im in images:  # detectron2 finds LVIS images by the last two parts of coco_url
            im.update(coco_url=f"http://libra_shapes/images/{Path(im['file_name']).name}")
            im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
        anns = [a for a in coco["annotations"] if a["image_id"] in keep]
        cats = [{**c, "frequency": "f", "synonyms": [c["name"]]} for c in coco["categories"]]
        path = tmp_path_factory.mktemp("lvis") / "lvis_v1_val.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        root = str(Path(image_root).parent) + "/"  # image_root + "images/<file>"
        # register_lvis_instances, with the shapes' classes (it only knows LVIS v0.5 / v1's)
        DatasetCatalog.register(name, lambda: load_lvis_json(str(path), root))
        MetadataCatalog.get(name).set(
            json_file=str(path),
            image_root=root,
            evaluator_type="lvis",
            thing_classes=[c["name"] for c in cats],
        )
    return name


@pytest.mark.parametrize("mask_on", [True, False], ids=["mask", "box"])
def test_lvis_split_evaluates_boxes_and_masks(lvis_val, mask_on, tmp_path):
    """Through build_evaluator (LVISEvaluator + the lvis package): the ground truth as predictions
    scores AP 100 for boxes and, with MODEL.MASK_ON, masks; boxes shifted by 4 px score less."""
    files = DatasetCatalog.get(lvis_val)
    assert Path(files[0]["file_name"]).is_file()
    _check_ground_truth_scores_100(lvis_val, mask_on, tmp_path)


@pytest.fixture(scope="module")
def voc_val(shapes_dataset, tmp_path_factory):
    """The annotations of the first 12 images of libra_shapes_val as a Pascal VOC 2007 split
    (Annotations/*.xml, ImageSets/Main/val.txt), registered with detectron2's VOC loader."""
    name = "libra_shapes_val_voc_tiny"
    if name not in DatasetCatalog:
        json_file, image_root = shapes_dataset["val"]
        coco = json.loads(Path(json_file).read_text())
        classes = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        root = tmp_path_factory.mktemp("voc")
        for sub in ("Annotations", "ImageSets/Main"):
            (root / sub).mkdir(parents=True)
        ids = []
        for im in coco["images"][:12]:
            stem = Path(im["file_name"]).stem
            ids.append(stem)
            objects = "".join(
                f"<object><name>{classes[a['category_id'] - 1]}</name><pose>Unspecified</pose>"
                "<truncated>0</truncated><difficult>0</difficult>"
                f"<bndbox><xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
                f"<xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}"
                "</ymax></bndbox></object>"
                for a in coco["annotations"]
                if a["image_id"] == im["id"]
            )
            (root / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><size><width>{im['width']}</width><height>{im['height']}</height>"
                f"</size>{objects}</annotation>"
            )
        (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids) + "\n")
        register_pascal_voc(name, str(root), "val", 2007, classes)
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"  # as for detectron2's VOC sets
    return name


def test_voc_split_evaluates_boxes(voc_val, tmp_path):
    """Through build_evaluator (PascalVOCDetectionEvaluator): the ground truth as predictions
    scores AP50 100; boxes shifted by 4 px score less."""
    cfg = add_libra_config(get_cfg())
    results = _evaluate(cfg, voc_val, tmp_path)
    assert results["bbox"]["AP50"] == pytest.approx(100.0)
    assert _evaluate(cfg, voc_val, tmp_path, shift=4.0)["bbox"]["AP"] < 90


# ------------------------------------------------------------------------------ export_model.py
def test_export_compares_mask_probabilities():
    import export_model

    expected = Instances((32, 32))
    expected.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 20.0, 20.0]]))
    expected.scores = torch.tensor([0.9, 0.8])
    expected.pred_classes = torch.tensor([1, 2])
    expected.pred_masks = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    actual = Instances((32, 32), **{k: v.clone() for k, v in expected.get_fields().items()})
    assert export_model.max_mask_difference(expected, actual) == 0.0
    actual.pred_masks[1, 0, 3, 4] += 0.25
    assert export_model.max_mask_difference(expected, actual) == pytest.approx(0.25)
    expected.remove("pred_masks")
    assert export_model.max_mask_difference(expected, actual) == 0.0


def test_export_model_exports_libra_mask_rcnn(tmp_path, shapes_dataset, caplog):
    """TorchScript export of Libra Mask R-CNN (random weights): masks compared with eager."""
    import export_model

    config = str(CONFIGS / "libra_shapes" / "libra_mask_rcnn_R_18_FPN.yaml")
    argv = ["--config-file", config, "--format", "torchscript", "--output", str(tmp_path)]
    with caplog.at_level("INFO", logger="libra_d2.export_model"):
        assert export_model.main([*argv, "MODEL.DEVICE", "cpu"]) == 0
    masks = re.findall(r"max \|mask probabilities diff\| = ([^\s,]+)", caplog.text)
    assert [float(m) for m in masks] == [0.0] * 3  # the sample, landscape and portrait sizes
