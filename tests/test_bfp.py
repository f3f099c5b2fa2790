"""Balanced Feature Pyramid against independent (hand-written) references."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from libra_d2.modeling.bfp import BalancedFeaturePyramid, NonLocal2d

ODD_SIZES = [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)]


# ----------------------------------------------------------------- independent numpy references
def np_adaptive_max(x, out_hw):
    """Adaptive max pooling, bins [floor(i*in/out), ceil((i+1)*in/out)), x: (N, C, H, W)."""
    (h, w), (oh, ow) = x.shape[-2:], out_hw
    out = np.empty(x.shape[:2] + (oh, ow), dtype=x.dtype)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].max(axis=(2, 3))
    return out


def np_nearest(x, out_hw):
    """Legacy "nearest": src = min(floor(dst * (in / out)), in - 1), scale in float32."""

    def idx(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, n_in - 1)

    (h, w), (oh, ow) = x.shape[-2:], out_hw
    return x[:, :, idx(h, oh)][:, :, :, idx(w, ow)]


def np_bfp_identity_refine(xs, refine_level):
    """Expected BFP output when the refine step is the identity."""
    hw = xs[refine_level].shape[-2:]
    gathered = []
    for i, x in enumerate(xs):
        gathered.append(np_adaptive_max(x, hw) if i < refine_level else np_nearest(x, hw))
    bsf = sum(gathered) / len(xs)
    outs = []
    for i, x in enumerate(xs):
        hw_i = x.shape[-2:]
        outs.append(x + (np_nearest(bsf, hw_i) if i < refine_level else np_adaptive_max(bsf, hw_i)))
    return outs


def ref_non_local(block, x):
    """softmax(theta^T phi) g written out in float64 on the CPU: (N, C, H, W) -> (N, C, H, W)."""
    x = x.detach().double().cpu()
    n, c, h, w = x.shape

    def conv1x1(conv, t):
        wgt = conv.weight.detach().double().cpu()[:, :, 0, 0]
        bias = conv.bias.detach().double().cpu()
        return torch.einsum("oc,nchw->nohw", wgt, t) + bias[None, :, None, None]

    theta = conv1x1(block.theta, x).reshape(n, c, h * w)  # (N, C, HW)
    phi = conv1x1(block.phi, x).reshape(n, c, h * w)
    g = conv1x1(block.g, x).reshape(n, c, h * w)
    logits = torch.einsum("nci,ncj->nij", theta, phi)  # (N, HW, HW), no 1/sqrt(C)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    attn = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    y = torch.einsum("nij,ncj->nci", attn, g).reshape(n, c, h, w)
    return x + conv1x1(block.conv_out, y)


def ref_bfp_non_local(bfp, xs):
    """Whole BFP with a non-local refine: numpy gather/scatter and the float64 block."""
    xs64 = [x.detach().double().cpu().numpy() for x in xs]
    lvl = bfp.refine_level
    hw = xs64[lvl].shape[-2:]
    gathered = [
        np_adaptive_max(x, hw) if i < lvl else np_nearest(x, hw) for i, x in enumerate(xs64)
    ]
    bsf = ref_non_local(bfp.refine, torch.from_numpy(sum(gathered) / len(xs))).numpy()
    return [
        x + (np_nearest(bsf, x.shape[-2:]) if i < lvl else np_adaptive_max(bsf, x.shape[-2:]))
        for i, x in enumerate(xs64)
    ]


def make_inputs(sizes, c=4, n=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, h, w, generator=gen, dtype=dtype) for h, w in sizes]


def perturb_conv_out(module, std=0.2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, NonLocal2d):
            with torch.no_grad():
                m.conv_out.weight.copy_(torch.randn(m.conv_out.weight.shape, generator=gen) * std)
                m.conv_out.bias.copy_(torch.randn(m.conv_out.bias.shape, generator=gen) * std)


# ------------------------------------------------------------------------------------- tests
def test_hand_made_three_levels():
    """8x8, 4x4, 2x2, C=2, refine_level=1: max-pool 2x2 blocks and nearest x2 written by hand."""
    torch.manual_seed(0)
    x0, x1, x2 = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)

    def pool2(t):  # max over non-overlapping 2x2 blocks
        n, c, h, w = t.shape
        return t.reshape(n, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))

    def up2(t):  # nearest x2
        return t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    bsf = (pool2(x0) + x1 + up2(x2)) / 3
    expected = [x0 + up2(bsf), x1 + bsf, x2 + pool2(bsf)]
    for refine_type in ("non_local", "none"):
        bfp = BalancedFeaturePyramid(2, 3, refine_level=1, refine_type=refine_type)
        outs = bfp([x0, x1, x2])
        assert isinstance(outs, list) and len(outs) == 3
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("refine_level", [0, 2, 4])
def test_five_odd_levels_fresh_module(refine_level):
    xs = make_inputs(ODD_SIZES, c=3, n=2)
    expected = np_bfp_identity_refine([x.numpy().astype(np.float64) for x in xs], refine_level)
    for refine_type in ("non_local", "none"):
        bfp = BalancedFeaturePyramid(3, 5, refine_level=refine_level, refine_type=refine_type)
        outs = bfp(tuple(xs))
        for got, want in zip(outs, expected):
            np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_fresh_non_local_is_identity_and_mmcv_init():
    block = NonLocal2d(8)
    assert torch.count_nonzero(block.conv_out.weight) == 0
    assert torch.count_nonzero(block.conv_out.bias) == 0
    for m in (block.g, block.theta, block.phi):
        assert m.weight.shape == (8, 8, 1, 1)
        assert torch.count_nonzero(m.bias) == 0
        assert 0.002 < m.weight.std().item() < 0.02
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (3, 1)])
def test_non_local_against_float64_reference(hw):
    torch.manual_seed(0)
    block = NonLocal2d(6)
    # make the attention non-trivial (peaky) and the output projection non-zero
    for m in (block.g, block.theta, block.phi, block.conv_out):
        nn.init.normal_(m.weight, std=0.5)
        nn.init.normal_(m.bias, std=0.5)
    x = torch.randn(2, 6, *hw)
    ref = ref_non_local(block, x)
    torch.testing.assert_close(block(x).double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.double()(x.double()), ref, rtol=1e-10, atol=1e-10)


def test_bfp_with_refined_non_local_against_reference():
    """Whole BFP with a non-zero non-local block, against numpy gather/scatter + float64 block."""
    xs = make_inputs(ODD_SIZES, c=4, n=1, seed=3)
    bfp = BalancedFeaturePyramid(4, 5, refine_level=2)
    perturb_conv_out(bfp)
    for got, want in zip(bfp(xs), ref_bfp_non_local(bfp, xs)):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_conv_refine_against_reference():
    xs = make_inputs(ODD_SIZES, c=3, n=1, seed=5)
    bfp = BalancedFeaturePyramid(3, 5, refine_level=1, refine_type="conv")
    conv = bfp.refine[0]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert torch.count_nonzero(conv.bias) == 0
    xs64 = [x.numpy().astype(np.float64) for x in xs]
    hw = xs64[1].shape[-2:]
    gathered = [np_adaptive_max(x, hw) if i < 1 else np_nearest(x, hw) for i, x in enumerate(xs64)]
    bsf = sum(gathered) / 5
    # 3x3 "same" convolution + ReLU by explicit shifts
    wgt = conv.weight.detach().double().numpy()
    pad = np.pad(bsf, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = hw
    refined = np.zeros_like(bsf) + conv.bias.detach().double().numpy()[None, :, None, None]
    for dy in range(3):
        for dx in range(3):
            refined += np.einsum(
                "oc,nchw->nohw", wgt[:, :, dy, dx], pad[:, :, dy : dy + h, dx : dx + w]
            )
    refined = np.maximum(refined, 0)
    outs = bfp(xs)
    for i, (got, x) in enumerate(zip(outs, xs64)):
        hw_i = x.shape[-2:]
        want = x + (np_nearest(refined, hw_i) if i < 1 else np_adaptive_max(refined, hw_i))
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("refine_type", ["non_local", "conv", "none"])
def test_shapes_odd_sizes(refine_type):
    xs = make_inputs(ODD_SIZES, c=8, n=2)
    outs = BalancedFeaturePyramid(8, 5, refine_level=2, refine_type=refine_type)(xs)
    assert [o.shape for o in outs] == [x.shape for x in xs]
    assert all(torch.isfinite(o).all() for o in outs)


def test_single_level():
    x = torch.randn(1, 4, 5, 6)
    bfp = BalancedFeaturePyramid(4, 1, refine_level=0, refine_type="none")
    torch.testing.assert_close(bfp([x])[0], 2 * x)


@pytest.mark.parametrize("refine_type", ["non_local", "conv"])
def test_gradients_reach_every_level_and_parameter(refine_type):
    xs = [x.requires_grad_() for x in make_inputs(ODD_SIZES, c=4, n=2)]
    bfp = BalancedFeaturePyramid(4, 5, refine_level=2, refine_type=refine_type)
    perturb_conv_out(bfp)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(x.shape, generator=gen) for x in xs]
    loss = sum((o * w).sum() for o, w in zip(bfp(xs), weights))
    loss.backward()
    for x, w in zip(xs, weights):
        assert x.grad is not None and torch.isfinite(x.grad).all()
        # more than the residual's identity path: the balanced semantic path contributes too
        assert not torch.allclose(x.grad, w)
    params = list(bfp.named_parameters())
    assert len(params) == (8 if refine_type == "non_local" else 2)
    for name, p in params:
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_gradcheck_float64():
    xs = [
        x.requires_grad_()
        for x in make_inputs([(6, 5), (3, 3), (2, 1)], c=2, n=1, dtype=torch.float64)
    ]
    bfp = BalancedFeaturePyramid(2, 3, refine_level=1).double()
    perturb_conv_out(bfp, std=0.5)
    for m in (bfp.refine.theta, bfp.refine.phi, bfp.refine.g):
        nn.init.normal_(m.weight, std=0.5)
    assert torch.autograd.gradcheck(lambda *t: tuple(bfp(list(t))), tuple(xs))


def test_none_has_no_parameters():
    assert len(list(BalancedFeaturePyramid(256, 5, refine_type="none").parameters())) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_channels=0, num_levels=5), "in_channels"),
        (dict(in_channels=4, num_levels=0), "num_levels"),
        (dict(in_channels=4, num_levels=5, refine_level=5), "refine_level"),
        (dict(in_channels=4, num_levels=5, refine_level=-1), "refine_level"),
        (dict(in_channels=4, num_levels=5, refine_level=1.5), "refine_level"),
        (dict(in_channels=4, num_levels=5, refine_type="gc"), "refine_type"),
        (dict(in_channels=4, num_levels=5, refine_type=None), "refine_type"),
    ],
)
def test_invalid_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedFeaturePyramid(**kwargs)


def test_bf16_autocast_cpu_against_reference():
    torch.manual_seed(0)
    xs = make_inputs(ODD_SIZES, c=16, n=1)
    bfp = BalancedFeaturePyramid(16, 5, refine_level=2)
    perturb_conv_out(bfp, std=0.1)
    for m in (bfp.refine.theta, bfp.refine.phi):  # large unscaled logits: peaky attention
        nn.init.normal_(m.weight, std=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = bfp(xs)
    for got, want in zip(outs, ref_bfp_non_local(bfp, xs)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.detach().float().numpy(), want, rtol=5e-2, atol=5e-2)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_local_runs_on_a_fused_sdpa_kernel(device, dtype):
    """Forward and backward with SDPA's math path disabled: a fallback to it raises."""
    bfp = BalancedFeaturePyramid(16, 5, refine_level=2)
    perturb_conv_out(bfp, std=0.1)
    bfp.to(device, dtype)
    xs = [x.to(device, dtype).requires_grad_() for x in make_inputs(ODD_SIZES, c=16, n=2)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        outs = bfp(xs)
        sum(o.float().sum() for o in outs).backward()
    tol = TOLERANCE[dtype]
    for got, want in zip(outs, ref_bfp_non_local(bfp, xs)):
        np.testing.assert_allclose(got.detach().double().cpu().numpy(), want, rtol=tol, atol=tol)
    for x in xs:
        assert torch.isfinite(x.grad).all()
    for name, p in bfp.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_logits_beyond_the_fp16_range(device):
    """Unscaled theta^T phi logits above 65504 (fp16's max) still give the softmax."""
    torch.manual_seed(0)
    block = NonLocal2d(32)
    for m in (block.theta, block.phi):
        nn.init.normal_(m.weight, std=2.0)
    block = block.to(device, torch.float16)
    x = (torch.randn(1, 32, 6, 7) * 8).to(device, torch.float16).requires_grad_()
    ref = ref_non_local(block, x.detach().cpu())  # float64

    def conv(m):
        return torch.einsum("oc,nchw->nohw", m.weight.double().cpu()[:, :, 0, 0], x.double().cpu())

    logits = torch.einsum("nci,ncj->nij", conv(block.theta).flatten(2), conv(block.phi).flatten(2))
    assert logits.abs().max() > 65504
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        y = block(x)
        y.float().sum().backward()
    torch.testing.assert_close(y.detach().double().cpu(), ref, rtol=1e-2, atol=1e-2)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("in_hw, out_hw", [((16, 24), (4, 6)), ((13, 21), (7, 11))])
def test_gather_max_pool_matches_adaptive_max_pool_and_frees_its_input(in_hw, out_hw):
    """The finer levels' gather: F.adaptive_max_pool2d's values and gradient (exact and
    overlapping windows), and the backward keeps only indices, not the pyramid level."""
    from libra_d2.modeling.bfp import max_pool_to

    torch.manual_seed(0)
    x = torch.randn(2, 3, *in_hw, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *out_hw, dtype=torch.float64)
    expected = nn.functional.adaptive_max_pool2d(x, out_hw)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = max_pool_to(x, out_hw)
    (got_grad,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=0)
    assert [t.dtype for t in saved] == [torch.int64]  # the indices only
    assert torch.autograd.gradcheck(lambda t: max_pool_to(t, out_hw), (x,))
