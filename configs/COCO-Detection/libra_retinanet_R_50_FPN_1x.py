# Libra RetinaNet R-50-FPN 1x as LazyConfig: the model of libra_retinanet_R_50_FPN_1x.yaml on
# detectron2's COCO-Detection/retinanet_R_50_FPN_1x.py (data, lr 0.01, 1x schedule).
from detectron2 import model_zoo

from ..common.models.libra_retinanet import model

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = (
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
model.backbone.bottom_up.freeze_at = 2
