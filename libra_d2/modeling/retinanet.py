"""Libra RetinaNet: detectron2's RetinaNet with the balanced L1 box regression loss.

With ``MODEL.BACKBONE.NAME: "build_retinanet_resnet_bfp_backbone"`` (FPN p3-p7 followed by the
Balanced Feature Pyramid, refine level 1 = p4) this is the Libra RetinaNet of the paper
(arXiv 1904.02701, Table 1: RetinaNet R-50-FPN 1x 35.8 -> 37.8 AP on test-dev). Libra R-CNN's third
component, IoU-balanced sampling, does not apply: RetinaNet has no sampling step.
"""

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import Boxes

from .balanced_l1 import balanced_l1_loss, balanced_l1_params

__all__ = ["LibraRetinaNet"]


@META_ARCH_REGISTRY.register()
class LibraRetinaNet(RetinaNet):
    """
    :class:`detectron2.modeling.RetinaNet` whose box regression loss is :func:`balanced_l1_loss`
    (``MODEL.RETINANET.BALANCED_L1``; official Libra RetinaNet: alpha 0.5, gamma 1.5, beta 0.11).

    The loss is summed over the box deltas of the foreground anchors and divided by the same
    normaliser as detectron2's losses (``self.loss_normalizer``, the EMA of the number of
    foreground anchors per batch). The focal classification loss, anchor labelling, inference and
    every other part are detectron2's.

    ``MODEL.RETINANET.BBOX_REG_LOSS_TYPE`` keeps a detectron2 loss type (e.g. "smooth_l1"):
    :meth:`losses` calls ``RetinaNet.losses`` (which also computes that loss) and replaces its
    ``loss_box_reg``; see :meth:`losses`.
    """

    @configurable
    def __init__(self, *, balanced_l1_params, **kwargs):
        """
        Args:
            balanced_l1_params (dict): ``alpha``, ``gamma``, ``beta`` of :func:`balanced_l1_loss`.
            kwargs: arguments of :class:`detectron2.modeling.RetinaNet`.
        """
        super().__init__(**kwargs)
        self.balanced_l1_params = dict(balanced_l1_params)

    @classmethod
    def from_config(cls, cfg):
        params = balanced_l1_params(cfg.MODEL.RETINANET.BALANCED_L1, "MODEL.RETINANET.BALANCED_L1")
        return {**super().from_config(cfg), "balanced_l1_params": params}

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        detectron2's ``RetinaNet.losses`` with ``loss_box_reg`` replaced by balanced L1.

        ``super().losses`` computes the focal loss, logs ``num_pos_anchors`` and updates the EMA
        normaliser; it also computes a ``loss_box_reg`` of ``BBOX_REG_LOSS_TYPE`` over the same
        foreground anchors, which is discarded. That small waste (one elementwise loss over the
        foreground deltas, plus its target deltas) is the price of not forking detectron2's method.

        Args:
            anchors (list[Boxes]): #levels Boxes, each ``(Hi * Wi * A, 4)``.
            pred_logits (list[Tensor]): #levels tensors ``(N, Hi * Wi * A, K)``.
            gt_labels (list[Tensor]): N int64 tensors ``(R,)``, R = sum of ``Hi * Wi * A``: class
                in ``[0, K)``, ``K`` for background, -1 ignored.
            pred_anchor_deltas (list[Tensor]): #levels tensors ``(N, Hi * Wi * A, 4)``.
            gt_boxes (list[Tensor]): N tensors ``(R, 4)``, the matched ground-truth box of every
                anchor (meaningful for foreground anchors only).

        Returns:
            dict[str, Tensor]: scalar ``loss_cls`` and ``loss_box_reg``.
        """
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)

        gt_labels = torch.stack(gt_labels)  # (N, R)
        pos_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        anchors = Boxes.cat(anchors).tensor  # (R, 4)
        pos_anchors = anchors.unsqueeze(0).expand(len(gt_labels), -1, -1)[pos_mask]  # (P, 4)
        gt_deltas = self.box2box_transform.get_deltas(pos_anchors, torch.stack(gt_boxes)[pos_mask])
        pred_deltas = cat(pred_anchor_deltas, dim=1)[pos_mask]  # (P, 4)
        loss_box_reg = balanced_l1_loss(
            pred_deltas, gt_deltas, reduction="sum", **self.balanced_l1_params
        )
        # The normaliser super() just updated: EMA of max(#foreground anchors, 1).
        losses["loss_box_reg"] = loss_box_reg / self.loss_normalizer
        return losses

    def _decode_per_level_predictions(
        self, anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
    ):
        """
        detectron2's decoding of one level's top-scoring boxes, with the boxes clipped to the image
        ``image_size`` ``(H, W)`` before NMS, as the official Libra RetinaNet (mmdetection) does;
        detectron2 clips them only after NMS.
        """
        pred = super()._decode_per_level_predictions(
            anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
        )
        pred.pred_boxes.clip(image_size)
        return pred
