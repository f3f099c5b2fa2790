"""mmdetection Libra R-CNN / Libra RetinaNet checkpoints as detectron2 state dicts.

An mmdetection checkpoint is a dict with ``state_dict`` and ``meta`` (v1, v2 and v3 alike). Its
tensors are renamed to the modules of the ``*_mmdet.yaml`` configs (``_RULES``); the two models
also differ in two layouts, rearranged here:

* RetinaNet anchors per location: mmdetection orders them ratio-major
  (``a = ratio_index * num_scales + scale_index``), detectron2 size-major
  (``a = scale_index * num_ratios + ratio_index``): the output channels of ``retina_cls`` /
  ``retina_reg`` are permuted.
* mmdetection v1 (the original Libra R-CNN release; keys without ``roi_head.``) puts the
  background class first: score row 0 moves to the end and box rows 0-3 are dropped. v1 also
  computes widths as ``x2 - x1 + 1`` in anchors, box coding, RoIAlign and NMS; detectron2 runs its
  weights with v2 box semantics, which mmdetection reports to cost less than 1 AP.
"""

import re

import torch

__all__ = ["MMDetCheckpointError", "is_mmdet_checkpoint", "convert_mmdet_state_dict"]


class MMDetCheckpointError(ValueError):
    """An mmdetection checkpoint does not fit the detectron2 model (names, not shapes)."""


