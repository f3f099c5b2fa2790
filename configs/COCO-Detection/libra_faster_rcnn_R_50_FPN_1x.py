# Libra Faster R-CNN R-50-FPN 1x as LazyConfig: detectron2's
# COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py (data, optimizer, 1x schedule, ImageNet
# weights, freeze_at 2; detectron2 ships no Faster R-CNN LazyConfig) without the mask head, with
# the Libra components of configs/Base-Libra-RCNN-FPN.yaml; the model of
# libra_faster_rcnn_R_50_FPN_1x.yaml.
import os

from detectron2 import model_zoo

from libra_d2.lazy import libra_rcnn, libra_yaml

_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = (
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
dataloader.train.mapper.use_instance_mask = False
_base.model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
model = libra_rcnn(
    _base.model,
    libra_yaml(os.path.join(os.path.dirname(__file__), "..", "Base-Libra-RCNN-FPN.yaml")),
)
