# Libra Faster R-CNN (FPN): libra_mask_rcnn_fpn.py without the mask head, the model of
# configs/COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml.
from .libra_mask_rcnn_fpn import model

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
