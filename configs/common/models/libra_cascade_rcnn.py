# Libra Cascade Mask R-CNN (FPN): detectron2's common/models/cascade_rcnn.py made Libra by
# libra_d2.lazy.libra_rcnn with the settings of configs/Base-Libra-RCNN-FPN.yaml: IoU-balanced
# sampling where detectron2's cascade samples (once, before the first stage) and balanced L1 in
# every stage. The model of configs/Misc/libra_cascade_mask_rcnn_R_50_FPN_1x.yaml.
import os

from detectron2 import model_zoo

from libra_d2.lazy import libra_rcnn, libra_yaml

model = libra_rcnn(
    model_zoo.get_config("common/models/cascade_rcnn.py").model,
    libra_yaml(os.path.join(os.path.dirname(__file__), "..", "..", "Base-Libra-RCNN-FPN.yaml")),
)
