# Libra RetinaNet R-50-FPN 1x as LazyConfig: detectron2's COCO-Detection/retinanet_R_50_FPN_1x.py
# (data, lr 0.01, 1x schedule, ImageNet weights, freeze_at 2) with the Libra components of
# configs/Base-Libra-RetinaNet.yaml; the model of libra_retinanet_R_50_FPN_1x.yaml.
import os

from detectron2 import model_zoo

from libra_d2.lazy import libra_retinanet, libra_yaml

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader, optimizer, lr_multiplier, train = (
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
model = libra_retinanet(
    _base.model,
    libra_yaml(os.path.join(os.path.dirname(__file__), "..", "Base-Libra-RetinaNet.yaml")),
)
