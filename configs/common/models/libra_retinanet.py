# Libra RetinaNet: detectron2's common/models/retinanet.py made Libra by
# libra_d2.lazy.libra_retinanet with the settings of configs/Base-Libra-RetinaNet.yaml (BFP with
# refine level p4, balanced L1 with beta 0.11).
import os

from detectron2 import model_zoo

from libra_d2.lazy import libra_retinanet, libra_yaml

model = libra_retinanet(
    model_zoo.get_config("common/models/retinanet.py").model,
    libra_yaml(os.path.join(os.path.dirname(__file__), "..", "..", "Base-Libra-RetinaNet.yaml")),
)
