# Libra Mask R-CNN R-50-FPN 1x as LazyConfig: the model of libra_mask_rcnn_R_50_FPN_1x.yaml with
# the COCO data, optimizer and 1x schedule of detectron2's
# COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py.
from detectron2 import model_zoo

from ..common.models.libra_mask_rcnn_fpn import model

_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = (
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
model.backbone.bottom_up.freeze_at = 2
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
