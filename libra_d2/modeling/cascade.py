"""Cascade ROI heads of Libra R-CNN (Libra Cascade R-CNN / Cascade Mask R-CNN).

* :class:`LibraCascadeROIHeads` is detectron2's ``CascadeROIHeads`` whose box predictor of every
  stage is a :class:`~libra_d2.modeling.balanced_l1.BalancedL1FastRCNNOutputLayers` with that
  stage's box coder (``MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS``), so that
  ``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE: "balanced_l1"`` gives every stage the balanced L1 loss.
* :class:`IoUBalancedCascadeROIHeads` adds IoU-balanced sampling (``MODEL.ROI_HEADS.IOU_BALANCED``)
  where detectron2's cascade draws its training ROIs: once, from the RPN proposals, before the
  first stage. It reuses :class:`~libra_d2.modeling.roi_heads.IoUBalancedROIHeads`'s sampling step.

Where the sampling happens. detectron2's cascade samples once: ``BATCH_SIZE_PER_IMAGE`` ROIs
(at most ``POSITIVE_FRACTION`` positives) are drawn from the RPN proposals and the ground truth
at the first stage's IoU threshold; stage ``k > 0`` trains on the regressed boxes of exactly those
ROIs, relabelled at its own threshold (``MODEL.ROI_BOX_CASCADE_HEAD.IOUS``), without subsampling.
mmdetection's cascade runs an assigner and a sampler at every stage, but from stage 1 on the
candidates are the previous stage's regressed ROIs (at most 512 per image) plus the ground truth,
of which its sampler (512, 25% positives) keeps nearly all. libra_d2 keeps detectron2's structure
and balances the one draw it makes: the Libra cascade then differs from detectron2's cascade
baseline in the sampler only (the same ROIs reach every stage, in the same numbers), the later
stages see the IoU-balanced negatives of stage 0 after regression, and nothing of detectron2's
cascade is re-implemented. Running an IoU-balanced sampler at every stage would change the
cascade itself (how many ROIs each stage trains on), not only the choice of ROIs.
"""

from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads

from .balanced_l1 import BalancedL1FastRCNNOutputLayers
from .roi_heads import IoUBalancedROIHeads


@ROI_HEADS_REGISTRY.register()
class LibraCascadeROIHeads(CascadeROIHeads):
    """
    ``CascadeROIHeads`` with :class:`BalancedL1FastRCNNOutputLayers` as the box predictor of every
    stage (``box_predictor[k]`` regresses with ``Box2BoxTransform(BBOX_REG_WEIGHTS[k])``), so that
    ``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE`` may be "balanced_l1" as well as any detectron2 type.

    Everything else (sampling, per-stage matching, pooler, box heads, mask head) is detectron2's.
    """

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            BalancedL1FastRCNNOutputLayers(
                cfg, head.output_shape, box2box_transform=Box2BoxTransform(weights=weights)
            )
            for head, weights in zip(
                ret["box_heads"], cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS
            )
        ]
        return ret


@ROI_HEADS_REGISTRY.register()
class IoUBalancedCascadeROIHeads(LibraCascadeROIHeads, IoUBalancedROIHeads):
    """
    :class:`LibraCascadeROIHeads` whose training ROIs are drawn by IoU-balanced sampling
    (IoU-balanced negatives, instance-balanced positives; ``MODEL.ROI_HEADS.IOU_BALANCED``).

    The sampling step (``_sample_proposals``), its max-IoU matcher for the first stage and its
    ``roi_head/neg_mean_iou`` statistic are :class:`IoUBalancedROIHeads`'s (next in the method
    resolution order after detectron2's ``CascadeROIHeads``); they act where detectron2's cascade
    samples, once before the first stage (see the module docstring). Stages ``k > 0`` relabel the
    regressed ROIs with ``proposal_matchers[k]`` as in detectron2.
    """
