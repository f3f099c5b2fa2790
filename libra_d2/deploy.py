"""Export an R-CNN with ``torch.export`` (dynamic height and width), AOTInductor and ONNX (dynamo).

:class:`ExportableRCNN` runs a ``GeneralizedRCNN``'s inference (eval mode, without the final
resize, as ``model.inference(..., do_postprocess=False)``) on one image with the model's own
modules, and replaces the three steps of detectron2's inference whose control flow depends on
tensor values, which ``torch.export`` cannot trace:

* ``ImageList.from_tensors`` computes the padded size from tensors: the padding is computed from
  ``image.shape`` (:func:`pad_image`);
* ``find_top_rpn_proposals`` and ``fast_rcnn_inference`` drop non-finite and empty boxes only
  when there are some (``if not valid_mask.all()``), and ``batched_nms`` picks its algorithm from
  the number of boxes: the replacements (:func:`find_top_rpn_proposals`,
  :func:`fast_rcnn_inference_single_image`) mask them out and always run the per-group NMS of
  torchvision's ``batched_nms`` (one ``nms`` per level / class, the kept boxes sorted by score).

The BFP's adaptive max pooling takes symbolic sizes under ``torch.export``
(:func:`libra_d2.modeling.bfp.adaptive_max_pool2d_by_gather`). Training and eager inference are
detectron2's code; these replacements only run inside :class:`ExportableRCNN`.

Exported model: input ``image``, float32 ``(3, H, W)`` in ``cfg.INPUT.FORMAT`` order (resized
like the test-time transform); outputs ``pred_boxes`` ``(R, 4)`` float32 XYXY in input
coordinates, ``pred_classes`` ``(R,)`` int64, ``scores`` ``(R,)`` float32, ``image_size`` ``(2,)``
int64, ``R`` depending on the image.
"""

import os
import time

import torch
import torch.nn.functional as F
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import Boxes
from torch import nn
from torchvision.ops import nms

from .files import atomic_open

__all__ = [
    "ExportableRCNN",
    "ONNX_OPSET_DYNAMO",
    "OUTPUT_NAMES",
    "pad_image",
    "find_top_rpn_proposals",
    "fast_rcnn_inference_single_image",
    "export_program",
    "compile_aoti",
    "export_onnx_dynamo",
    "unsupported_reason",
]

ONNX_OPSET_DYNAMO = 18
"""Default (and oldest) ONNX opset of :func:`export_onnx_dynamo`."""
OUTPUT_NAMES = ("pred_boxes", "pred_classes", "scores", "image_size")


def unsupported_reason(model):
    """Why ``model`` cannot be exported by :class:`ExportableRCNN` (one line); None if it can."""
    fix = "has no torch.export path yet; use --format torchscript"
    if not isinstance(model, GeneralizedRCNN):
        return f"{type(model).__name__} (one-stage detector) {fix}"
    if not isinstance(model.proposal_generator, RPN):
        return f"a model without an RPN ({type(model.proposal_generator).__name__}) {fix}"
    heads = model.roi_heads
    if isinstance(heads, CascadeROIHeads) or not isinstance(heads, StandardROIHeads):
        return f"{type(heads).__name__} (cascade or non-standard ROI heads) {fix}"
    if heads.mask_on or heads.keypoint_on:
        return f"a mask or keypoint head (paste_masks_in_image) {fix}"
    return None


def pad_image(image, size_divisibility):
    """``(3, H, W)`` -> ``(1, 3, H', W')``: zero-padded at the bottom and right to multiples of
    ``size_divisibility`` (``ImageList.from_tensors`` of one image, sizes from the shape)."""
    h, w = image.shape[-2:]
    d = max(size_divisibility, 1)
    return F.pad(image, (0, (-w) % d, 0, (-h) % d))[None]


def _clip(boxes, image_size):
    """``Boxes.clip`` of ``(R, 4)`` XYXY ``boxes`` (without its all-finite assertion)."""
    h, w = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(min=0, max=w), y1.clamp(min=0, max=h), x2.clamp(min=0, max=w), y2.clamp(0, h)),
        dim=-1,
    )


def _boxes(tensor):
    """``Boxes(tensor)`` of an ``(R, 4)`` tensor without ``Boxes.__init__``'s check for
    ``R == 0``, which ``torch.export`` cannot decide when ``R`` depends on the data."""
    boxes = Boxes.__new__(Boxes)
    boxes.tensor = tensor
    return boxes


