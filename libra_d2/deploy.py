"""Export detectors with ``torch.export`` (dynamic height and width), AOTInductor and ONNX (dynamo).

:class:`ExportableRCNN` (``GeneralizedRCNN`` with an RPN: Faster / Mask / Cascade (Mask) R-CNN)
and :class:`ExportableRetinaNet` run a model's inference (eval mode, without the final resize) on
one image with the model's own modules, and replace the steps of detectron2's inference whose
control flow depends on tensor values, which ``torch.export`` cannot trace:

* ``ImageList.from_tensors`` computes the padded size from tensors: the padding is computed from
  ``image.shape`` (:func:`pad_image`);
* ``find_top_rpn_proposals`` and ``fast_rcnn_inference`` drop non-finite and empty boxes only
  when there are some (``if not valid_mask.all()``), and ``batched_nms`` picks its algorithm from
  the number of boxes: the replacements (:func:`find_top_rpn_proposals`,
  :func:`fast_rcnn_inference_single_image`) mask them out and always run the per-group NMS of
  torchvision's ``batched_nms`` (one ``nms`` per level / class, the kept boxes sorted by score);
* ``ROIPooler`` counts boxes per image with a tensor, ``Boxes`` checks its shape, ``Boxes.clip``
  asserts that every box is finite, RetinaNet takes ``min`` of a data-dependent count: the
  wrappers pool, clip and select with symbolic counts.

The BFP's own resizing (:func:`libra_d2.modeling.bfp.max_pool_to`,
:func:`~libra_d2.modeling.bfp.add_nearest_upsampled`) takes symbolic sizes: block reductions and
block-wise adds where the sizes divide, a gather (P4 -> P6) and ``F.interpolate`` (P6 -> P4)
where they do not (the same functions serve eager inference). The replacements of detectron2's
functions above only run inside the wrappers: training and eager inference are detectron2's code.

Exported model: input ``image``, a contiguous float32 ``(3, H, W)`` tensor in ``cfg.INPUT.FORMAT``
order (resized like the test-time transform); AOTInductor packages read their input with the
strides of the export example, which is contiguous, so an image that is a view (e.g.
``torch.from_numpy(hwc).permute(2, 0, 1)``) must be made ``.contiguous()`` first. Outputs
(:func:`output_names`) ``pred_boxes`` ``(R, 4)`` float32 XYXY in input coordinates,
``pred_classes`` ``(R,)`` int64, ``scores`` ``(R,)`` float32, mask models ``pred_masks``
``(R, 1, M, M)`` float32 mask probabilities, ``image_size`` ``(2,)`` int64; ``R`` depends on the
image. The reference is :func:`eager_detections`.
"""

import math
import os
import time

import torch
import torch.nn.functional as F
from detectron2.modeling import GeneralizedRCNN, RetinaNet
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.structures import Boxes
from torch import nn
from torchvision.ops import nms

from .files import atomic_open

