# Libra Mask R-CNN (FPN): detectron2's common/models/mask_rcnn_fpn.py made Libra by
# libra_d2.lazy.libra_rcnn with the settings of configs/Base-Libra-RCNN-FPN.yaml (BFP, LibraRPN,
# IoU-balanced ROI heads, balanced L1). The mask head trains on the instance-balanced positives.
import os

from detectron2 import model_zoo

from libra_d2.lazy import libra_rcnn, libra_yaml

model = libra_rcnn(
    model_zoo.get_config("common/models/mask_rcnn_fpn.py").model,
    libra_yaml(os.path.join(os.path.dirname(__file__), "..", "..", "Base-Libra-RCNN-FPN.yaml")),
)