def _pool(pooler, features, boxes):
    """``ROIPooler.forward(features, [Boxes(boxes)])`` of one image's ``(R, 4)`` boxes, without
    ``convert_boxes_to_pooler_format``'s tensor of box counts."""
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
    if len(pooler.level_poolers) == 1:
        return pooler.level_poolers[0](features[0], rois)
    levels = assign_boxes_to_levels(
        [_boxes(boxes)],
        pooler.min_level,
        pooler.max_level,
        pooler.canonical_box_size,
        pooler.canonical_level,
    )
    output = rois.new_zeros(rois.shape[0], features[0].shape[1], *pooler.output_size)
    for level, (x, level_pooler) in enumerate(zip(features, pooler.level_poolers)):
        (index,) = torch.where(levels == level)
        output.index_put_((index,), level_pooler(x, rois[index]))
    return output


def _nms_per_group(boxes, scores, groups, num_groups, iou_threshold, valid):
    """
    torchvision's ``batched_nms`` (its per-group path) over the ``valid`` boxes: ``nms`` within
    each group ``0 .. num_groups - 1``, kept indices (into ``boxes``) sorted by decreasing score.
    """
    keep_mask = torch.zeros_like(valid)
    for g in range(num_groups):
        (index,) = torch.where(valid & (groups == g))
        keep_mask[index[nms(boxes[index], scores[index], iou_threshold)]] = True
    (keep,) = torch.where(keep_mask)
    return keep[scores[keep].sort(descending=True)[1]]


def find_top_rpn_proposals(
    proposals,
    pred_objectness_logits,
    image_sizes,
    nms_thresh,
    pre_nms_topk,
    post_nms_topk,
    min_box_size,
):
    """
    detectron2's ``find_top_rpn_proposals`` at inference (same arguments) without value-dependent
    control flow: non-finite and (after clipping) empty proposals are masked out of the per-level
    NMS instead of being removed first.

    Returns:
        list[(Tensor, Tensor)]: per image, the ``proposal_boxes`` ``(R, 4)`` and
        ``objectness_logits`` ``(R,)`` of detectron2's result.
    """
    topk_scores, topk_proposals, level_ids = [], [], []
    for level_id, (proposals_i, logits_i) in enumerate(zip(proposals, pred_objectness_logits)):
        k = torch.sym_min(logits_i.shape[1], pre_nms_topk)
        scores_i, index = logits_i.topk(k, dim=1)
        topk_scores.append(scores_i)
        topk_proposals.append(torch.gather(proposals_i, 1, index[..., None].expand(-1, -1, 4)))
        level_ids.append(torch.full_like(index[0], level_id))
    topk_scores, topk_proposals = torch.cat(topk_scores, 1), torch.cat(topk_proposals, 1)
    level_ids = torch.cat(level_ids)
    results = []
    for boxes, scores, image_size in zip(topk_proposals, topk_scores, image_sizes):
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes = _clip(torch.where(valid[:, None], boxes, 0.0), image_size)
        valid = valid & _boxes(boxes).nonempty(threshold=min_box_size)
        keep = _nms_per_group(boxes, scores, level_ids, len(proposals), nms_thresh, valid)
        keep = keep[:post_nms_topk]
        results.append((boxes[keep], scores[keep]))
    return results


