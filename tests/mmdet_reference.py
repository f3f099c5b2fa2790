"""The mmdetection reference shared by the parity tests (inference and training).

mmdetection 3.3.0 runs on the CPU without mmcv's compiled ops: a stand-in ``mmcv._ext`` routes
``nms`` / ``roi_align_forward`` to torchvision. :func:`random_models` builds Libra Faster R-CNN and
Libra RetinaNet from mmdetection's own config files with random weights and saves each in
mmdetection's checkpoint format, which detectron2 loads through ``MODEL.WEIGHTS``.
"""

import importlib.machinery
import os
import sys
import types
from pathlib import Path

import matplotlib
import pytest
import torch
import torchvision

COCO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "COCO-Detection"
PHOTO = str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
HEIGHT, WIDTH = 600, 512  # the photo's size: both frameworks' test scale, so neither resizes
BOX_TOL, SCORE_TOL = 1e-3, 1e-5

MODELS = {
    "faster_rcnn": ("libra-faster-rcnn_r50_fpn_1x_coco.py", "libra_faster_rcnn_R_50_FPN_1x_mmdet"),
    "retinanet": ("libra-retinanet_r50_fpn_1x_coco.py", "libra_retinanet_R_50_FPN_1x_mmdet"),
}


class _StandInExt(types.ModuleType):
    """``mmcv._ext`` for mmcv-lite: the ops the Libra models use, computed by torchvision."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} has no stand-in")

        return unavailable

    @staticmethod
    def nms(boxes, scores, iou_threshold, offset):
        assert offset == 0, offset
        return torchvision.ops.nms(boxes, scores, iou_threshold)

    @staticmethod
    def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width,
                          spatial_scale, sampling_ratio, pool_mode, aligned):  # fmt: skip
        assert pool_mode == 1, "avg pooling only"
        output.copy_(
            torchvision.ops.roi_align(
                input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned
            )
        )

    @staticmethod
    def roi_align_backward(
        grad_output,
        rois,
        argmax_y,
        argmax_x,
        grad_input,
        *,
        aligned_height,
        aligned_width,
        spatial_scale,
        sampling_ratio,
        pool_mode,
        aligned,
    ):
        assert pool_mode == 1, "avg pooling only"
        x = grad_input.new_zeros(grad_input.shape, requires_grad=True)  # RoIAlign is linear in x
        with torch.enable_grad():
            out = torchvision.ops.roi_align(
                x, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned
            )
            grad_input.copy_(torch.autograd.grad(out, x, grad_output)[0])


@pytest.fixture(scope="session")
def mmdet():
    """The mmdetection package, importable on a CPU without mmcv's compiled ops (the stand-in
    ``mmcv._ext`` stays in ``sys.modules`` for the session)."""
    if "mmcv._ext" not in sys.modules:
        ext = _StandInExt("mmcv._ext")
        ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
        sys.modules["mmcv._ext"] = ext
    import mmdet
    import mmdet.apis
    from mmdet.utils import register_all_modules

    register_all_modules()
    return mmdet


def mmdet_config(mmdet, file_name):
    from mmengine.config import Config

    cfg = Config.fromfile(
        os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/libra_rcnn", file_name)
    )
    cfg.model.backbone.init_cfg = None  # no ImageNet download: random weights
    for pipeline in (cfg.test_pipeline, cfg.test_dataloader.dataset.pipeline):
        [resize] = [t for t in pipeline if t.type == "Resize"]
        resize.scale = (WIDTH, HEIGHT)
    return cfg


@torch.no_grad()
def _randomise(model, image):
    """
    Random weights a trained model could have: random BN affine parameters with the statistics
    they give on the photo itself, a non-zero non-local block, spread-out RPN objectness, and
    class scores confident enough (ten classes biased up) to pass the 0.05 score threshold.
    """
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.2)
        bn.reset_running_stats()
        bn.momentum = None  # running statistics := those of the photo
        bn.train()
    model.backbone(image)
    for bn in bns:
        bn.eval()
    refine = model.neck[1].refine
    for conv in (refine.g, refine.theta, refine.phi, refine.conv_out):
        conv.conv.weight.normal_(0.0, 0.02)
        conv.conv.bias.normal_(0.0, 0.02)
    if hasattr(model, "rpn_head"):
        model.rpn_head.rpn_cls.weight.normal_(0.0, 0.03)
        cls = model.roi_head.bbox_head.fc_cls
        cls.weight.normal_(0.0, 0.01)
        cls.bias[:10] += 3.0  # ten confident classes; background last, unbiased
    else:
        cls = model.bbox_head.retina_cls
        cls.weight.normal_(0.0, 0.05)
        cls.bias.view(9, 80)[:, :10] += 2.5


def max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.fixture(scope="session")
def random_models(mmdet, tmp_path_factory):
    """
    name -> (mmdetection config, randomised model, its preprocessed photo, the model saved in
    mmdetection's checkpoint format), for both Libra models.
    """
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.dataset import Compose

    folder = tmp_path_factory.mktemp("mmdet")
    models = {}
    for name, (mm_file, _) in MODELS.items():
        mm_cfg = mmdet_config(mmdet, mm_file)
        torch.manual_seed(0)
        mm_model = MMDET_MODELS.build(mm_cfg.model)
        mm_model.init_weights()
        mm_model.eval()
        pipeline = Compose(mm_cfg.test_dataloader.dataset.pipeline)
        data = pipeline({"img_path": PHOTO, "img_id": 0})
        batch = mm_model.data_preprocessor({k: [v] for k, v in data.items()}, False)
        _randomise(mm_model, batch["inputs"])
        checkpoint = folder / f"{name}.pth"
        meta = {
            "mmdet_version": mmdet.__version__,
            "dataset_meta": {"classes": [str(i) for i in range(80)]},
        }
        torch.save({"meta": meta, "state_dict": mm_model.state_dict()}, checkpoint)
        models[name] = (mm_cfg, mm_model, batch, str(checkpoint))
    return models
