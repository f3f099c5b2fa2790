# Libra Mask R-CNN on detectron2's new baseline mask_rcnn_R_50_FPN_100ep_LSJ.py (large-scale
# jitter, SyncBN, 4conv1fc box head, 100 epochs from scratch): the same recipe with the Libra
# components of configs/Base-Libra-RCNN-FPN.yaml.
import os

from detectron2 import model_zoo

from libra_d2.lazy import libra_rcnn, libra_yaml

_base = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, optimizer, lr_multiplier, train = (
    _base.dataloader,
    _base.optimizer,
    _base.lr_multiplier,
    _base.train,
)
model = libra_rcnn(
    _base.model,
    libra_yaml(os.path.join(os.path.dirname(__file__), "..", "Base-Libra-RCNN-FPN.yaml")),
)
