"""The RPN of the official Libra R-CNN recipe.

The official Libra Faster R-CNN configs (2019 release and mmdetection 2/3) train the first stage
with two settings of mmdetection's RPN that detectron2's :class:`RPN` does not have: at most
``neg_pos_ub`` sampled negatives per sampled positive anchor (``train_cfg.rpn.sampler.neg_pos_ub =
5``), and losses averaged over the anchors actually sampled (``SamplingResult.avg_factor``) rather
than over ``BATCH_SIZE_PER_IMAGE`` anchors per image. They are part of the official training
recipe, not one of the paper's three components.
"""

import math
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import nonzero_tuple
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.structures import Boxes

from ..config import check_range

__all__ = ["LibraRPN"]

_NORMALIZERS = ("batch_size", "num_sampled")


@PROPOSAL_GENERATOR_REGISTRY.register()
class LibraRPN(RPN):
    """
    detectron2's :class:`RPN` with mmdetection's negative cap and loss normaliser
    (``MODEL.RPN.NEG_POS_UB``, ``MODEL.RPN.LOSS_NORMALIZER``). With ``neg_pos_ub == -1`` and
    ``loss_normalizer == "batch_size"`` it is detectron2's RPN.
    """

    @configurable
    def __init__(self, *, neg_pos_ub: float, loss_normalizer: str, **kwargs):
        """
        Args:
            neg_pos_ub (float): -1 for no cap; otherwise (>= 0) each image keeps at most
                ``int(neg_pos_ub * max(1, #sampled positives))`` of its sampled negatives, a
                uniformly random subset of those detectron2's sampler drew (mmdetection's
                ``BaseSampler.sample``).
            loss_normalizer (str): "batch_size": both losses are divided by
                ``batch_size_per_image * #images`` (detectron2); "num_sampled": by the number of
                sampled anchors, summed over images with each image's positive and negative
                counts taken as at least 1 (mmdetection's ``avg_factor``).
            kwargs: arguments of :class:`RPN`.
        """
        super().__init__(**kwargs)
        if neg_pos_ub != -1:
            check_range("MODEL.RPN.NEG_POS_UB", neg_pos_ub, 0, math.inf)
        if loss_normalizer not in _NORMALIZERS:
            raise ValueError(
                f"MODEL.RPN.LOSS_NORMALIZER = {loss_normalizer!r}: must be one of {_NORMALIZERS}"
            )
        self.neg_pos_ub = neg_pos_ub
        self.loss_normalizer = loss_normalizer

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {
            **super().from_config(cfg, input_shape),
            "neg_pos_ub": float(cfg.MODEL.RPN.NEG_POS_UB),
            "loss_normalizer": cfg.MODEL.RPN.LOSS_NORMALIZER,
        }

    def _subsample_labels(self, label):
        """
        detectron2's random sampling of one image's anchor labels (int [R], -1 / 0 / 1, modified
        in place and returned), then the negative cap.
        """
        label = super()._subsample_labels(label)
        if self.neg_pos_ub >= 0:
            neg = nonzero_tuple(label == 0)[0]
            cap = int(self.neg_pos_ub * max(1, int((label == 1).sum())))
            if neg.numel() > cap:
                label[neg[torch.randperm(neg.numel(), device=neg.device)[cap:]]] = -1
        return label

    @torch.jit.unused
    def losses(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        gt_labels: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        detectron2's ``RPN.losses`` (same arguments; ``gt_labels`` are N int tensors ``(R,)`` of
        -1 / 0 / 1), divided by the sampled-anchor count when ``loss_normalizer`` is
        "num_sampled".
        """
        losses = super().losses(
            anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
        )
        if self.loss_normalizer == "num_sampled":
            labels = torch.stack(gt_labels)
            counts = torch.stack([(labels == 1).sum(1), (labels == 0).sum(1)]).clamp(min=1)
            scale = self.batch_size_per_image * len(gt_labels) / counts.sum().item()
            losses = {k: v * scale for k, v in losses.items()}
        return losses
