# Libra Faster R-CNN R-18-FPN on libra_shapes (CPU) as LazyConfig: the model, data and schedule of
# libra_faster_rcnn_R_18_FPN.yaml, every value read from that file, on configs/common/models and
# detectron2's common data, optimizer and train settings.
import os

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from libra_d2.lazy import libra_yaml

from ..common.models.libra_faster_rcnn_fpn import model

_C = libra_yaml(os.path.join(os.path.dirname(__file__), "libra_faster_rcnn_R_18_FPN.yaml"))

# model: R-18 with GroupNorm, trained from scratch; a 64-channel FPN; small anchors and heads
_bottom_up = model.backbone.bottom_up
_bottom_up.stem.norm = _bottom_up.stages.norm = _C.MODEL.RESNETS.NORM
_bottom_up.stages.depth = _C.MODEL.RESNETS.DEPTH
del _bottom_up.stages.stride_in_1x1  # basic blocks have a single stride
_bottom_up.freeze_at = _C.MODEL.BACKBONE.FREEZE_AT
model.backbone.norm = _C.MODEL.FPN.NORM
model.backbone.out_channels = _channels = _C.MODEL.FPN.OUT_CHANNELS
model.proposal_generator.head.in_channels = _channels
model.proposal_generator.anchor_generator.sizes = _C.MODEL.ANCHOR_GENERATOR.SIZES
_rpn = _C.MODEL.RPN
model.proposal_generator.pre_nms_topk = (_rpn.PRE_NMS_TOPK_TRAIN, _rpn.PRE_NMS_TOPK_TEST)
model.proposal_generator.post_nms_topk = (_rpn.POST_NMS_TOPK_TRAIN, _rpn.POST_NMS_TOPK_TEST)
model.roi_heads.num_classes = _C.MODEL.ROI_HEADS.NUM_CLASSES
model.roi_heads.batch_size_per_image = _C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
_box = _C.MODEL.ROI_BOX_HEAD
model.roi_heads.box_pooler.output_size = _box.POOLER_RESOLUTION
model.roi_heads.box_pooler.sampling_ratio = _box.POOLER_SAMPLING_RATIO
model.roi_heads.box_head.input_shape = ShapeSpec(
    channels=_channels, height=_box.POOLER_RESOLUTION, width=_box.POOLER_RESOLUTION
)
model.roi_heads.box_head.fc_dims = [_box.FC_DIM] * _box.NUM_FC
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=_box.FC_DIM)
model.roi_heads.box_predictor.test_topk_per_image = _C.TEST.DETECTIONS_PER_IMAGE
model.pixel_mean, model.pixel_std = _C.MODEL.PIXEL_MEAN, _C.MODEL.PIXEL_STD
model.input_format = _C.INPUT.FORMAT

# data: 224 px images, horizontal flips, COCO evaluation
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = _C.DATASETS.TRAIN[0]
dataloader.test.dataset.names = _C.DATASETS.TEST[0]
dataloader.train.mapper.use_instance_mask = _C.MODEL.MASK_ON
dataloader.train.mapper.image_format = _C.INPUT.FORMAT
dataloader.train.mapper.augmentations[0] = L(T.ResizeShortestEdge)(
    short_edge_length=_C.INPUT.MIN_SIZE_TRAIN,
    max_size=_C.INPUT.MAX_SIZE_TRAIN,
    sample_style=_C.INPUT.MIN_SIZE_TRAIN_SAMPLING,
)
dataloader.test.mapper.augmentations[0] = L(T.ResizeShortestEdge)(
    short_edge_length=_C.INPUT.MIN_SIZE_TEST, max_size=_C.INPUT.MAX_SIZE_TEST
)
dataloader.train.total_batch_size = _C.SOLVER.IMS_PER_BATCH
dataloader.train.num_workers = dataloader.test.num_workers = _C.DATALOADER.NUM_WORKERS

# schedule: SGD, linear warm-up, a x GAMMA step at each of SOLVER.STEPS
_solver = _C.SOLVER
optimizer = model_zoo.get_config("common/optim.py").SGD
optimizer.update(
    lr=_solver.BASE_LR,
    momentum=_solver.MOMENTUM,
    nesterov=_solver.NESTEROV,
    weight_decay=_solver.WEIGHT_DECAY,
)
optimizer.params.weight_decay_norm = _solver.WEIGHT_DECAY_NORM
train = model_zoo.get_config("common/train.py").train
train.max_iter = _solver.MAX_ITER
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[_solver.GAMMA**k for k in range(len(_solver.STEPS) + 1)],
        milestones=list(_solver.STEPS),
        num_updates=train.max_iter,
    ),
    warmup_length=_solver.WARMUP_ITERS / train.max_iter,
    warmup_factor=_solver.WARMUP_FACTOR,
    warmup_method=_solver.WARMUP_METHOD,
)
train.checkpointer.period = _solver.CHECKPOINT_PERIOD
train.eval_period = train.max_iter  # evaluate once, at the end
train.device = _C.MODEL.DEVICE
train.output_dir = _C.OUTPUT_DIR + "_lazy"
