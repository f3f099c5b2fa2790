"""Balanced Feature Pyramid (Libra R-CNN, Pang et al., CVPR 2019, arXiv 1904.02701, Sec. 3.2)."""

import types
from typing import List

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from fvcore.nn import weight_init
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..config import check_range

__all__ = [
    "NonLocal2d",
    "BalancedFeaturePyramid",
    "BalancedFPN",
    "build_resnet_bfp_backbone",
    "build_retinanet_resnet_bfp_backbone",
    "adaptive_max_pool2d_by_gather",
    "max_pool_to",
    "add_nearest_upsampled",
]


class NonLocal2d(nn.Module):
    """
    Embedded-Gaussian non-local block (Wang et al., 2018) as used by Libra R-CNN's BFP.

    Matches mmcv's ``NonLocal2d(in_channels, reduction=1, use_scale=False,
    mode="embedded_gaussian")`` without norm: 1x1 convs ``g``, ``theta``, ``phi`` with
    ``in_channels`` inner channels, ``y = softmax(theta(x)^T phi(x)) g(x)`` over the ``H*W``
    positions (no ``1/sqrt(C)`` scaling), output ``x + conv_out(y)``. ``g``/``theta``/``phi`` are
    initialised N(0, 0.01) with zero bias and ``conv_out`` with zeros (weight and bias), so a
    freshly built block is the identity.

    Shapes: input ``(N, C, H, W)`` -> output ``(N, C, H, W)``. The ``(H*W) x (H*W)``
    attention is computed by ``F.scaled_dot_product_attention`` on contiguous ``(N, 1, H*W, C)``
    tokens, so a fused (flash / memory-efficient) kernel runs it without materialising the
    attention matrix; those kernels and SDPA's math path accumulate the logits and the softmax in
    fp32, so unscaled logits do not overflow in fp16.
    """

    def __init__(self, in_channels: int, init_std: float = 0.01):
        super().__init__()
        if int(in_channels) != in_channels or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = int(in_channels)
        inter = self.in_channels  # reduction = 1
        self.g = nn.Conv2d(self.in_channels, inter, kernel_size=1)
        self.theta = nn.Conv2d(self.in_channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(self.in_channels, inter, kernel_size=1)
        self.conv_out = nn.Conv2d(inter, self.in_channels, kernel_size=1)
        for m in (self.g, self.theta, self.phi):
            nn.init.normal_(m.weight, mean=0.0, std=init_std)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        n, c, h, w = x.shape
        # (N, C, H, W) -> (N, 1, H*W, C): one attention head over the spatial positions; the
        # 1x1 convs applied as F.linear on the tokens give contiguous query / key / value.
        tokens = x.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)
        q = F.linear(tokens, self.theta.weight.flatten(1), self.theta.bias)
        k = F.linear(tokens, self.phi.weight.flatten(1), self.phi.bias)
        v = F.linear(tokens, self.g.weight.flatten(1), self.g.bias)
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        y = F.linear(y, self.conv_out.weight.flatten(1), self.conv_out.bias)
        # (N, 1, H*W, C) -> (N, C, H, W)
        return x + y.squeeze(1).transpose(1, 2).reshape(n, c, h, w)


class _MaxPoolTo(torch.autograd.Function):
    """``F.adaptive_max_pool2d(x, size)`` whose backward keeps the argmax indices, not ``x``."""

    @staticmethod
    def forward(ctx, x, size):
        out, idx = F.adaptive_max_pool2d(x, size, return_indices=True)
        ctx.save_for_backward(idx)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        n, c, h, w = ctx.x_shape
        grad_x = grad.new_zeros(n, c, h * w).scatter_add_(2, idx.flatten(2), grad.flatten(2))
        return grad_x.view(n, c, h, w), None


