"""Libra R-CNN on detectron2's LazyConfig models.

:func:`libra_rcnn` and :func:`libra_retinanet` edit, in place, a LazyConfig model of detectron2's
``common/models`` (or anything built like one) into its Libra version. They take Libra's values
from a YAML config with the libra_d2 keys (:func:`libra_yaml`): ``add_libra_config`` holds the
defaults and ``configs/Base-Libra-*.yaml`` the official recipe, for YAML and Lazy configs alike::

    from detectron2 import model_zoo
    from libra_d2.lazy import libra_rcnn, libra_yaml

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    libra_rcnn(model, libra_yaml("configs/Base-Libra-RCNN-FPN.yaml"))
"""

from detectron2.config import get_cfg

from .config import add_libra_config
from .modeling import (
    BalancedFPN,
    BalancedL1FastRCNNOutputLayers,
    IoUBalancedCascadeROIHeads,
    IoUBalancedROIHeads,
    LibraRetinaNet,
    LibraRPN,
)
from .modeling.balanced_l1 import balanced_l1_params
from .modeling.bfp import LastLevelP6P7NoReLU

__all__ = ["libra_yaml", "libra_rcnn", "libra_retinanet"]


def libra_yaml(yaml_file):
    """detectron2's defaults with the libra_d2 keys, merged from ``yaml_file``."""
    cfg = add_libra_config(get_cfg())
    cfg.merge_from_file(yaml_file)
    return cfg


def _balanced_fpn(backbone, cfg):
    """FPN -> :class:`BalancedFPN` with ``MODEL.BFP``."""
    backbone._target_ = BalancedFPN
    backbone.update(
        refine_level=int(cfg.MODEL.BFP.REFINE_LEVEL), refine_type=cfg.MODEL.BFP.REFINE_TYPE
    )


def libra_rcnn(model, cfg):
    """
    Turn a LazyConfig ``GeneralizedRCNN`` with an ``FPN`` backbone, an ``RPN`` and
    ``StandardROIHeads`` or ``CascadeROIHeads`` (e.g. ``common/models/mask_rcnn_fpn.py``,
    ``cascade_rcnn.py``) into Libra R-CNN, in place: the BFP after the FPN,
    :class:`IoUBalancedROIHeads` (:class:`IoUBalancedCascadeROIHeads`) with
    :class:`BalancedL1FastRCNNOutputLayers` in every stage, and :class:`LibraRPN` where ``cfg``
    selects it (``MODEL.PROPOSAL_GENERATOR.NAME``). Values come from ``cfg`` (see
    :func:`libra_yaml`). Returns ``model``.
    """
    _balanced_fpn(model.backbone, cfg)
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME == "LibraRPN":
        model.proposal_generator._target_ = LibraRPN
        model.proposal_generator.update(
            neg_pos_ub=float(cfg.MODEL.RPN.NEG_POS_UB),
            loss_normalizer=cfg.MODEL.RPN.LOSS_NORMALIZER,
        )
    ib = cfg.MODEL.ROI_HEADS.IOU_BALANCED
    cascade = "box_predictors" in model.roi_heads
    model.roi_heads._target_ = IoUBalancedCascadeROIHeads if cascade else IoUBalancedROIHeads
    model.roi_heads.update(
        num_bins=int(ib.NUM_BINS),
        floor_thr=float(ib.FLOOR_THR),
        floor_fraction=float(ib.FLOOR_FRACTION),
        instance_balanced_pos=bool(ib.INSTANCE_BALANCED_POS),
    )
    box_head = cfg.MODEL.ROI_BOX_HEAD
    params = balanced_l1_params(box_head.BALANCED_L1, "MODEL.ROI_BOX_HEAD.BALANCED_L1")
    heads = model.roi_heads
    for predictor in heads.box_predictors if cascade else [heads.box_predictor]:
        predictor._target_ = BalancedL1FastRCNNOutputLayers
        predictor.update(box_reg_loss_type=box_head.BBOX_REG_LOSS_TYPE, balanced_l1_params=params)
    return model


def libra_retinanet(model, cfg):
    """
    Turn a LazyConfig ``RetinaNet`` with an ``FPN`` backbone (e.g. ``common/models/retinanet.py``)
    into Libra RetinaNet, in place: the BFP after the FPN (P7 without ReLU if
    ``MODEL.FPN.P7_RELU`` is False) and :class:`LibraRetinaNet`'s balanced L1. Values come from
    ``cfg`` (see :func:`libra_yaml`). Returns ``model``.
    """
    _balanced_fpn(model.backbone, cfg)
    if not cfg.MODEL.FPN.P7_RELU:
        model.backbone.top_block._target_ = LastLevelP6P7NoReLU
    model._target_ = LibraRetinaNet
    model.balanced_l1_params = balanced_l1_params(
        cfg.MODEL.RETINANET.BALANCED_L1, "MODEL.RETINANET.BALANCED_L1"
    )
    return model
