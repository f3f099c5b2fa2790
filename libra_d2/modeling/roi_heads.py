"""ROI heads of Libra R-CNN.

* :class:`LibraROIHeads` is detectron2's ``StandardROIHeads`` whose box predictor also takes
  ``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE: "balanced_l1"``
  (:class:`~libra_d2.modeling.balanced_l1.BalancedL1FastRCNNOutputLayers`).
* :class:`IoUBalancedROIHeads` adds the sample-level balancing of the paper: the second-stage
  training ROIs are drawn with :func:`~libra_d2.modeling.sampling.iou_balanced_subsample`
  (IoU-balanced negatives, instance-balanced positives). The RPN keeps detectron2's random sampler,
  as in the official implementation.
"""

import math

import torch
from detectron2.config import configurable
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

from ..config import check_range
from .balanced_l1 import BalancedL1FastRCNNOutputLayers
from .sampling import iou_balanced_subsample


def proposal_labels(matched_idxs, matched_labels, gt_classes, num_classes):
    """
    Classification labels of N proposals from the matcher's output, as detectron2's
    ``StandardROIHeads._sample_proposals`` assigns them before sampling.

    Args:
        matched_idxs (Tensor): int64 [N], matched ground-truth index of each proposal.
        matched_labels (Tensor): int8 [N], the matcher's label (1 fg, 0 bg, -1 ignore).
        gt_classes (Tensor): int64 [M], classes of the M ground-truth boxes (M may be 0).
        num_classes (int): the background label.

    Returns:
        Tensor: int64 [N], a class in ``[0, num_classes)``, ``num_classes`` for background or
        -1 for ignored proposals.
    """
    if gt_classes.numel() == 0:
        return torch.full_like(matched_idxs, num_classes)
    labels = gt_classes[matched_idxs]
    labels[matched_labels == 0] = num_classes
    labels[matched_labels == -1] = -1
    return labels


@ROI_HEADS_REGISTRY.register()
class LibraROIHeads(StandardROIHeads):
    """
    ``StandardROIHeads`` with :class:`BalancedL1FastRCNNOutputLayers` as box predictor, so that
    ``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE`` may be "balanced_l1" as well as any detectron2 type.

    Everything else (pooler, box head, sampling, mask/keypoint heads) is detectron2's.
    """

    # What detectron2's scripting patch declares on StandardROIHeads, so that TorchScript compiles
    # only the heads that are on. TorchScript reads the annotations of the nearest class that has
    # some, and detectron2's scripting gives each class a "training" one: every subclass repeats
    # these two lines.
    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = BalancedL1FastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


class _MaxIoUMatcher(Matcher):
    """
    detectron2's :class:`Matcher` that also keeps, from its last call, the max IoU of every
    proposal with any ground-truth box (``last_max_ious``, float [N]; 0 when the image has no
    ground truth). :class:`IoUBalancedROIHeads` reads it in ``_sample_proposals``, which runs right
    after the matcher for the same image in ``StandardROIHeads.label_and_sample_proposals``.
    """

    def __call__(self, match_quality_matrix: torch.Tensor):
        if match_quality_matrix.shape[0] == 0:
            self.last_max_ious = match_quality_matrix.new_zeros(match_quality_matrix.shape[1])
        else:
            self.last_max_ious = match_quality_matrix.max(dim=0).values
        return super().__call__(match_quality_matrix)


