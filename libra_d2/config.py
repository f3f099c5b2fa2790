"""Every config key that libra_d2 adds to detectron2, with its default.

Call :func:`add_libra_config` on a detectron2 config (``get_cfg()``) before merging a libra_d2 YAML.
It only adds keys to the config passed in; detectron2's global defaults are never touched.
"""

import math

from detectron2.config import CfgNode as CN


def add_libra_config(cfg):
    """
    Add the Libra R-CNN config keys to ``cfg`` (in place) and return it.

    Args:
        cfg (CfgNode): a detectron2 config, e.g. from ``detectron2.config.get_cfg()``.
    """
    _C = cfg

    # ---- Sample level: IoU-balanced sampling of the second-stage (ROI heads) training samples ----
    _C.MODEL.ROI_HEADS.IOU_BALANCED = CN()
    # Number of equal-width IoU bins the negatives are drawn from evenly (paper: K = 3).
    _C.MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS = 3
    # -1: every negative takes part in the IoU bins; in [0, 1): negatives below it are drawn
    # at random for a FLOOR_FRACTION share of the quota.
    _C.MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_THR = -1.0
    # Share of the negative quota drawn at random below FLOOR_THR (used only when FLOOR_THR >= 0).
    _C.MODEL.ROI_HEADS.IOU_BALANCED.FLOOR_FRACTION = 0.0
    # Split the positive quota evenly across ground-truth objects (instance-balanced positives).
    _C.MODEL.ROI_HEADS.IOU_BALANCED.INSTANCE_BALANCED_POS = True

    # ---- First stage of the official recipe (MODEL.PROPOSAL_GENERATOR.NAME "LibraRPN") ----
    # Not one of the paper's three components: settings of mmdetection's RPN that the official
    # Libra configs use. The defaults below are detectron2's RPN.
    # At most this many sampled negatives per sampled positive anchor in each image (official
    # Libra: 5, mmdetection's neg_pos_ub); -1: no cap.
    _C.MODEL.RPN.NEG_POS_UB = -1.0
    # What the RPN losses are divided by: "batch_size" (BATCH_SIZE_PER_IMAGE x images,
    # detectron2) or "num_sampled" (the anchors actually sampled, mmdetection).
    _C.MODEL.RPN.LOSS_NORMALIZER = "batch_size"

    # ---- Feature level: Balanced Feature Pyramid over all FPN outputs ----
    _C.MODEL.BFP = CN()
    # Index into the FPN outputs of the level features are gathered at (2 = p4, stride 16).
    _C.MODEL.BFP.REFINE_LEVEL = 2
    # How the gathered feature is refined: "non_local", "conv" or "none".
    _C.MODEL.BFP.REFINE_TYPE = "non_local"
    # RetinaNet backbones: P7 = conv(relu(P6)) if True (detectron2's LastLevelP6P7), conv(P6) if
    # False (mmdetection's RetinaNet FPN, relu_before_extra_convs=False).
    _C.MODEL.FPN.P7_RELU = True

    # ---- Objective level: balanced L1 loss for the box regression of the ROI box head ----
    # Selected by MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "balanced_l1" with the libra_d2 ROI heads
    # (LibraROIHeads, IoUBalancedROIHeads).
    _C.MODEL.ROI_BOX_HEAD.BALANCED_L1 = CN()
    # alpha: gradient scale of the inlier part (gradient alpha * ln(b|x|/beta + 1) below beta).
    _C.MODEL.ROI_BOX_HEAD.BALANCED_L1.ALPHA = 0.5
    # gamma: gradient of the outlier part (|x| >= beta); b = e^(gamma/alpha) - 1.
    _C.MODEL.ROI_BOX_HEAD.BALANCED_L1.GAMMA = 1.5
    # beta: boundary between inliers and outliers, in units of the (weighted) box deltas.
    _C.MODEL.ROI_BOX_HEAD.BALANCED_L1.BETA = 1.0

    # ---- Libra RetinaNet (META_ARCHITECTURE "LibraRetinaNet"): balanced L1 box regression ----
    _C.MODEL.RETINANET.BALANCED_L1 = CN()
    # alpha, gamma, beta: as MODEL.ROI_BOX_HEAD.BALANCED_L1 (official RetinaNet: beta = 0.11).
    _C.MODEL.RETINANET.BALANCED_L1.ALPHA = 0.5
    # gamma: gradient of the outliers (|x| >= beta).
    _C.MODEL.RETINANET.BALANCED_L1.GAMMA = 1.5
    # beta: inlier/outlier boundary in box-delta units (value continuous there, gradient not).
    _C.MODEL.RETINANET.BALANCED_L1.BETA = 0.11

    return cfg


def check_range(key, value, low, high, low_open=False, high_open=False, integer=False):
    """
    Raise ``ValueError`` naming the config ``key`` unless ``low <= value <= high`` (``<`` on an
    open side; NaN is out of any range) and, with ``integer``, ``value`` is a whole number. Used by
    the libra_d2 modules' ``from_config``.
    """
    above_low = low < value if low_open else low <= value
    below_high = value < high if high_open else value <= high
    if not (above_low and below_high and (not integer or float(value).is_integer())):
        if high == math.inf:
            interval = f"{'>' if low_open else '>='} {low}"
        else:
            interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        kind = "be an integer" if integer else "lie"
        raise ValueError(f"{key} = {value!r} is out of range: it must {kind} {interval}")


def check_positive(key, value):
    """Raise ``ValueError`` naming the config ``key`` unless ``value`` is a finite number > 0."""
    if not (0 < value < math.inf):
        raise ValueError(f"{key} = {value!r} is out of range: it must be a finite number > 0")