__all__ = [
    "ExportableRCNN",
    "ExportableRetinaNet",
    "exportable",
    "eager_detections",
    "output_names",
    "ONNX_OPSET_DYNAMO",
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


def output_names(model):
    """The names of the exported program's outputs, in order."""
    masks = isinstance(model, GeneralizedRCNN) and model.roi_heads.mask_on
    return ("pred_boxes", "pred_classes", "scores") + ("pred_masks",) * masks + ("image_size",)


def unsupported_reason(model):
    """Why ``model`` has no ``torch.export`` path here (one line); None if it has one."""
    fix = "use --format torchscript"
    if isinstance(model, RetinaNet):
        return None
    if not isinstance(model, GeneralizedRCNN):
        return f"{type(model).__name__} is neither a GeneralizedRCNN nor a RetinaNet; {fix}"
    if model.proposal_generator is None:
        return "a Fast R-CNN (PrecomputedProposals) needs proposals as input, not only an image"
    if not isinstance(model.proposal_generator, RPN):
        return f"{type(model.proposal_generator).__name__} is not an RPN; {fix}"
    heads = model.roi_heads
    if not isinstance(heads, StandardROIHeads):
        return f"{type(heads).__name__} is not a StandardROIHeads; {fix}"
    if heads.keypoint_on:
        return f"keypoint heads have no torch.export path; {fix}"
    return None


def pad_image(image, size_divisibility):
    """``(3, H, W)`` -> ``(1, 3, H', W')``: zero-padded at the bottom and right to multiples of
    ``size_divisibility`` (``ImageList.from_tensors`` of one image, sizes from the shape)."""
    h, w = image.shape[-2:]
    d = max(size_divisibility, 1)
    # d * ceil(h / d) (not h + (-h) % d): a form in which the sizes of the strided convolutions
    # simplify (d * k - 1) // 2 + 1 = (d / 2) * k
    return F.pad(image, (0, d * ((w + d - 1) // d) - w, 0, d * ((h + d - 1) // d) - h))[None]


def _features(model, image):
    """``model.backbone(model.preprocess_image([{"image": image}]).tensor)`` with the padding
    computed from the shape (:func:`pad_image`)."""
    x = (image.to(model.pixel_mean) - model.pixel_mean) / model.pixel_std
    return model.backbone(pad_image(x, model.backbone.size_divisibility))


def _image_size(h, w):
    """``(2,)`` int64 tensor ``[h, w]`` of symbolic sizes."""
    return torch.stack([torch.scalar_tensor(s, dtype=torch.int64) for s in (h, w)])


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


def _nms(boxes, scores, iou_threshold):
    """
    ``torchvision.ops.nms(boxes, scores, iou_threshold)`` of boxes with finite scores, run with
    two more boxes that it always keeps: torchvision's fake ``nms`` declares at least 2 kept
    boxes, which ``torch.export`` turns into an assertion that fails on fewer. The extra boxes
    have zero area (IoU 0 or NaN with any box: they suppress nothing and nothing suppresses
    them) and score -inf; their indices are dropped from the result.
    """
    extra = boxes.new_zeros(2, 4)
    n = boxes.shape[0]
    keep = nms(
        torch.cat([boxes, extra]),
        torch.cat([scores, scores.new_full((2,), -math.inf)]),
        iou_threshold,
    )
    return keep[keep < n]


def _nms_per_group(boxes, scores, groups, num_groups, iou_threshold, valid):
    """
    torchvision's ``batched_nms`` (its per-group path) over the ``valid`` boxes: ``nms`` within
    each group ``0 .. num_groups - 1``, kept indices (into ``boxes``) sorted by decreasing score.
    """
    keep_mask = torch.zeros_like(valid)
    for g in range(num_groups):
        (index,) = torch.where(valid & (groups == g))
        keep_mask[index[_nms(boxes[index], scores[index], iou_threshold)]] = True
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


def _probs(predictor, scores):
    """``FastRCNNOutputLayers.predict_probs`` of one image's class logits ``(R, K + 1)``."""
    return scores.sigmoid() if predictor.use_sigmoid_ce else F.softmax(scores, dim=-1)


class ExportableRCNN(nn.Module):
    """
    ``image (3, H, W) -> (pred_boxes, pred_classes, scores, [pred_masks,] image_size)``: the
    inference of a ``GeneralizedRCNN`` with an RPN and standard or cascade ROI heads, in eval
    mode, as ``model.inference([{"image": image}], do_postprocess=False)`` (module docstring).
    ``pred_masks`` (mask models): ``(R, 1, M, M)`` float32 mask probabilities of each
    detection's class, not pasted into the image.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        model, heads = self.model, self.model.roi_heads
        h, w = image.shape[-2:]
        features = _features(model, image)
        proposals = self._proposals(features, (h, w))
        box_features = [features[f] for f in heads.box_in_features]
        if isinstance(heads, CascadeROIHeads):
            boxes, probs, predictor = self._cascade(box_features, proposals, (h, w))
        else:  # StandardROIHeads._forward_box, FastRCNNOutputLayers.inference
            predictor = heads.box_predictor
            scores, deltas = predictor(
                heads.box_head(_pool(heads.box_pooler, box_features, proposals))
            )
            boxes = predictor.box2box_transform.apply_deltas(deltas, proposals)
            probs = _probs(predictor, scores)
        boxes, scores, classes = fast_rcnn_inference_single_image(
            boxes,
            probs,
            (h, w),
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        outputs = (boxes, classes, scores)
        if heads.mask_on:  # StandardROIHeads._forward_mask, mask_rcnn_inference
            mask_features = [features[f] for f in heads.mask_in_features]
            logits = heads.mask_head.layers(_pool(heads.mask_pooler, mask_features, boxes))
            if logits.shape[1] > 1:
                logits = logits[torch.arange(logits.shape[0]), classes][:, None]
            outputs += (logits.sigmoid(),)
        return outputs + (_image_size(h, w),)

    def _proposals(self, features, image_size):
        """``RPN.forward`` at inference, ``find_top_rpn_proposals`` replaced: ``(P, 4)``."""
        rpn = self.model.proposal_generator
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
            [image_size],
            rpn.nms_thresh,
            rpn.pre_nms_topk[False],
            rpn.post_nms_topk[False],
            rpn.min_box_size,
        )
        return proposals

    def _cascade(self, features, proposals, image_size):
        """``CascadeROIHeads._forward_box`` at inference up to ``fast_rcnn_inference``: the last
        stage's boxes, the class probabilities averaged over the stages, the last predictor."""
        heads = self.model.roi_heads
        boxes, probs = proposals, []
        for stage in range(heads.num_cascade_stages):
            if stage > 0:  # _create_proposals_from_boxes
                boxes = _clip(boxes, image_size)
            predictor = heads.box_predictor[stage]
            box_features = heads.box_head[stage](_pool(heads.box_pooler, features, boxes))
            scores, deltas = predictor(box_features)
            boxes = predictor.box2box_transform.apply_deltas(deltas, boxes)
            probs.append(_probs(predictor, scores))
        return boxes, sum(probs) * (1.0 / heads.num_cascade_stages), predictor


class ExportableRetinaNet(nn.Module):
    """
    ``image (3, H, W) -> (pred_boxes, pred_classes, scores, image_size)``: the inference of a
    ``RetinaNet`` in eval mode, as ``model([{"image": image}])`` (``forward_inference``, then
    ``detector_postprocess`` at the input size: boxes clipped, empty ones dropped), with the
    per-level candidate selection written with symbolic counts and per-class NMS.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        model = self.model
        h, w = image.shape[-2:]
        features = _features(model, image)
        features = [features[f] for f in model.head_in_features]
        anchors = model.anchor_generator(features)
        logits, deltas = model._transpose_dense_predictions(
            model.head(features), [model.num_classes, 4]
        )
        boxes, scores, classes = [], [], []
        # DenseDetector._decode_per_level_predictions of each level
        for anchors_i, logits_i, deltas_i in zip(anchors, logits, deltas):
            scores_i = logits_i[0].sigmoid()
            keep = scores_i > model.test_score_thresh
            candidates = keep.nonzero()
            k = torch.sym_min(candidates.shape[0], model.test_topk_candidates)
            scores_i, index = scores_i[keep].topk(k)
            anchor_index, class_index = candidates[index].unbind(dim=1)
            boxes.append(
                model.box2box_transform.apply_deltas(
                    deltas_i[0][anchor_index], anchors_i.tensor[anchor_index]
                )
            )
            scores.append(scores_i)
            classes.append(class_index)
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        everything = torch.ones_like(classes, dtype=torch.bool)
        keep = _nms_per_group(
            boxes, scores, classes, model.num_classes, model.test_nms_thresh, everything
        )
        keep = keep[: model.max_detections_per_image]
        boxes, scores, classes = _clip(boxes[keep], (h, w)), scores[keep], classes[keep]
        (keep,) = torch.where(_boxes(boxes).nonempty())  # detector_postprocess
        return boxes[keep], classes[keep], scores[keep], _image_size(h, w)


def exportable(model):
    """:class:`ExportableRCNN` or :class:`ExportableRetinaNet` of ``model`` (eval mode); ValueError
    with :func:`unsupported_reason` for other models."""
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(reason)
    if model.training:
        raise ValueError("the model must be in eval mode (call model.eval())")
    return (ExportableRetinaNet if isinstance(model, RetinaNet) else ExportableRCNN)(model)


def eager_detections(model, image):
    """The eager ``Instances`` an exported program reproduces (see :func:`exportable`)."""
    with torch.no_grad():
        if isinstance(model, RetinaNet):
            return model([{"image": image}])[0]["instances"]
        return model.inference([{"image": image}], do_postprocess=False)[0]


def export_program(model, image, max_size, path=None):
    """
    ``torch.export`` of :func:`exportable` of ``model`` (example input ``image``, made contiguous)
    with dynamic height and width, each from the coarsest feature stride + 1 (the coarsest level
    has at least 2 positions: 65 for P2-P6, 129 for P3-P7) to ``max_size``
    (``INPUT.MAX_SIZE_TEST``), saved with ``torch.export.save`` (atomically) if ``path``.

    Returns:
        (ExportedProgram, float): the program and the export time in seconds.
    """
    module = exportable(model)
    image = image.contiguous()  # the input layout an AOTInductor package of the program expects
    low = max(s.stride for s in model.backbone.output_shape().values()) + 1
    h = torch.export.Dim("height", min=low, max=max_size)
    w = torch.export.Dim("width", min=low, max=max_size)
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


INDUCTOR_CONFIGS = {"cpp.simdlen": 1, "layout_optimization": False, "freezing": True}
"""AOTInductor settings of :func:`compile_aoti`.

* ``freezing True``: the weights are constants of the package, so that Inductor folds the frozen
  batch norms into the convolutions, packs the convolution and linear weights for oneDNN once and
  fuses ReLUs and residual additions into the convolutions. oneDNN's fused ReLU turns NaN into 0:
  an image with NaNs gives detections where eager inference gives none.

* ``cpp.simdlen 1``: no explicit vectorisation of the generated CPU kernels. Inductor's tiling
  analysis simplifies every index expression with sympy, which on this model's symbolic sizes had
  not finished after 15 minutes (R-18 shapes model; 192 s without it). Convolutions and matrix
  products are library calls either way.
* ``layout_optimization False``: tensors keep their layouts. With channels-last layouts chosen for
  the convolutions, the mask head's first convolution (after ``roi_align``) returns strides other
  than those the compiled code reads it with: mask logits off by 1e-2, and an error under
  ``AOTI_RUNTIME_CHECK_INPUTS=1``.
"""


def compile_aoti(program, path):
    """AOTInductor package of ``program`` at ``path`` (a ``.pt2`` file); returns the seconds it
    took. Load it with ``torch._inductor.aoti_load_package(path)``. Give it a program that no
    other conversion has used: one converted to ONNX before fails to compile."""
    start = time.perf_counter()
    tmp = f"{path}.tmp{os.getpid()}.pt2"
    with torch.no_grad():  # Inductor freezes only without autograd
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=tmp,
            inductor_configs=dict(INDUCTOR_CONFIGS),  # it adds keys
        )
    os.replace(tmp, path)
    return time.perf_counter() - start


def export_onnx_dynamo(program, path, output_names, opset_version=ONNX_OPSET_DYNAMO):
    """ONNX file of ``program`` through the dynamo exporter (onnxscript); returns the seconds it
    took. Input ``image`` with dynamic height and width, outputs named ``output_names``."""
    start = time.perf_counter()
    onnx_program = torch.onnx.export(
        program,
        input_names=["image"],
        output_names=list(output_names),
        dynamo=True,
        opset_version=opset_version,
        verbose=False,
    )
    tmp = f"{path}.tmp{os.getpid()}"
    onnx_program.save(tmp)
    os.replace(tmp, path)
    return time.perf_counter() - start
