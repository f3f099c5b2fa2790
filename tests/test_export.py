"""Deployment: Libra Faster R-CNN (BFP + IoU-balanced sampling + balanced L1) traced to TorchScript
and ONNX through detectron2's TracingAdapter and scripted; torch.export, AOTInductor and dynamo
ONNX of every model family (libra_d2/deploy.py), run in a process without detectron2; exported vs
eager detections; the export-time replacements against detectron2's functions; export_model.py."""

import io
import json
import logging
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from detectron2.data import detection_utils
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

import export_model
from libra_d2.checks import load_config
from libra_d2.deploy import (
    compile_aoti,
    eager_detections,
    export_onnx_dynamo,
    export_program,
    fast_rcnn_inference_single_image,
    find_top_rpn_proposals,
    output_names,
)
from libra_d2.export import (
    ExportError,
    detections,
    export_onnx,
    export_torchscript,
    onnx_symbolics,
    preprocess_image,
    run_eager,
    run_onnx,
)
from libra_d2.modeling import (
    BalancedFPN,
    BalancedL1FastRCNNOutputLayers,
    IoUBalancedROIHeads,
    LibraRPN,
)
from libra_d2.modeling.bfp import (
    NonLocal2d,
    adaptive_max_pool2d_by_gather,
    add_nearest_upsampled,
    max_pool_to,
)

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "configs", "libra_shapes", "libra_faster_rcnn_R_18_FPN.yaml"
)
OPTS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # a random-init model still outputs boxes
ATOL = 1e-4


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG, OPTS)


