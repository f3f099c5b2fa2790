"""Libra R-CNN modules; importing this package registers them with detectron2's registries."""

from .balanced_l1 import BalancedL1FastRCNNOutputLayers, balanced_l1_loss
from .bfp import (
    BalancedFeaturePyramid,
    BalancedFPN,
    build_resnet_bfp_backbone,
    build_retinanet_resnet_bfp_backbone,
)
from .cascade import IoUBalancedCascadeROIHeads, LibraCascadeROIHeads
from .retinanet import LibraRetinaNet
from .roi_heads import IoUBalancedROIHeads, LibraROIHeads
from .rpn import LibraRPN
from .sampling import iou_balanced_subsample

__all__ = [
    "BalancedL1FastRCNNOutputLayers",
    "balanced_l1_loss",
    "BalancedFeaturePyramid",
    "BalancedFPN",
    "build_resnet_bfp_backbone",
    "build_retinanet_resnet_bfp_backbone",
    "IoUBalancedCascadeROIHeads",
    "LibraCascadeROIHeads",
    "LibraRetinaNet",
    "IoUBalancedROIHeads",
    "LibraROIHeads",
    "LibraRPN",
    "iou_balanced_subsample",
]