# (mmdetection key pattern, detectron2 name); the first full match wins. "{L}" stands for the
# FPN level number of ``lateral_convs.{i}`` / ``fpn_convs.{i}``: i + 2 for Faster R-CNN (C2-C5),
# i + 3 for RetinaNet (C3-C5); ``fpn_convs`` past the laterals are RetinaNet's P6 / P7 convs.
_RULES = [
    (r"backbone\.conv1\.(.+)", r"backbone.bottom_up.stem.conv1.\1"),
    (r"backbone\.bn1\.(.+)", r"backbone.bottom_up.stem.conv1.norm.\1"),
    (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.(.+)", r"backbone.bottom_up.res{R}.\2.conv\3.\4"),
    (r"backbone\.layer(\d)\.(\d+)\.bn(\d)\.(.+)", r"backbone.bottom_up.res{R}.\2.conv\3.norm.\4"),
    (r"backbone\.layer(\d)\.0\.downsample\.0\.(.+)", r"backbone.bottom_up.res{R}.0.shortcut.\2"),
    (
        r"backbone\.layer(\d)\.0\.downsample\.1\.(.+)",
        r"backbone.bottom_up.res{R}.0.shortcut.norm.\2",
    ),
    (r"neck\.0\.lateral_convs\.(\d)\.conv\.(.+)", r"backbone.fpn_lateral{L}.\2"),
    (r"neck\.0\.fpn_convs\.(\d)\.conv\.(.+)", r"backbone.fpn_output{L}.\2"),
    (r"neck\.1\.refine\.(g|theta|phi|conv_out)\.conv\.(.+)", r"backbone.bfp.refine.\1.\2"),
    (r"neck\.1\.refine\.conv\.(.+)", r"backbone.bfp.refine.0.\1"),  # refine_type "conv"
    (r"rpn_head\.rpn_conv\.(.+)", r"proposal_generator.rpn_head.conv.\1"),
    (r"rpn_head\.rpn_cls\.(.+)", r"proposal_generator.rpn_head.objectness_logits.\1"),
    (r"rpn_head\.rpn_reg\.(.+)", r"proposal_generator.rpn_head.anchor_deltas.\1"),
    (r"roi_head\.bbox_head\.shared_fcs\.(\d)\.(.+)", r"roi_heads.box_head.fc{F}.\2"),
    (r"roi_head\.bbox_head\.fc_cls\.(.+)", r"roi_heads.box_predictor.cls_score.\1"),
    (r"roi_head\.bbox_head\.fc_reg\.(.+)", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"bbox_head\.cls_convs\.(\d)\.conv\.(.+)", r"head.cls_subnet.{S}.\2"),
    (r"bbox_head\.reg_convs\.(\d)\.conv\.(.+)", r"head.bbox_subnet.{S}.\2"),
    (r"bbox_head\.retina_cls\.(.+)", r"head.cls_score.\1"),
    (r"bbox_head\.retina_reg\.(.+)", r"head.bbox_pred.\1"),
]
_RULES = [(re.compile(pattern), name) for pattern, name in _RULES]


def is_mmdet_checkpoint(obj):
    """Whether ``obj`` (a loaded checkpoint file) is in mmdetection's format."""
    return isinstance(obj, dict) and "state_dict" in obj and "meta" in obj and "model" not in obj


def _d2_name(key, num_laterals, first_level):
    """The detectron2 name of mmdetection ``key``, or None."""
    for pattern, name in _RULES:
        m = pattern.fullmatch(key)
        if m:
            i = int(m[1]) if m[1].isdigit() else 0
            if key.startswith("neck.0.fpn_convs.") and i >= num_laterals:  # RetinaNet's P6 / P7
                name = r"backbone.top_block.p{L}.\2"
            return m.expand(name.format(R=i + 1, L=i + first_level, F=i + 1, S=2 * i))
    return None


def _to_size_major(t, num_anchors):
    """Permute dim 0 of a RetinaNet output conv (``A * K`` rows, mmdetection's anchor order)."""
    num_scales, num_ratios = num_anchors
    a = num_scales * num_ratios
    if t.shape[0] % a:
        raise MMDetCheckpointError(
            f"{t.shape[0]} RetinaNet outputs are not a multiple of {a} anchors"
        )
    order = [r * num_scales + s for s in range(num_scales) for r in range(num_ratios)]
    return t.reshape(a, -1, *t.shape[1:])[order].reshape(t.shape)


def _v1_to_v2(state):
    """mmdetection v1 two-stage keys and class layout (background first) to v2's."""
    state = {("roi_head." + k if k.startswith("bbox_head.") else k): v for k, v in state.items()}
    for p in ("weight", "bias"):
        cls, reg = f"roi_head.bbox_head.fc_cls.{p}", f"roi_head.bbox_head.fc_reg.{p}"
        state[cls] = torch.cat([state[cls][1:], state[cls][:1]])
        state[reg] = state[reg][4:]
    return state


def convert_mmdet_state_dict(checkpoint, model_keys=None, num_anchors=(3, 3)):
    """
    Rename and rearrange an mmdetection checkpoint's tensors for detectron2.

    Args:
        checkpoint (dict): a loaded mmdetection checkpoint (``state_dict`` + ``meta``).
        model_keys (iterable[str] or None): the detectron2 model's ``state_dict()`` keys. If given,
            every converted name must be one of them and every one of them must be filled.
        num_anchors (tuple[int, int]): RetinaNet's anchor scales and aspect ratios per location
            (mmdetection's ``scales_per_octave`` and ``len(ratios)``; unused for R-CNN).

    Returns:
        dict[str -> Tensor]: the detectron2 state dict (``num_batches_tracked`` dropped).

    Raises:
        MMDetCheckpointError: naming the first mmdetection key with no detectron2 counterpart, or
            the first model key the checkpoint leaves empty.
    """
    state = checkpoint["state_dict"]
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if "bbox_head.fc_cls.weight" in state:
        state = _v1_to_v2(state)
    retinanet = "bbox_head.retina_cls.weight" in state
    num_laterals = sum(
        re.fullmatch(r"neck\.0\.lateral_convs\.\d\.conv\.weight", k) is not None for k in state
    )
    names = {k: _d2_name(k, num_laterals, 3 if retinanet else 2) for k in state}
    model_keys = None if model_keys is None else list(model_keys)
    for key, name in names.items():
        if name is None or (model_keys is not None and name not in model_keys):
            raise MMDetCheckpointError(
                f"mmdetection key '{key}' has no counterpart in the detectron2 model"
                + (f" (would be '{name}')" if name else "")
            )
    filled = set(names.values())
    for key in model_keys or ():
        if key not in filled:
            raise MMDetCheckpointError(f"model key '{key}' is not in the mmdetection checkpoint")
    converted = {}
    for key, value in state.items():
        if key.startswith(("bbox_head.retina_cls.", "bbox_head.retina_reg.")):
            value = _to_size_major(value, num_anchors)
        converted[names[key]] = value
    return converted