def _family_model(name, opts=()):
    """The model of the shapes config ``name`` (score thresholds 0, then ``opts``), seeded; a new
    non-local block is the identity (zero output conv): it gets weights so that the attention path
    of the BFP changes the detections, as in a trained model."""
    config = CONFIG.replace("libra_faster_rcnn_R_18_FPN", name)
    cfg = load_config(config, OPTS + ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if hasattr(model.backbone, "bfp"):
        with torch.no_grad():
            nn.init.normal_(model.backbone.bfp.refine.conv_out.weight, std=0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return _family_model("libra_faster_rcnn_R_18_FPN")


@pytest.fixture(scope="module")
def val_images(cfg, shapes_dataset):
    """(images, paths) of the first 2 libra_shapes val images; images (3, 224, 224) float32."""
    json_file, image_root = shapes_dataset["val"]
    with open(json_file) as f:
        names = [im["file_name"] for im in json.load(f)["images"][:2]]
    paths = [os.path.join(image_root, name) for name in names]
    images = [detection_utils.read_image(p, format=cfg.INPUT.FORMAT) for p in paths]
    return [preprocess_image(cfg, image) for image in images], paths


@pytest.fixture(scope="module")
def torchscript_export(model, val_images, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ts") / "model.ts")
    traced, adapter = export_torchscript(model, val_images[0][0], path)
    return traced, adapter, path


def _assert_same_detections(expected, actual, atol=ATOL):
    assert len(expected) > 0
    torch.testing.assert_close(actual.pred_classes, expected.pred_classes, rtol=0, atol=0)
    torch.testing.assert_close(
        actual.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=atol
    )
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=atol)
    assert tuple(actual.image_size) == tuple(expected.image_size)


def test_model_has_all_three_libra_components(model):
    assert isinstance(model.backbone, BalancedFPN)
    assert isinstance(model.backbone.bfp.refine, NonLocal2d)
    assert isinstance(model.roi_heads, IoUBalancedROIHeads)
    assert isinstance(model.roi_heads.box_predictor, BalancedL1FastRCNNOutputLayers)


def test_eager_reference_is_the_models_own_inference(model, torchscript_export, val_images):
    """run_eager (the reference of every parity test) is GeneralizedRCNN.inference itself."""
    _, adapter, _ = torchscript_export
    image = val_images[0][1]
    with torch.no_grad():
        (direct,) = model.inference([{"image": image}], do_postprocess=False)
    _assert_same_detections(direct, run_eager(adapter, image), atol=0)


# ---------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------
def test_traced_matches_eager_on_val_images(torchscript_export, val_images):
    traced, adapter, _ = torchscript_export
    images, _ = val_images
    assert tuple(images[0].shape) == (3, 224, 224)
    for image in images:  # the first one was traced with, the second one was not
        with torch.no_grad():
            _assert_same_detections(run_eager(adapter, image), detections(adapter, traced(image)))


def test_traced_model_runs_at_other_sizes(torchscript_export):
    # BFP sizes are traced as aten::size values, not constants
    traced, adapter, _ = torchscript_export
    image = torch.rand(3, 192, 288, generator=torch.Generator().manual_seed(0)) * 255
    expected = run_eager(adapter, image)
    assert [int(s) for s in expected.image_size] == [192, 288]
    with torch.no_grad():
        _assert_same_detections(expected, detections(adapter, traced(image)))


def test_torchscript_save_load_round_trip(torchscript_export, val_images):
    _, adapter, path = torchscript_export
    loaded = torch.jit.load(path)
    for image in val_images[0]:
        with torch.no_grad():
            _assert_same_detections(run_eager(adapter, image), detections(adapter, loaded(image)))


def test_scripted_model_matches_eager(model, val_images):
    """The whole Libra Faster R-CNN (BFP, LibraRPN, IoU-balanced heads with balanced L1) scripts
    the way detectron2 scripts its own R-CNNs, and the script gives the eager detections."""
    from detectron2.export import scripting_with_instances

    assert isinstance(model.proposal_generator, LibraRPN)
    fields = {"proposal_boxes": Boxes, "objectness_logits": torch.Tensor}
    fields.update(pred_boxes=Boxes, scores=torch.Tensor, pred_classes=torch.Tensor)
    scripted = scripting_with_instances(model, fields)
    for image in val_images[0]:
        with torch.no_grad():
            (expected,) = model.inference([{"image": image}], do_postprocess=False)
            (actual,) = scripted.inference([{"image": image}], do_postprocess=False)
        _assert_same_detections(expected, actual, atol=0)


def test_libra_rpn_scripts_like_detectrons_rpn(model, val_images):
    """torch.jit.script of the RPN on its own compiles its training branch too: LibraRPN keeps
    the @torch.jit.unused marker of the methods it overrides there."""
    from detectron2.export.torchscript_patch import patch_instances

    rpn = model.proposal_generator
    with patch_instances({"proposal_boxes": Boxes, "objectness_logits": torch.Tensor}):
        scripted = torch.jit.script(rpn)
    images = model.preprocess_image([{"image": val_images[0][0]}])
    with torch.no_grad():
        features = model.backbone(images.tensor)
        (expected,), _ = rpn(images, features)
        (actual,), _ = scripted(images, features)
    assert len(expected) == rpn.post_nms_topk[False] and len(actual) == len(expected)
    assert torch.equal(actual.proposal_boxes.tensor, expected.proposal_boxes.tensor)
    assert torch.equal(actual.objectness_logits, expected.objectness_logits)


def test_trace_requires_eval_mode(model, val_images):
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            export_torchscript(model, val_images[0][0], "unused.ts")
    finally:
        model.eval()


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------
def test_onnx_matches_eager_on_val_images(model, val_images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    images, _ = val_images
    path = str(tmp_path / "model.onnx")
    adapter = export_onnx(model, images[0], path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == [3, "height", "width"]
    outputs = ["pred_boxes", "pred_classes", "scores", "image_size"]
    assert [o.name for o in session.get_outputs()] == outputs
    for image in images:
        _assert_same_detections(
            run_eager(adapter, image), detections(adapter, run_onnx(path, image))
        )
    # dynamic height and width
    image = torch.rand(3, 192, 288, generator=torch.Generator().manual_seed(0)) * 255
    _assert_same_detections(run_eager(adapter, image), detections(adapter, run_onnx(path, image)))


def test_onnx_file_passes_checker(model, val_images, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = str(tmp_path / "model.onnx")
    export_onnx(model, val_images[0][0], path, opset_version=16)
    onnx.checker.check_model(path)
    assert onnx.load(path).opset_import[0].version == 16


class _AdaptiveMaxPool(nn.Module):
    """``F.adaptive_max_pool2d`` to a constant size, or to the size of ``ref`` (as the BFP)."""

    def __init__(self, output_size=None):
        super().__init__()
        self.output_size = output_size

    def forward(self, x, ref):
        return F.adaptive_max_pool2d(x, self.output_size or ref.shape[-2:])


def _export_to_bytes(module, args, **kwargs):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=17, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("output_size", [None, (4, 3)], ids=["traced_size", "constant_size"])
def test_adaptive_max_pool2d_symbolic_is_exact(output_size):
    ort = pytest.importorskip("onnxruntime")
    module = _AdaptiveMaxPool(output_size)
    g = torch.Generator().manual_seed(0)
    sizes = [((14, 14), (4, 4)), ((56, 56), (14, 14)), ((7, 5), (3, 7)), ((9, 13), (9, 13))]
    with onnx_symbolics(17):
        data = _export_to_bytes(
            module,
            (torch.randn(1, 2, 14, 14, generator=g), torch.zeros(1, 1, 4, 4)),
            input_names=["x", "ref"],
            dynamic_axes={"x": {2: "h", 3: "w"}, "ref": {2: "rh", 3: "rw"}},
        )
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for in_size, ref_size in sizes:  # non-divisible, divisible, upsampling along w, identity
        x, ref = torch.randn(1, 2, *in_size, generator=g), torch.zeros(1, 1, *ref_size)
        feed = {"x": x.numpy(), "ref": ref.numpy()}  # a constant size leaves "ref" unused
        (out,) = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})
        torch.testing.assert_close(torch.from_numpy(out), module(x, ref), rtol=0, atol=0)


def test_builtin_adaptive_max_pool2d_symbolic_is_back_after_export():
    # The built-in one only handles constant sizes that divide the input size (not 14 -> 4).
    with pytest.raises(torch.onnx.errors.OnnxExporterError, match="adaptive_max_pool2d"):
        _export_to_bytes(_AdaptiveMaxPool((4, 4)), (torch.randn(1, 2, 14, 14), torch.zeros(1)))


class _Cummax(nn.Module):
    """A 'detector' whose only op, cummax, has no ONNX symbolic."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, batched_inputs):
        return [{"cummax": torch.cummax(batched_inputs[0]["image"] * self.scale, dim=1)[0]}]


def test_onnx_unsupported_operator_is_named(tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=r"ONNX export failed at operator aten::cummax"):
        export_onnx(_Cummax().eval(), torch.rand(3, 8, 8), str(path))
    assert not path.exists()


def test_onnx_rejects_old_opset(model, val_images, tmp_path):
    with pytest.raises(ExportError, match="opset 15 is too old"):
        export_onnx(model, val_images[0][0], str(tmp_path / "model.onnx"), opset_version=15)


# ---------------------------------------------------------------------------------------------
# export_model.py
# ---------------------------------------------------------------------------------------------
def _comparison_logs(caplog):
    """The lines in which export_model.py reports the exported vs eager comparisons."""
    return [r.getMessage() for r in caplog.records if "vs eager" in r.getMessage()]


def test_export_model_torchscript_default_sample_image(shapes_dataset, tmp_path, caplog):
    argv = ["--config-file", CONFIG, "--format", "torchscript", "--output", str(tmp_path), *OPTS]
    with caplog.at_level(logging.INFO, logger="libra_d2.export_model"):
        assert export_model.main(argv) == 0
    lines = _comparison_logs(caplog)  # the sample, landscape and portrait sizes
    assert [line.split(" vs eager at ")[1].split(":")[0] for line in lines] == [
        "(224, 224)",
        "(168, 224)",
        "(224, 168)",
    ]
    assert "max |boxes diff| = 0," in lines[0]  # traced = eager, bit for bit
    traced = torch.jit.load(str(tmp_path / "model.ts"))
    outputs = traced(torch.rand(3, 224, 224) * 255)
    assert [tuple(t.shape)[1:] for t in outputs[:3]] == [(4,), (), ()]


def test_export_model_onnx_torchscript_exporter(val_images, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    argv = ["--config-file", CONFIG, "--format", "onnx", "--onnx-exporter", "torchscript"]
    argv += ["--sample-image", val_images[1][1], "--output", str(tmp_path / "out")]
    with caplog.at_level(logging.INFO, logger="libra_d2.export_model"):
        assert export_model.main(argv + ["--atol", str(ATOL), *OPTS]) == 0
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 0
    for line in _comparison_logs(caplog):
        num = int(line.split(": ")[1].split(" vs ")[0])
        assert num > 0 and f"{num} vs {num} detections" in line


def test_export_model_reports_an_exported_model_that_differs(
    shapes_dataset, tmp_path, monkeypatch, caplog
):
    real = export_model.run_in_fresh_process

    def half_a_pixel_off(*args):
        outputs = real(*args)
        return [(o[0] + 0.5, *o[1:]) for o in outputs]

    monkeypatch.setattr(export_model, "run_in_fresh_process", half_a_pixel_off)
    argv = ["--config-file", CONFIG, "--format", "torchscript", "--output", str(tmp_path), *OPTS]
    with caplog.at_level(logging.INFO, logger="libra_d2.export_model"):
        assert export_model.main(argv) == 1
    assert "max |boxes diff| = 0.5, max |scores diff| = 0\n" in caplog.text
    assert "differs from eager inference by more than" in caplog.text


def test_export_model_aoti_checks_the_mean_image_instead_of_nans(
    shapes_dataset, tmp_path, monkeypatch, caplog
):
    # The package's fused ReLUs turn NaN into 0, so its image without detections is the mean
    # image. Not compiled here (test_aoti_package_runs_without_detectron2 compiles one): the
    # check runs the exported program that export_model.py writes beside the package.
    monkeypatch.setattr(export_model, "compile_aoti", lambda program, path: 0.0)
    real, seen = export_model.run_in_fresh_process, []

    def run_program(fmt, path, images):
        seen.append((fmt, images))
        return real("export", str(tmp_path / "model.pt2"), images)

    monkeypatch.setattr(export_model, "run_in_fresh_process", run_program)
    argv = ["--config-file", CONFIG, "--format", "aoti", "--output", str(tmp_path), *OPTS]
    with caplog.at_level(logging.INFO, logger="libra_d2.export_model"):
        assert export_model.main(argv) == 0
    ((fmt, images),) = seen
    mean = torch.tensor(load_config(CONFIG).MODEL.PIXEL_MEAN)[:, None, None]
    assert fmt == "aoti" and len(images) == 4 == len(_comparison_logs(caplog))
    assert torch.equal(images[-1], mean.expand_as(images[0]))


def test_max_differences_of_exported_detections():
    def instances(boxes, scores, classes):
        inst = Instances((20, 30))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        return inst

    a = instances([[1, 2, 5, 6], [0, 0, 9, 9]], [0.9, 0.5], [1, 3])
    b = instances([[1, 2, 5.25, 6], [0, 0, 9, 9]], [0.9, 0.375], [1, 3])
    assert export_model.max_differences(a, b) == (0.25, 0.125)
    assert export_model.max_differences(a, b[[1, 0]]) == (0.25, 0.125)  # in another order
    inf = (float("inf"), float("inf"))
    assert export_model.max_differences(a, instances(a.pred_boxes.tensor, a.scores, [1, 2])) == inf
    assert export_model.max_differences(a, a[:1]) == inf
    assert export_model.max_differences(a[:0], b[:0]) == (0.0, 0.0)


def test_export_model_fails_when_it_cannot_check(val_images, tmp_path, monkeypatch, caplog):
    def no_onnxruntime(*args):
        raise RuntimeError("ModuleNotFoundError: No module named 'onnxruntime'")

    monkeypatch.setattr(export_model, "run_in_fresh_process", no_onnxruntime)
    argv = ["--config-file", CONFIG, "--format", "onnx", "--onnx-exporter", "torchscript"]
    argv += ["--sample-image", val_images[1][1]]
    assert export_model.main(argv + ["--output", str(tmp_path), *OPTS]) == 1
    assert "could not be run without detectron2: ModuleNotFoundError" in caplog.text


def test_export_model_refuses_models_without_an_export_path(tmp_path, capsys):
    config = CONFIG.replace("libra_faster_rcnn_R_18_FPN", "libra_fast_rcnn_R_18_FPN")
    with pytest.raises(SystemExit) as e:
        export_model.main(["--config-file", config, "--output", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "export_model.py: error: --format export: a Fast R-CNN (PrecomputedProposals) needs "
        "proposals as input, not only an image\n"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sample-image", "no_such.png"], "image 'no_such.png' does not exist"),
        (["--format", "onnx", "--onnx-exporter", "torchscript", "--opset", "13"], "opset 13"),
        (["--format", "onnx", "--opset", "17"], "--opset 17: the dynamo exporter needs >= 18"),
        (["MODEL.WEIGHTS", "no_such.pth"], "MODEL.WEIGHTS 'no_such.pth' does not exist"),
        (["MODEL.NO_SUCH_KEY", "1"], "NO_SUCH_KEY"),
        (["MODEL.BFP.REFINE_TYPE", "attention"], "MODEL.BFP.REFINE_TYPE = 'attention'"),
    ],
)
def test_export_model_bad_arguments(tmp_path, capsys, extra, message):
    argv = ["--config-file", CONFIG, "--output", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as e:
        export_model.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("export_model.py: error: ") and message in err
    assert not os.listdir(tmp_path)


def test_export_model_output_is_a_file(tmp_path, capsys):
    output = tmp_path / "a_file"
    output.write_text("")
    with pytest.raises(SystemExit):
        export_model.main(["--config-file", CONFIG, "--output", str(output)])
    assert f"--output '{output}' cannot be created or written to" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# torch.export, AOTInductor, ONNX (dynamo): export-time replacements and the exported files run
# in a fresh process without detectron2 (libra_d2/run_exported.py)
# ---------------------------------------------------------------------------------------------
RUNNER = os.path.join(os.path.dirname(__file__), "..", "libra_d2", "run_exported.py")


@pytest.fixture(scope="module")
def photo_images(cfg):
    """A real photo (grace_hopper, portrait) resized as at test time (224 x 191), it resized to
    3/4 of its height and of its width (export_model.check_images), and an image of NaNs."""
    from mmdet_reference import PHOTO

    image = preprocess_image(cfg, detection_utils.read_image(PHOTO, format=cfg.INPUT.FORMAT))
    return export_model.check_images(image) + [torch.full_like(image, float("nan"))]


@pytest.fixture(scope="module")
def exported(model, photo_images, tmp_path_factory):
    """(ExportedProgram, path of model.pt2) of the Libra model, exported with the photo."""
    path = str(tmp_path_factory.mktemp("pt2") / "model.pt2")
    program, _ = export_program(model, photo_images[0], 224, path)
    return program, path


def _run_fresh(fmt, path, images):
    return export_model.run_in_fresh_process(fmt, path, images)


def _assert_same_as_eager(model, images, outputs):
    """Same count and classes (detections paired by export_model.paired), boxes within 1e-3 px,
    scores within 1e-4, mask probabilities within 1e-3 (mask models); detections on all but the
    last image, none on it."""
    for image, output in zip(images, outputs):
        expected = eager_detections(model, image)
        actual = export_model.instances_of(output, output_names(model))
        assert len(actual) == len(expected)
        assert tuple(actual.image_size) == tuple(image.shape[1:])
        boxes, scores = export_model.max_differences(expected, actual)
        assert boxes <= 1e-3 and scores <= 1e-4, (boxes, scores)
        assert actual.has("pred_masks") == expected.has("pred_masks")
        assert export_model.max_mask_difference(expected, actual) <= 1e-3
    assert [len(o[0]) > 0 for o in outputs] == [True] * (len(outputs) - 1) + [False]


def _rpn_inputs(model, image):
    """Decoded proposals and objectness logits of the model's RPN on ``image`` (real inputs of
    find_top_rpn_proposals), and the image size."""
    rpn = model.proposal_generator
    images = model.preprocess_image([{"image": image}])
    with torch.no_grad():
        features = [model.backbone(images.tensor)[f] for f in rpn.in_features]
        logits, deltas = rpn.rpn_head(features)
        logits = [s.permute(0, 2, 3, 1).flatten(1) for s in logits]
        deltas = [d.view(1, -1, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2) for d in deltas]
        anchors = rpn.anchor_generator(features)
        proposals = rpn._decode_proposals(anchors, [d.flatten(1, -2) for d in deltas])
    return proposals, logits, images.image_sizes[0]


def test_find_top_rpn_proposals_equals_detectron2s(model, photo_images):
    from detectron2.modeling.proposal_generator.proposal_utils import (
        find_top_rpn_proposals as detectron2s,
    )

    rpn = model.proposal_generator
    proposals, logits, image_size = _rpn_inputs(model, photo_images[0])
    # among each level's top-scored proposals: non-finite boxes and logits, boxes that are empty
    # or become empty when clipped to the image
    for level, (p, s) in enumerate(zip(proposals, logits)):
        top = s[0].topk(8).indices
        p[0, top[0], 2] = float("nan")
        p[0, top[1], 0] = float("-inf")
        s[0, top[2]] = float("inf")
        s[0, top[3]] = float("nan")
        p[0, top[4]] = torch.tensor([50.0, 50.0, 40.0, 60.0])  # x2 < x1
        p[0, top[5]] = torch.tensor([300.0, 10.0, 400.0, 20.0])  # right of the image
    args = (rpn.nms_thresh, rpn.pre_nms_topk[False], rpn.post_nms_topk[False], rpn.min_box_size)
    (expected,) = detectron2s(proposals, logits, [image_size], *args, training=False)
    ((boxes, scores),) = find_top_rpn_proposals(proposals, logits, [image_size], *args)
    assert len(expected) == rpn.post_nms_topk[False]
    assert torch.equal(boxes, expected.proposal_boxes.tensor)
    assert torch.equal(scores, expected.objectness_logits)


def test_fast_rcnn_inference_equals_detectron2s(model, photo_images):
    from detectron2.modeling.roi_heads.fast_rcnn import (
        fast_rcnn_inference_single_image as detectron2s,
    )

    predictor = model.roi_heads.box_predictor
    image = photo_images[0]
    images = model.preprocess_image([{"image": image}])
    with torch.no_grad():
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features)
        box_features = model.roi_heads.box_pooler(
            [features[f] for f in model.roi_heads.box_in_features],
            [p.proposal_boxes for p in proposals],
        )
        predictions = predictor(model.roi_heads.box_head(box_features))
        (boxes,) = predictor.predict_boxes(predictions, proposals)
        (probs,) = predictor.predict_probs(predictions, proposals)
    boxes[0, 2], boxes[3, 5], probs[5, 1] = float("nan"), float("inf"), float("nan")
    # all candidates; the top 1% (some classes may have none)
    for thresh in (0.0, probs[:, :-1].nan_to_num().quantile(0.99).item()):
        args = (image.shape[1:], thresh, predictor.test_nms_thresh, predictor.test_topk_per_image)
        expected, _ = detectron2s(boxes, probs, *args)
        actual = fast_rcnn_inference_single_image(boxes, probs, *args)
        assert 0 < len(expected) <= predictor.test_topk_per_image
        assert torch.equal(actual[0], expected.pred_boxes.tensor)
        assert torch.equal(actual[1], expected.scores)
        assert torch.equal(actual[2], expected.pred_classes)


def test_padding_pooling_and_clipping_equal_detectron2s(model, photo_images):
    from detectron2.modeling.poolers import assign_boxes_to_levels
    from detectron2.structures import ImageList

    from libra_d2.deploy import _clip, _pool, pad_image

    for h, w in [(224, 191), (65, 65), (96, 97), (129, 200)]:
        image = torch.rand(3, h, w)
        expected = ImageList.from_tensors([image], model.backbone.size_divisibility).tensor
        assert torch.equal(pad_image(image, model.backbone.size_divisibility), expected)
    image = photo_images[0]
    heads = model.roi_heads
    with torch.no_grad():
        (expected,) = model.inference([{"image": image}], do_postprocess=False)
        features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
        features = [features[f] for f in heads.box_in_features]
        boxes = expected.pred_boxes.tensor * 1.5 - 20  # some outside the image
        boxes[:4, 2:] += torch.tensor([[0.0, 0.0], [100.0, 100.0], [250.0, 250.0], [600.0, 600.0]])
        p = heads.box_pooler
        levels = assign_boxes_to_levels([Boxes(boxes)], p.min_level, p.max_level, 224, 4)
        assert len(levels.unique()) == len(features)  # boxes on every level
        pooled = heads.box_pooler(features, [Boxes(boxes)])
        assert torch.equal(_pool(heads.box_pooler, features, boxes), pooled)
    clipped = Boxes(boxes.clone())
    clipped.clip(tuple(image.shape[1:]))
    assert torch.equal(_clip(boxes, tuple(image.shape[1:])), clipped.tensor)


@pytest.mark.parametrize(
    "in_size, out_size",
    [
        ((14, 14), (4, 4)),
        ((56, 84), (14, 21)),
        ((14, 22), (4, 6)),
        ((7, 5), (3, 7)),
        ((9, 13), (9, 13)),
    ],
)
@pytest.mark.parametrize("exporting", [False, True])
def test_bfp_resizing_equals_aten(exporting, in_size, out_size, monkeypatch):
    # divisible (the BFP's gathers), 2k -> ceil(k/2) (to p6), upsampling along w, identity; a
    # NaN propagates as in ATen. exporting: the forms traced under torch.export.
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: exporting)
    x = torch.randn(2, 3, *in_size, generator=torch.Generator().manual_seed(0))
    x[1, 2, 0, 0] = float("nan")
    expected = F.adaptive_max_pool2d(x, out_size)
    for pool in (adaptive_max_pool2d_by_gather, max_pool_to):
        got = pool(x, list(out_size))
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    # the other direction: x + y upsampled by (at least along one axis) integer factors
    y = torch.randn(2, 3, *out_size, generator=torch.Generator().manual_seed(1))
    expected = x + F.interpolate(y, size=in_size, mode="nearest")
    got = add_nearest_upsampled(x, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_exported_bfp_resizes_by_integer_factors_where_the_sizes_divide(exported):
    # At every size of the padded input, P2 -> P4 and P3 -> P4 (gather) and P4 -> P5 (scatter)
    # divide: two amax each (columns, rows); P4 -> P6 (ceil(P5 / 2)) does not: two
    # gathers by an index matrix, two amax. P5 -> P4 (gather), P4 -> P3 and P4 -> P2 (scatter)
    # add y expanded over the blocks; only P6 -> P4 interpolates.
    aten = torch.ops.aten
    targets = [  # the BFP's ops
        n.target
        for n in exported[0].graph.nodes
        if n.op == "call_function"
        and any(path.split(".")[-1] == "bfp" for path, _ in n.meta["nn_module_stack"].values())
    ]
    assert targets.count(aten.amax.default) == 8
    assert targets.count(aten.index.Tensor) == 2
    assert targets.count(aten.expand.default) == 3
    assert targets.count(aten.upsample_nearest2d.vec) == 1
    assert aten.max_pool2d.default not in targets
    assert aten.adaptive_max_pool2d.default not in targets


@pytest.mark.slow
def test_exported_program_runs_without_detectron2(model, exported, photo_images):
    """model.pt2 in a fresh process (torch and torchvision only) gives eager inference's
    detections at the export size, a landscape and a portrait size, and none on NaNs."""
    _, path = exported
    sizes = [tuple(image.shape[1:]) for image in photo_images]
    assert sizes[0][0] > sizes[0][1] and sizes[1][0] < sizes[1][1] and sizes[2][0] > sizes[2][1]
    _assert_same_as_eager(model, photo_images, _run_fresh("export", path, photo_images))


FAMILIES = [  # Libra Cascade Mask R-CNN: test_export_model_default_format_on_a_mask_model
    "faster_rcnn_R_18_FPN",  # detectron2's baseline: FPN without BFP, StandardROIHeads
    "libra_retinanet_R_18_FPN",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_and_runs_without_detectron2(name, photo_images, tmp_path):
    model = _family_model(name)
    path = str(tmp_path / "model.pt2")
    export_program(model, photo_images[0], 224, path)  # 224: the shapes INPUT.MAX_SIZE_TEST
    _assert_same_as_eager(model, photo_images, _run_fresh("export", path, photo_images))


@pytest.mark.slow
def test_export_model_default_format_on_a_mask_model(shapes_dataset, tmp_path, caplog):
    """export_model.py writes model.pt2 by default and checks it in a fresh process at three
    sizes and on NaNs (mask probabilities included), here for the cascade with masks."""
    config = CONFIG.replace("libra_faster_rcnn_R_18_FPN", "libra_cascade_mask_rcnn_R_18_FPN")
    with caplog.at_level(logging.INFO, logger="libra_d2.export_model"):
        assert export_model.main(["--config-file", config, "--output", str(tmp_path), *OPTS]) == 0
    lines = _comparison_logs(caplog)
    assert [line.split(" vs eager at ")[1].split(":")[0] for line in lines] == [
        "(224, 224)",
        "(168, 224)",
        "(224, 168)",
        "(224, 224)",
    ]
    assert all("100 vs 100 detections" in line for line in lines[:3])
    assert "0 vs 0 detections" in lines[3]
    assert all("max |mask probabilities diff| = " in line for line in lines)
    assert sorted(os.listdir(tmp_path)) == ["model.pt2"]


@pytest.mark.slow
def test_onnx_dynamo_runs_without_detectron2(model, exported, photo_images, tmp_path):
    pytest.importorskip("onnxruntime")
    program, _ = exported
    path = str(tmp_path / "model.onnx")
    export_onnx_dynamo(program, path, output_names(model))
    _assert_same_as_eager(model, photo_images, _run_fresh("onnx", path, photo_images))


@pytest.mark.slow
def test_aoti_package_runs_without_detectron2(photo_images, tmp_path):
    """The suite's only AOTInductor compile (minutes on 2 cores): Libra Mask R-CNN, so that the
    box and the mask paths are compiled. The photo is a view of an HWC array, as detectron2's
    DefaultPredictor makes it: the package expects a contiguous image, the layout of the
    (contiguous) export example, and reads other layouts wrongly.

    The image without detections is not the NaN image here: the frozen package's convolutions
    with fused ReLU (oneDNN) turn NaN into 0, so it detects boxes where eager has none. It is
    the mean image (zero after normalisation): zero biases make every feature zero and every
    class score 1/7, below this model's score threshold; the photo's scores are 0.17-0.20."""
    assert not photo_images[0].is_contiguous()
    model = _family_model("libra_mask_rcnn_R_18_FPN", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.15"])
    program, _ = export_program(model, photo_images[0], 224)
    path = str(tmp_path / "model_aoti.pt2")
    compile_aoti(program, path)
    images = photo_images[:-1] + [model.pixel_mean.expand_as(photo_images[0]).clone()]
    _assert_same_as_eager(model, images, _run_fresh("aoti", path, images))
    # frozen: the convolutions run as oneDNN ops with packed weights and fused post-ops
    with zipfile.ZipFile(path) as package:
        (wrapper,) = [n for n in package.namelist() if n.endswith(".wrapper.cpp")]
        assert "mkldnn__convolution_pointwise" in package.read(wrapper).decode()


def test_fresh_process_cannot_import_detectron2(photo_images, tmp_path):
    # inputs that need detectron2 to be unpickled: the runner's import guard refuses them
    inputs = tmp_path / "inputs.pt"
    torch.save([Boxes(torch.zeros(1, 4))], inputs)
    args = [RUNNER, "export", "unused.pt2", str(inputs), str(tmp_path / "out.pt"), "1"]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    assert done.returncode != 0
    assert "ImportError: detectron2 cannot be imported here" in done.stderr