def fast_rcnn_inference_single_image(
    boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image
):
    """
    detectron2's ``fast_rcnn_inference_single_image`` (same arguments) without value-dependent
    control flow: rows with non-finite boxes or scores are masked out of the score filter instead
    of being removed first, and NMS runs per class.

    Returns:
        (Tensor, Tensor, Tensor): ``pred_boxes`` ``(R, 4)``, ``scores`` ``(R,)`` and
        ``pred_classes`` ``(R,)`` of detectron2's result.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    scores = scores[:, :-1]
    num_bbox_reg_classes = boxes.shape[1] // 4
    boxes = _clip(torch.where(valid[:, None], boxes, 0.0).reshape(-1, 4), image_shape)
    boxes = boxes.view(-1, num_bbox_reg_classes, 4)
    filter_mask = (scores > score_thresh) & valid[:, None]
    filter_inds = filter_mask.nonzero()
    if num_bbox_reg_classes == 1:
        boxes = boxes[filter_inds[:, 0], 0]
    else:
        boxes = boxes[filter_mask]
    scores = scores[filter_mask]
    classes = filter_inds[:, 1]
    everything = torch.ones_like(classes, dtype=torch.bool)
    keep = _nms_per_group(boxes, scores, classes, filter_mask.shape[1], nms_thresh, everything)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    return boxes[keep], scores[keep], classes[keep]


class ExportableRCNN(nn.Module):
    """
    ``image (3, H, W) -> (pred_boxes, pred_classes, scores, image_size)``: the inference of a
    Faster R-CNN ``GeneralizedRCNN`` in eval mode (module docstring), for ``torch.export``.
    """

    def __init__(self, model):
        super().__init__()
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        if model.training:
            raise ValueError("the model must be in eval mode (call model.eval())")
        self.model = model

    def forward(self, image):
        model, rpn, heads = self.model, self.model.proposal_generator, self.model.roi_heads
        h, w = image.shape[-2:]
        x = (image.to(model.pixel_mean) - model.pixel_mean) / model.pixel_std
        features = model.backbone(pad_image(x, model.backbone.size_divisibility))

        # RPN.forward + predict_proposals, with find_top_rpn_proposals replaced
        rpn_features = [features[f] for f in rpn.in_features]
        anchors = rpn.anchor_generator(rpn_features)
        logits, deltas = rpn.rpn_head(rpn_features)
        logits = [s.permute(0, 2, 3, 1).flatten(1) for s in logits]
        box_dim = rpn.anchor_generator.box_dim
        deltas = [
            d.view(d.shape[0], -1, box_dim, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2)
            for d in deltas
        ]
        ((proposals, _),) = find_top_rpn_proposals(
            rpn._decode_proposals(anchors, [d.flatten(1, -2) for d in deltas]),
            logits,
            [(h, w)],
            rpn.nms_thresh,
            rpn.pre_nms_topk[False],
            rpn.post_nms_topk[False],
            rpn.min_box_size,
        )

        # StandardROIHeads._forward_box (ROIPooler.forward replaced) and
        # FastRCNNOutputLayers.inference
        # (predict_boxes, predict_probs; fast_rcnn_inference replaced)
        box_features = _pool(
            heads.box_pooler, [features[f] for f in heads.box_in_features], proposals
        )
        predictor = heads.box_predictor
        scores, deltas = predictor(heads.box_head(box_features))
        probs = scores.sigmoid() if predictor.use_sigmoid_ce else F.softmax(scores, dim=-1)
        boxes, scores, classes = fast_rcnn_inference_single_image(
            predictor.box2box_transform.apply_deltas(deltas, proposals),
            probs,
            (h, w),
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        image_size = torch.stack([torch.scalar_tensor(s, dtype=torch.int64) for s in (h, w)])
        return boxes, classes, scores, image_size


def export_program(model, image, max_size, path=None):
    """
    ``torch.export`` of :class:`ExportableRCNN` of ``model`` with dynamic height and width (each
    from 32 to ``max_size``), saved with ``torch.export.save`` (atomically) if ``path``.

    Returns:
        (ExportedProgram, float): the program and the export time in seconds.
    """
    module = ExportableRCNN(model)
    h = torch.export.Dim("height", min=65, max=max_size)
    w = torch.export.Dim("width", min=65, max=max_size)
    start = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(
            module,
            (image,),
            dynamic_shapes=({1: h, 2: w},),
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )
    seconds = time.perf_counter() - start
    if path:
        with atomic_open(path, "wb") as f:
            torch.export.save(program, f)
    return program, seconds


def compile_aoti(program, path):
    """AOTInductor package of ``program`` at ``path`` (a ``.pt2`` file); returns the seconds it
    took. Load it with ``torch._inductor.aoti_load_package(path)``."""
    start = time.perf_counter()
    tmp = f"{path}.tmp{os.getpid()}.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=tmp)
    os.replace(tmp, path)
    return time.perf_counter() - start


def export_onnx_dynamo(program, path, opset_version=ONNX_OPSET_DYNAMO):
    """ONNX file of ``program`` through the dynamo exporter (onnxscript); returns the seconds it
    took. Input ``image`` with dynamic height and width, outputs :data:`OUTPUT_NAMES`."""
    start = time.perf_counter()
    onnx_program = torch.onnx.export(
        program,
        input_names=["image"],
        output_names=list(OUTPUT_NAMES),
        dynamo=True,
        opset_version=opset_version,
        verbose=False,
    )
    tmp = f"{path}.tmp{os.getpid()}"
    onnx_program.save(tmp)
    os.replace(tmp, path)
    return time.perf_counter() - start