def adaptive_max_pool2d_by_gather(x: torch.Tensor, size: List[int]) -> torch.Tensor:
    """
    ``F.adaptive_max_pool2d(x, size)`` (same values, exactly) from ops that take symbolic sizes,
    for ``torch.export`` with dynamic height and width: ATen's op specialises its output size.

    Bin ``i`` of an axis of length ``n`` pooled to ``m`` covers ``[floor(i*n/m), ceil((i+1)*n/m))``
    as in ATen; every bin is read as ``ceil(n/m) + 1`` rows, indices clamped to the bin's last row
    (which leaves the max unchanged), gathered by indexing with the ``(m, k)`` index matrix and
    reduced with ``amax``.
    """
    for axis, m in ((2, size[0]), (3, size[1])):
        n = x.shape[axis]
        i = torch.arange(m, device=x.device)
        start = (i * n) // m
        last = ((i + 1) * n + m - 1) // m - 1
        offsets = torch.arange((n + m - 1) // m + 1, device=x.device)
        index = torch.minimum(start[:, None] + offsets, last[:, None])  # (m, k)
        x = x[(slice(None),) * axis + (index,)].amax(axis + 1)
    return x


def _divides(small, large) -> bool:
    """Whether ``large`` is a multiple of ``small`` (under ``torch.export``: provably, without
    adding a guard on the symbolic sizes). False under ``torch.jit.trace``, whose sizes are
    traced tensors: the trace keeps ATen's resizing ops, which take them."""
    if torch.jit.is_tracing():
        return False
    return statically_known_true(large % small == 0)


def max_pool_to(x: torch.Tensor, size: List[int]) -> torch.Tensor:
    """
    ``F.adaptive_max_pool2d(x, size)`` for ``x`` of shape ``(N, C, H, W)``: the same values, and
    when ``x`` requires grad the same gradient, with only the argmax indices kept for the
    backward (so a pyramid level is not held twice until then).

    Without grad, where ``H`` and ``W`` are multiples of ``size = (h, w)`` (the BFP's finer
    levels and the level below the refine level: inputs are padded to the size divisibility),
    the bins are ``H/h x W/w`` blocks, reduced by ``amax`` one axis at a time on a reshaped
    view; otherwise ATen's op or, under ``torch.export`` (whose symbolic sizes ATen's op cannot
    take), :func:`adaptive_max_pool2d_by_gather`.
    """
    if not torch.jit.is_scripting():  # TorchScript has no autograd.Function or symbolic sizes
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPoolTo.apply(x, tuple(size))
        (h, w), (m_h, m_w) = x.shape[-2:], size
        if _divides(m_h, h) and _divides(m_w, w):
            return x.unflatten(3, (m_w, w // m_w)).amax(4).unflatten(2, (m_h, h // m_h)).amax(3)
        if torch.compiler.is_exporting():
            return adaptive_max_pool2d_by_gather(x, size)
    return F.adaptive_max_pool2d(x, size)


def add_nearest_upsampled(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """
    ``x + F.interpolate(y, size=x.shape[-2:], mode="nearest")`` (same values, exactly) for ``x``
    ``(N, C, H, W)`` and ``y`` ``(N, C, h, w)``.

    Where ``H`` and ``W`` are multiples of ``h`` and ``w``, each ``y`` value is broadcast over
    its ``H/h x W/w`` block of a reshaped view of ``x``, so the upsampled ``y`` is never
    materialised. Under ``torch.export``, ``y`` expanded over the blocks and reshaped to
    ``(N, C, H, W)`` is added instead: AOTInductor compiles that to an add in ``x``'s layout,
    the broadcast form to a 6-D loop in another layout.
    """
    if not torch.jit.is_scripting():
        (n, c, h, w), (m_h, m_w) = y.shape, x.shape[-2:]
        if _divides(h, m_h) and _divides(w, m_w):
            y = y[:, :, :, None, :, None]
            if torch.compiler.is_exporting():
                return x + y.expand(n, c, h, m_h // h, w, m_w // w).reshape(n, c, m_h, m_w)
            blocks = x.unflatten(3, (w, m_w // w)).unflatten(2, (h, m_h // h))
            return (blocks + y).flatten(4, 5).flatten(2, 3)
    return x + F.interpolate(y, size=x.shape[-2:], mode="nearest")


class BalancedFeaturePyramid(nn.Module):
    """
    Balanced Feature Pyramid: integrate, refine and strengthen multi-level features.

    1. Gather every level to the size of level ``refine_level``: finer levels by
       ``F.adaptive_max_pool2d``, coarser ones by nearest interpolation; average them.
    2. Refine the balanced feature: ``"non_local"`` (embedded-Gaussian :class:`NonLocal2d`,
       identity at initialisation), ``"conv"`` (3x3 conv + ReLU, c2_xavier_fill init) or
       ``"none"`` (identity, no parameters).
    3. Scatter it back to every level (nearest interpolation up to finer levels, adaptive max
       pooling down to coarser ones) and add it to that level's input (residual).

    Args:
        in_channels (int): channels ``C`` of every level.
        num_levels (int): number of pyramid levels ``L`` (>= 1).
        refine_level (int): index in ``[0, num_levels)`` of the level whose size the features
            are gathered to (2 = P4 for P2-P6 in Libra Faster R-CNN).
        refine_type (str): "non_local" | "conv" | "none".

    Forward:
        inputs: list or tuple of ``L`` tensors ``(N, C, H_i, W_i)``, ordered fine to coarse.
        Returns a list of ``L`` tensors with the same shapes as the inputs.
    """

    REFINE_TYPES = ("non_local", "conv", "none")

    def __init__(
        self,
        in_channels: int,
        num_levels: int,
        refine_level: int = 2,
        refine_type: str = "non_local",
    ):
        super().__init__()
        if isinstance(in_channels, bool) or int(in_channels) != in_channels or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if isinstance(num_levels, bool) or int(num_levels) != num_levels or num_levels < 1:
            raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
        if (
            isinstance(refine_level, bool)
            or int(refine_level) != refine_level
            or not 0 <= refine_level < num_levels
        ):
            raise ValueError(
                f"refine_level must be an int in [0, num_levels - 1] = [0, {int(num_levels) - 1}]"
                f", got {refine_level!r}"
            )
        if refine_type not in self.REFINE_TYPES:
            raise ValueError(f"refine_type must be one of {self.REFINE_TYPES}, got {refine_type!r}")
        self.in_channels = int(in_channels)
        self.num_levels = int(num_levels)
        self.refine_level = int(refine_level)
        self.refine_type = refine_type

        if refine_type == "non_local":
            self.refine = NonLocal2d(self.in_channels)
        elif refine_type == "conv":
            conv = nn.Conv2d(self.in_channels, self.in_channels, kernel_size=3, padding=1)
            weight_init.c2_xavier_fill(conv)
            self.refine = nn.Sequential(conv, nn.ReLU(inplace=True))
        else:
            self.refine = nn.Identity()

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        """inputs: L tensors (N, C, H_i, W_i), fine to coarse -> list of L tensors, same shapes."""
        r, refine_hw = self.refine_level, inputs[self.refine_level].shape[-2:]

        # 1. integrate: gather to the refine level's size and average (summed fine to coarse)
        bsf = inputs[0] if r == 0 else max_pool_to(inputs[0], refine_hw)
        for i in range(1, self.num_levels):
            if i < r:
                bsf = bsf + max_pool_to(inputs[i], refine_hw)
            elif i > r:
                bsf = add_nearest_upsampled(bsf, inputs[i])
            else:
                bsf = bsf + inputs[i]
        bsf = bsf / self.num_levels

        # 2. refine
        bsf = self.refine(bsf)

        # 3. strengthen: scatter back and add to each level
        outs = []
        for i, x in enumerate(inputs):
            if i < r:
                outs.append(add_nearest_upsampled(x, bsf))
            elif i > r:
                outs.append(x + max_pool_to(bsf, x.shape[-2:]))
            else:
                outs.append(x + bsf)
        return outs


class BalancedFPN(FPN):
    """
    detectron2's :class:`FPN` followed by a :class:`BalancedFeaturePyramid` over all of its outputs
    (p2-p6 for Faster R-CNN, p3-p7 for RetinaNet; the top block's levels included, as the
    official neck does).

    Being an ``FPN`` subclass, every FPN and bottom-up parameter keeps its detectron2 name, so a
    detectron2 R-50-FPN checkpoint loads with only ``bfp.*`` reported missing. ``output_shape()``,
    ``size_divisibility`` and ``padding_constraints`` are those of the FPN.
    """

    def __init__(self, *, refine_level: int = 2, refine_type: str = "non_local", **fpn_kwargs):
        """
        Args:
            refine_level, refine_type: see :class:`BalancedFeaturePyramid`; ``refine_level``
                indexes the FPN outputs, fine to coarse.
            fpn_kwargs: arguments of :class:`detectron2.modeling.FPN`.
        """
        super().__init__(**fpn_kwargs)
        channels = {self._out_feature_channels[f] for f in self._out_features}
        assert len(channels) == 1, channels
        self.bfp = BalancedFeaturePyramid(
            channels.pop(), len(self._out_features), refine_level, refine_type
        )

    # FPN.forward as a method of its own name: TorchScript has no super() and names a compiled
    # method after its function.
    _fpn_forward = types.FunctionType(FPN.forward.__code__, FPN.forward.__globals__, "_fpn_forward")

    def forward(self, x):
        """
        Args:
            x (Tensor): ``(N, C, H, W)`` input images.

        Returns:
            dict[str -> Tensor]: FPN feature name (e.g. "p2") -> balanced feature ``(N, C', H_i,
            W_i)``, the same keys and shapes as :meth:`FPN.forward`.
        """
        features = self._fpn_forward(x)
        balanced = self.bfp([features[f] for f in self._out_features])
        return {f: b for f, b in zip(self._out_features, balanced)}


def _build_resnet_bfp(cfg, input_shape, top_block_fn):
    """ResNet + :class:`BalancedFPN`; ``top_block_fn(bottom_up)`` builds the FPN top block."""
    bfp = cfg.MODEL.BFP
    if bfp.REFINE_TYPE not in BalancedFeaturePyramid.REFINE_TYPES:
        raise ValueError(
            f"MODEL.BFP.REFINE_TYPE = {bfp.REFINE_TYPE!r} is not one of "
            f"{BalancedFeaturePyramid.REFINE_TYPES}"
        )
    bottom_up = build_resnet_backbone(cfg, input_shape)
    top_block = top_block_fn(bottom_up)
    num_levels = len(cfg.MODEL.FPN.IN_FEATURES) + top_block.num_levels
    check_range(
        "MODEL.BFP.REFINE_LEVEL", bfp.REFINE_LEVEL, 0, num_levels, high_open=True, integer=True
    )
    return BalancedFPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        refine_level=bfp.REFINE_LEVEL,
        refine_type=bfp.REFINE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_bfp_backbone(cfg, input_shape: ShapeSpec):
    """
    The backbone of ``build_resnet_fpn_backbone`` (ResNet + FPN p2-p6) followed by the Balanced
    Feature Pyramid over p2-p6 (``MODEL.BFP``).

    Returns:
        BalancedFPN: a detectron2 :class:`Backbone`.
    """
    return _build_resnet_bfp(cfg, input_shape, lambda bottom_up: LastLevelMaxPool())


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """:class:`LastLevelP6P7` with ``P7 = conv(P6)``, no ReLU in between (mmdetection's FPN)."""

    def forward(self, c5):
        p6 = self.p6(c5)
        return [p6, self.p7(p6)]


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_bfp_backbone(cfg, input_shape: ShapeSpec):
    """
    The backbone of ``build_retinanet_resnet_fpn_backbone`` (ResNet + FPN p3-p7) followed by the
    Balanced Feature Pyramid over p3-p7 (official Libra RetinaNet: refine level 1 = p4). P7 is
    computed from ``relu(P6)`` or, with ``MODEL.FPN.P7_RELU: False``, from ``P6``.

    Returns:
        BalancedFPN: a detectron2 :class:`Backbone`.
    """
    top_block = LastLevelP6P7 if cfg.MODEL.FPN.P7_RELU else LastLevelP6P7NoReLU
    return _build_resnet_bfp(
        cfg,
        input_shape,
        lambda bottom_up: top_block(
            bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS
        ),
    )
