"""Balanced L1 loss against closed forms computed independently with `math`."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from libra_d2 import add_libra_config
from libra_d2.modeling import BalancedL1FastRCNNOutputLayers, LibraRetinaNet
from libra_d2.modeling.balanced_l1 import balanced_l1_loss

OFFICIAL = dict(alpha=0.5, gamma=1.5, beta=1.0)  # the official Faster R-CNN setting


def bl1(input, target, **kwargs):
    """balanced_l1_loss with the official alpha, gamma, beta unless given."""
    return balanced_l1_loss(input, target, **{**OFFICIAL, **kwargs})


def ref_value(d, beta=1.0, alpha=0.5, gamma=1.5):
    """The official formula, evaluated in double precision with `math`."""
    d = abs(d)
    b = math.exp(gamma / alpha) - 1
    if d < beta:
        return alpha / b * (b * d + 1) * math.log(b * d / beta + 1) - alpha * d
    return gamma * d + gamma / b - alpha * beta


def ref_grad(x, beta=1.0, alpha=0.5, gamma=1.5):
    """d loss / d x, derived by hand from the formula."""
    d = abs(x)
    s = math.copysign(1.0, x) if x != 0 else 0.0
    b = math.exp(gamma / alpha) - 1
    if d < beta:
        g = alpha * math.log(b * d / beta + 1) + alpha * (b * d + 1) / (b * d + beta) - alpha
    else:
        g = gamma
    return s * g


def test_hand_picked_values_beta1():
    b = math.exp(3.0) - 1  # alpha 0.5, gamma 1.5
    expected = {
        0.0: 0.0,
        0.5: 0.5 / b * (b * 0.5 + 1) * math.log(b * 0.5 + 1) - 0.25,
        1.0: 1.5 + 1.5 / b - 0.5,
        2.0: 3.0 + 1.5 / b - 0.5,
    }
    # sanity on the constants themselves
    assert b == pytest.approx(19.0855369, rel=1e-7)
    assert expected[1.0] == pytest.approx(1.0785935, rel=1e-6)
    x = torch.tensor(list(expected.keys()))
    out = bl1(x, torch.zeros(4), reduction="none")
    assert out.dtype == torch.float32
    for got, want in zip(out.tolist(), expected.values()):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    # symmetric in the sign of the error, and only depends on input - target
    out_neg = bl1(-x + 3.0, torch.full((4,), 3.0), reduction="none")
    torch.testing.assert_close(out_neg, out)


@pytest.mark.parametrize("beta", [1.0, 0.11, 0.5, 2.0])
@pytest.mark.parametrize("alpha,gamma", [(0.5, 1.5), (0.3, 2.0), (1.0, 1.0)])
def test_values_match_formula(beta, alpha, gamma):
    xs = [-3.0, -beta * 1.01, -beta * 0.5, -1e-3, 0.0, 1e-3, 0.2, beta * 0.99, beta, 5.0]
    out = bl1(
        torch.tensor(xs, dtype=torch.float64),
        torch.zeros(len(xs), dtype=torch.float64),
        beta=beta,
        alpha=alpha,
        gamma=gamma,
        reduction="none",
    )
    want = [ref_value(x, beta, alpha, gamma) for x in xs]
    for got, w in zip(out.tolist(), want):
        assert got == pytest.approx(w, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.11, 0.5])
def test_value_continuous_at_beta(beta):
    eps = 1e-4
    x = torch.tensor([beta - eps, beta, beta + eps], dtype=torch.float64)
    left, mid, right = bl1(x, torch.zeros(3), beta=beta, reduction="none").tolist()
    b = math.exp(3.0) - 1
    at_beta = 1.5 * beta + 1.5 / b - 0.5 * beta
    assert mid == pytest.approx(at_beta, rel=1e-6)
    # jumps of O(eps * slope) only, no step
    assert abs(left - mid) < 3 * eps
    assert abs(right - mid) < 3 * eps


@pytest.mark.parametrize("beta", [1.0, 0.11, 0.5])
@pytest.mark.parametrize("alpha,gamma", [(0.5, 1.5), (0.25, 1.0), (1.0, 2.5)])
def test_autograd_gradient(beta, alpha, gamma):
    xs = [-4.0, -1.5 * beta, -0.7 * beta, -0.1 * beta, 0.05 * beta, 0.3 * beta, 0.9 * beta]
    xs += [1.2 * beta, 10.0]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    bl1(x, torch.zeros(len(xs)), beta=beta, alpha=alpha, gamma=gamma, reduction="sum").backward()
    for g, xi in zip(x.grad.tolist(), xs):
        assert g == pytest.approx(ref_grad(xi, beta, alpha, gamma), rel=1e-5, abs=1e-6)
        if abs(xi) >= beta:
            assert g == pytest.approx(math.copysign(gamma, xi), rel=1e-6)
    if beta == 1.0:
        # the paper's form of the inlier gradient: alpha * ln(b|x| + 1) * sign(x)
        b = math.exp(gamma / alpha) - 1
        for g, xi in zip(x.grad.tolist(), xs):
            if abs(xi) < 1.0:
                want = alpha * math.log(b * abs(xi) + 1) * math.copysign(1.0, xi)
                assert g == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_gradient_continuous_at_beta1_but_not_at_beta_011():
    def grad_at(x, beta):
        # computed in float32, so stay a few ulps away from beta
        t = torch.tensor([x], requires_grad=True)
        bl1(t, torch.zeros(1), beta=beta).backward()
        return t.grad.item()

    # beta = 1: left limit alpha * ln(b + 1) = gamma
    assert grad_at(1.0 - 1e-5, 1.0) == pytest.approx(1.5, abs=1e-4)
    assert grad_at(1.0 + 1e-5, 1.0) == pytest.approx(1.5, abs=1e-12)
    # beta = 0.11: ~1.70 on the left, 1.50 on the right (documented jump)
    b = math.exp(3.0) - 1
    left = 1.5 + 0.5 * ((b * 0.11 + 1) / (0.11 * (b + 1)) - 1)
    assert left == pytest.approx(1.70, abs=5e-3)
    assert grad_at(0.11 - 1e-6, 0.11) == pytest.approx(left, rel=1e-4)
    assert grad_at(0.11 + 1e-6, 0.11) == pytest.approx(1.5, abs=1e-12)


def test_reductions():
    torch.manual_seed(0)
    x, t = torch.randn(7, 4) * 2, torch.randn(7, 4)
    none = bl1(x, t, reduction="none")
    assert none.shape == (7, 4)
    assert (none >= 0).all()
    torch.testing.assert_close(bl1(x, t, reduction="sum"), none.sum())
    torch.testing.assert_close(bl1(x, t), none.sum())  # default is "sum"
    torch.testing.assert_close(bl1(x, t, reduction="mean"), none.sum() / 28)
    assert bl1(x, t, reduction="mean").dim() == 0


def test_empty_inputs():
    x = torch.zeros(0, 4, requires_grad=True)
    t = torch.zeros(0, 4)
    for red in ("sum", "mean"):
        out = bl1(x, t, reduction=red)
        assert out.item() == 0.0 and not torch.isnan(out)
        out.backward()  # still part of the graph
        assert x.grad.shape == (0, 4)
    assert bl1(x, t, reduction="none").shape == (0, 4)


def test_huge_errors_have_finite_gradient():
    x = torch.tensor([3e38, -3e38, 1e30], requires_grad=True)
    out = bl1(x, torch.zeros(3), reduction="sum")
    out.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.tensor([1.5, -1.5, 1.5]))


def test_invalid_reduction():
    with pytest.raises(ValueError, match="reduction"):
        bl1(torch.zeros(3), torch.zeros(3), reduction="avg")


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["ALPHA", "GAMMA", "BETA"])
@pytest.mark.parametrize(
    "node, module",
    [
        ("MODEL.ROI_BOX_HEAD.BALANCED_L1", "predictor"),
        ("MODEL.RETINANET.BALANCED_L1", "retinanet"),
    ],
)
def test_config_values_are_validated_where_the_module_is_built(node, module, name, value):
    """The scalars are checked once, by from_config, with the full key in the message."""
    cfg = add_libra_config(get_cfg())
    cfg.merge_from_list([f"{node}.{name}", value])
    key = f"{node}.{name}".replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"^{key} = {value!r} .*finite number > 0"):
        if module == "predictor":
            BalancedL1FastRCNNOutputLayers.from_config(cfg, ShapeSpec(channels=8))
        else:
            LibraRetinaNet.from_config(cfg)


def test_bfloat16_input():
    torch.manual_seed(0)
    x, t = torch.randn(64, 4) * 2, torch.randn(64, 4)
    ref = bl1(x, t, reduction="none")
    xb = x.bfloat16().requires_grad_()
    out = bl1(xb, t.bfloat16(), reduction="none")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # only the rounding of the inputs to bf16 differs (|d| error <= ~2 * 2^-8 * |x|, slope <= 1.7)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=5e-2)
    out.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2 = bl1(xb, t.bfloat16(), reduction="sum")
    assert out2.dtype == torch.float32 and torch.isfinite(out2)
