# Libra Cascade Mask R-CNN R-50-FPN 1x as LazyConfig: detectron2's
# COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py (data, optimizer, 1x schedule, ImageNet
# weights, freeze_at 2) with the cascade ROI heads of detectron2's common/models/cascade_rcnn.py and
# the RPN training proposals of its YAML twin libra_cascade_mask_rcnn_R_50_FPN_1x.yaml (detectron2's
# Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml), made Libra with that file's Libra settings:
# IoU-balanced sampling where the cascade samples (once, before the first stage), balanced L1 in
# every stage.
import os

from detectron2 import model_zoo

from libra_d2.lazy import libra_rcnn, libra_yaml

_C = libra_yaml(os.path.join(os.path.dirname(__file__), "libra_cascade_mask_rcnn_R_50_FPN_1x.yaml"))
_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = (
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
_base.model.roi_heads = model_zoo.get_config("common/models/cascade_rcnn.py").model.roi_heads
_rpn = _C.MODEL.RPN
_base.model.proposal_generator.post_nms_topk = (_rpn.POST_NMS_TOPK_TRAIN, _rpn.POST_NMS_TOPK_TEST)
model = libra_rcnn(_base.model, _C)
