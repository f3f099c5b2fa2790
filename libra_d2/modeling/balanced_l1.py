"""Balanced L1 loss (Libra R-CNN, Pang et al., CVPR 2019, arXiv 1904.02701, Eq. 7-9)."""

import math

import torch
from detectron2.config import configurable
from detectron2.layers import nonzero_tuple
from detectron2.modeling.roi_heads import FastRCNNOutputLayers

from ..config import check_positive

__all__ = ["balanced_l1_loss", "BalancedL1FastRCNNOutputLayers"]


def balanced_l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    gamma: float,
    beta: float,
    reduction: str = "sum",
) -> torch.Tensor:
    """
    Balanced L1 loss, in the form of the official code (Libra R-CNN / mmdetection).

    With ``d = |input - target|`` and ``b = exp(gamma / alpha) - 1`` (so that
    ``alpha * ln(b + 1) = gamma``)::

        loss(d) = alpha / b * (b*d + 1) * ln(b*d/beta + 1) - alpha * d    if d < beta
                  gamma * d + gamma / b - alpha * beta                      otherwise

    Gradient w.r.t. ``input`` (times ``sign(input - target)``)::

        d < beta:  alpha * ln(b*d/beta + 1) + alpha * (b*d + 1) / (b*d + beta) - alpha
        d >= beta: gamma

    For ``beta == 1`` the first line reduces to the paper's ``alpha * ln(b*d + 1)``, which tends
    to ``gamma`` at ``d = 1``: value and gradient are both continuous there. For ``beta != 1``
    the value is still continuous at ``d = beta`` but the gradient is not: its left limit is
    ``gamma + alpha * ((b*beta + 1) / (beta * (b + 1)) - 1)`` (about 1.70 for beta = 0.11 vs
    1.50 on the right, with alpha 0.5 and gamma 1.5), and its limit at ``d -> 0+`` is
    ``alpha * (1/beta - 1)`` rather than 0. This is the official behaviour (Libra RetinaNet uses
    beta = 0.11).

    The loss is computed in float32 whatever the input dtype (safe under autocast).

    Args:
        input (Tensor): predictions, any shape ``(*)``, e.g. ``(R, 4)`` box deltas.
        target (Tensor): regression targets, same shape as ``input``.
        alpha (float): > 0; smaller alpha promotes the gradient of inliers.
        gamma (float): > 0; the gradient magnitude of outliers (upper bound of the error).
        beta (float): > 0; transition point between the log and the linear region.
        reduction (str): "none" | "sum" | "mean".

    Returns:
        Tensor: float32; shape ``(*)`` for "none", a scalar otherwise. For empty inputs, "sum"
        and "mean" both return 0 (connected to the autograd graph; "mean" does not give NaN).
    """
    diff = torch.abs(input.float() - target.float())
    b = math.exp(gamma / alpha) - 1.0
    # Evaluate the log branch on min(d, beta): it is only selected for d < beta, and clamping
    # keeps huge d (where b*d could overflow) from producing inf * 0 = NaN in the backward pass.
    d_in = torch.clamp(diff, max=beta)
    inlier = alpha / b * (b * d_in + 1.0) * torch.log(b * d_in / beta + 1.0) - alpha * d_in
    outlier = gamma * diff + (gamma / b - alpha * beta)
    loss = torch.where(diff < beta, inlier, outlier)

    if reduction == "none":
        return loss
    if reduction == "sum" or (reduction == "mean" and loss.numel() == 0):
        return loss.sum()  # 0 for empty inputs, still part of the graph
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def balanced_l1_params(node, key):
    """
    The ``alpha``, ``gamma``, ``beta`` keyword arguments of :func:`balanced_l1_loss` from the
    ``BALANCED_L1`` config node at ``key`` (e.g. "MODEL.ROI_BOX_HEAD.BALANCED_L1"), validated.
    """
    for name in ("ALPHA", "GAMMA", "BETA"):
        check_positive(f"{key}.{name}", node[name])
    return {"alpha": node.ALPHA, "gamma": node.GAMMA, "beta": node.BETA}


class BalancedL1FastRCNNOutputLayers(FastRCNNOutputLayers):
    """
    detectron2's :class:`FastRCNNOutputLayers` that also takes ``box_reg_loss_type ==
    "balanced_l1"`` (``MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE``): the box regression loss is then
    :func:`balanced_l1_loss`, summed over the foreground ROIs' deltas and normalised by the
    number of sampled ROIs, as detectron2 does for smooth L1 (and the official code: loss weight
    1, averaged over all sampled ROIs). Any other loss type is detectron2's.
    """

    @configurable
    def __init__(self, *, balanced_l1_params, **kwargs):
        """
        Args:
            balanced_l1_params (dict): ``alpha``, ``gamma``, ``beta`` of :func:`balanced_l1_loss`.
            kwargs: arguments of :class:`FastRCNNOutputLayers`.
        """
        super().__init__(**kwargs)
        self.balanced_l1_params = dict(balanced_l1_params)

    @classmethod
    def from_config(cls, cfg, input_shape):
        params = balanced_l1_params(
            cfg.MODEL.ROI_BOX_HEAD.BALANCED_L1, "MODEL.ROI_BOX_HEAD.BALANCED_L1"
        )
        return {**super().from_config(cfg, input_shape), "balanced_l1_params": params}

    def box_reg_loss(self, proposal_boxes, gt_boxes, pred_deltas, gt_classes):
        """
        Args:
            proposal_boxes, gt_boxes (Tensor): ``(R, 4)`` boxes of the R sampled ROIs and of their
                matched ground truth.
            pred_deltas (Tensor): ``(R, 4)`` class-agnostic or ``(R, num_classes * 4)`` deltas.
            gt_classes (Tensor): int64 ``(R,)`` labels, ``num_classes`` for background.

        Returns:
            Tensor: scalar loss.
        """
        if self.box_reg_loss_type != "balanced_l1":
            return super().box_reg_loss(proposal_boxes, gt_boxes, pred_deltas, gt_classes)
        box_dim = proposal_boxes.shape[1]
        fg_inds = nonzero_tuple((gt_classes >= 0) & (gt_classes < self.num_classes))[0]
        if pred_deltas.shape[1] == box_dim:  # class-agnostic regression
            fg_pred_deltas = pred_deltas[fg_inds]
        else:
            fg_pred_deltas = pred_deltas.view(-1, self.num_classes, box_dim)[
                fg_inds, gt_classes[fg_inds]
            ]
        gt_deltas = self.box2box_transform.get_deltas(proposal_boxes[fg_inds], gt_boxes[fg_inds])
        loss = balanced_l1_loss(
            fg_pred_deltas, gt_deltas, reduction="sum", **self.balanced_l1_params
        )
        return loss / max(gt_classes.numel(), 1.0)