@ROI_HEADS_REGISTRY.register()
class IoUBalancedROIHeads(LibraROIHeads):
    """
    ROI heads with Libra R-CNN's IoU-balanced sampling of the second-stage training samples.

    Only the sampling step of ``label_and_sample_proposals`` changes: negatives are drawn evenly
    from ``num_bins`` IoU bins and positives evenly across ground-truth objects. detectron2's
    ``roi_head/num_fg_samples`` and ``roi_head/num_bg_samples`` are still stored, and
    ``roi_head/neg_mean_iou`` (mean max-IoU of the sampled negatives) is added.
    """

    mask_on: torch.jit.Final[bool]  # see LibraROIHeads
    keypoint_on: torch.jit.Final[bool]

    @configurable
    def __init__(
        self,
        *,
        num_bins: int,
        floor_thr: float,
        floor_fraction: float,
        instance_balanced_pos: bool,
        **kwargs,
    ):
        """
        Args:
            num_bins, floor_thr, floor_fraction, instance_balanced_pos: see
                :func:`iou_balanced_subsample` (``MODEL.ROI_HEADS.IOU_BALANCED``).
            kwargs: arguments of :class:`StandardROIHeads`. ``proposal_matcher`` must be a
                :class:`Matcher`; it is re-created as a matcher that also records max IoUs.
        """
        super().__init__(**kwargs)
        m = self.proposal_matcher
        self.proposal_matcher = _MaxIoUMatcher(
            m.thresholds[1:-1], m.labels, allow_low_quality_matches=m.allow_low_quality_matches
        )
        self.num_bins = num_bins
        self.floor_thr = floor_thr
        self.floor_fraction = floor_fraction
        self.instance_balanced_pos = instance_balanced_pos

    @classmethod
    def from_config(cls, cfg, input_shape):
        ib = cfg.MODEL.ROI_HEADS.IOU_BALANCED
        key = "MODEL.ROI_HEADS.IOU_BALANCED."
        check_range(key + "NUM_BINS", ib.NUM_BINS, 1, math.inf, integer=True)
        check_range(key + "FLOOR_FRACTION", ib.FLOOR_FRACTION, 0.0, 1.0)
        if ib.FLOOR_THR != -1:
            try:
                check_range(key + "FLOOR_THR", ib.FLOOR_THR, 0.0, 1.0, high_open=True)
            except ValueError as e:
                raise ValueError(f"{e} (or be -1 to bin every negative)") from None
        return {
            **super().from_config(cfg, input_shape),
            "num_bins": int(ib.NUM_BINS),
            "floor_thr": float(ib.FLOOR_THR),
            "floor_fraction": float(ib.FLOOR_FRACTION),
            "instance_balanced_pos": bool(ib.INSTANCE_BALANCED_POS),
        }

    def _sample_proposals(
        self, matched_idxs: torch.Tensor, matched_labels: torch.Tensor, gt_classes: torch.Tensor
    ):
        """
        Same contract as ``StandardROIHeads._sample_proposals``; the max IoU of each of the N
        proposals comes from the matcher's call on the same image.

        Returns:
            Tensor: int64 [S], indices of sampled proposals (positives first).
            Tensor: int64 [S], their labels in [0, num_classes] (num_classes = background).
        """
        labels = proposal_labels(matched_idxs, matched_labels, gt_classes, self.num_classes)
        pos_idx, neg_idx = iou_balanced_subsample(
            labels,
            self.proposal_matcher.last_max_ious,
            matched_idxs,
            self.batch_size_per_image,
            self.positive_fraction,
            self.num_classes,
            num_bins=self.num_bins,
            floor_thr=self.floor_thr,
            floor_fraction=self.floor_fraction,
            instance_balanced_pos=self.instance_balanced_pos,
        )
        sampled_idxs = torch.cat([pos_idx, neg_idx])
        return sampled_idxs, labels[sampled_idxs]

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        proposals_with_gt = super().label_and_sample_proposals(proposals, targets)
        # A sampled proposal's gt_boxes is its best-matching ground truth, so its IoU with it is
        # the max IoU the sampler binned on (0 in images without ground truth).
        neg_ious = []
        for p in proposals_with_gt:
            bg = p.gt_classes == self.num_classes
            if p.has("gt_boxes"):
                neg_ious.append(matched_pairwise_iou(p.proposal_boxes[bg], p.gt_boxes[bg]))
            else:
                neg_ious.append(bg.new_zeros(int(bg.sum()), dtype=torch.float32))
        neg_ious = torch.cat(neg_ious)
        if neg_ious.numel() > 0:
            get_event_storage().put_scalar("roi_head/neg_mean_iou", neg_ious.mean().item())
        return proposals_with_gt
