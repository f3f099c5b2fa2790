"""
IoU-balanced / instance-balanced sampling against closed-form expectations.

Every expected count below is worked out by hand from the official rules (see the comments),
never by running the sampler on a second code path.
"""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling.sampling import subsample_labels

from libra_d2 import add_libra_config
from libra_d2.modeling import IoUBalancedROIHeads
from libra_d2.modeling.sampling import iou_balanced_subsample

BG = 80  # background label (num_classes)
OFFICIAL = dict(num_bins=3, floor_thr=-1.0, floor_fraction=0.0, instance_balanced_pos=True)


def _sample(*args, **kwargs):
    """iou_balanced_subsample with the official settings, unless overridden."""
    return iou_balanced_subsample(*args, **{**OFFICIAL, **kwargs})


def _inputs(neg_ious, pos_ious=(), pos_gt=None, num_ignored=0):
    """
    Labels / max IoUs / matched indices for a made-up image: negatives first, then positives,
    then ignored proposals. Positives get class 1 and ground truth ``pos_gt`` (default 0).
    """
    neg_ious = torch.as_tensor(neg_ious, dtype=torch.float32).reshape(-1)
    pos_ious = torch.as_tensor(pos_ious, dtype=torch.float32).reshape(-1)
    n_neg, n_pos = neg_ious.numel(), pos_ious.numel()
    labels = torch.cat(
        [
            torch.full((n_neg,), BG),
            torch.ones(n_pos, dtype=torch.int64),
            torch.full((num_ignored,), -1),
        ]
    )
    ious = torch.cat([neg_ious, pos_ious, torch.full((num_ignored,), 0.45)])
    if pos_gt is None:
        pos_gt = torch.zeros(n_pos, dtype=torch.int64)
    matched = torch.cat(
        [
            torch.zeros(n_neg, dtype=torch.int64),
            torch.as_tensor(pos_gt, dtype=torch.int64).reshape(-1),
            torch.zeros(num_ignored, dtype=torch.int64),
        ]
    )
    return labels, ious, matched


def _bin_counts(ious, idx, edges):
    """Number of sampled indices with IoU in each [edges[i], edges[i + 1])."""
    v = ious[idx]
    return [int(((v >= lo) & (v < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]


def _check_contract(labels, pos, neg, num_samples, positive_fraction):
    """subsample_labels' contract: exact counts, no duplicates, right kinds, int64 1-D."""
    is_pos = (labels != -1) & (labels != BG)
    is_neg = labels == BG
    exp_pos = min(int(num_samples * positive_fraction), int(is_pos.sum()))
    exp_neg = min(num_samples - exp_pos, int(is_neg.sum()))
    for idx in (pos, neg):
        assert idx.dtype == torch.int64 and idx.dim() == 1 and idx.device == labels.device
    assert pos.numel() == exp_pos
    assert neg.numel() == exp_neg
    assert torch.unique(pos).numel() == pos.numel()
    assert torch.unique(neg).numel() == neg.numel()
    assert bool(is_pos[pos].all()) and bool(is_neg[neg].all())


# ------------------------------------------------------------------------------------------------
# Negatives: IoU balancing
# ------------------------------------------------------------------------------------------------
def test_balanced_bins_vs_random_sampling():
    # 6000 negatives: 90% (5400) below 0.05, 600 evenly spread over [0.05, 0.5) (0.00075 apart,
    # none within 2e-4 of 1/3); 10 ground-truth boxes appended as positives with IoU 1.0.
    low = torch.linspace(0.0, 0.049, 5400)
    mid = 0.05 + 0.45 * (torch.arange(600, dtype=torch.float32) + 0.5) / 600
    labels, ious, matched = _inputs(torch.cat([low, mid]), torch.ones(10), torch.arange(10))
    edges = [0.0, 1 / 3, 2 / 3, 1.0 + 1e-6]
    n_bin1 = int((mid >= 1 / 3).sum())
    assert n_bin1 == 222  # (0.5 - 1/3) / 0.00075 = 222.2 spread values in [1/3, 0.5)

    # num_pos = min(int(512 * 0.25), 10) = 10, quota = 512 - 10 = 502 negatives.
    # Max IoU 1.0 -> bins [0, 1/3), [1/3, 2/3), [2/3, 1); cap int(502 / 3) = 167 per bin.
    # bin 1 has 222 >= 167 -> 167; bin 2 has none -> 0; bin 0 gives 167 + the shortfall
    # 502 - 167 - 167 - 0 = 168, filled from the leftovers of bins 0 and 1 (uniformly).
    # So bin 2 == 0, bin 1 in [167, 167 + 55], bin 0 = 502 - bin 1, bin 0 >= 167.
    low_share_ours, low_share_random = [], []
    for seed in range(20):
        torch.manual_seed(seed)
        pos, neg = _sample(labels, ious, matched, 512, 0.25, BG)
        _check_contract(labels, pos, neg, 512, 0.25)
        b0, b1, b2 = _bin_counts(ious, neg, edges)
        assert b2 == 0 and 167 <= b1 <= 222 and b0 == 502 - b1 and b0 >= 167
        low_share_ours.append(float((ious[neg] < 0.05).float().mean()))
        _, rneg = subsample_labels(labels, 512, 0.25, BG)
        low_share_random.append(float((ious[rneg] < 0.05).float().mean()))
    ours = sum(low_share_ours) / 20
    rand = sum(low_share_random) / 20
    # Random keeps the population's 90%; ours: at most 335 of 502 from bin 0, of which about
    # 5400 / 5778 are below 0.05 -> about 62%.
    assert rand > 0.85 and ours < 0.66
    assert abs(ours - (502 - 167 - 168 * 55 / (5778 - 167 + 55)) / 502 * 5400 / 5778) < 0.05


def test_each_bin_gets_its_cap_when_all_bins_are_plentiful():
    # Negatives in all three bins (allowed for the function, whatever the matcher does):
    # 1000 at 0.1, 300 at 0.5, 300 at 0.8, max 1.0 from the appended GT.
    labels, ious, matched = _inputs(
        torch.cat([torch.full((1000,), 0.1), torch.full((300,), 0.5), torch.full((300,), 0.8)]),
        [1.0],
    )
    # num_pos 1, quota 385 - 1 = 384, cap int(384 / 3) = 128 in each bin, no shortfall.
    for seed in range(5):
        torch.manual_seed(seed)
        pos, neg = _sample(labels, ious, matched, 385, 0.25, BG)
        _check_contract(labels, pos, neg, 385, 0.25)
        assert _bin_counts(ious, neg, [0, 1 / 3, 2 / 3, 1.01]) == [128, 128, 128]


def test_shortfall_is_filled_uniformly_from_the_leftovers():
    # bin 0: 1000 at 0.1, bin 1: 300 at 0.5, bin 2: 50 at 0.8; quota 384, cap 128.
    # Primary: 128 + 128 + 50; shortfall 78 drawn uniformly from the 872 + 172 leftovers, so the
    # fill from bin 1 is hypergeometric with mean 78 * 172 / 1044 = 12.85 and sd ~3.2: over 300
    # seeds the mean is 12.85 +- 0.19. (Filling in the shuffle order instead would take almost
    # everything from the big bin: that is the bias this test guards against.)
    labels, ious, matched = _inputs(
        torch.cat([torch.full((1000,), 0.1), torch.full((300,), 0.5), torch.full((50,), 0.8)]),
        [1.0],
    )
    fills = []
    for seed in range(300):
        torch.manual_seed(seed)
        _, neg = _sample(labels, ious, matched, 385, 0.25, BG)
        b0, b1, b2 = _bin_counts(ious, neg, [0, 1 / 3, 2 / 3, 1.01])
        assert b2 == 50 and b0 >= 128 and b1 >= 128 and b0 + b1 == 334
        fills.append(b1 - 128)
    assert abs(sum(fills) / len(fills) - 78 * 172 / 1044) < 1.0


def test_shortfall_split_over_three_bins_is_hypergeometric():
    # floor_fraction 0.5 without a floor set: the balanced part is int(384 * 0.5) = 192, cap 64
    # per bin; bins hold 1000 / 300 / 200 -> 64 each, and the other 192 are a uniform fill from
    # the 936 + 236 + 136 = 1308 leftovers: mean fill per bin 192 * l / 1308 (bin 1: 34.64,
    # bin 2: 19.96), sd ~4.9 / ~3.8 per call, so the mean over 200 seeds is within ~0.35.
    labels, ious, matched = _inputs(
        torch.cat([torch.full((1000,), 0.1), torch.full((300,), 0.5), torch.full((200,), 0.8)]),
        [1.0],
    )
    fills = torch.zeros(3)
    for seed in range(200):
        torch.manual_seed(seed)
        _, neg = _sample(labels, ious, matched, 385, 0.25, BG, floor_fraction=0.5)
        counts = torch.tensor(_bin_counts(ious, neg, [0, 1 / 3, 2 / 3, 1.01]))
        assert int(counts.sum()) == 384 and bool((counts >= 64).all())
        fills += counts - 64
    expected = 192 * torch.tensor([936, 236, 136]) / 1308
    assert torch.allclose(fills / 200, expected, atol=1.5)


def test_members_of_a_capped_bin_are_equally_likely():
    # bin 0: 1000 at IoU 0.1, bin 2: 128 at 0.8, max 1.0; quota 384, cap 128. Bin 2 is taken
    # whole (exactly its cap), bin 0 gives 128 + the shortfall 128 = 256, so each bin-0 member
    # is picked with probability 256 / 1000.
    labels, ious, matched = _inputs(
        torch.cat([torch.full((1000,), 0.1), torch.full((128,), 0.8)]), [1.0]
    )
    hits = torch.zeros(1000)
    for seed in range(200):
        torch.manual_seed(seed)
        _, neg = _sample(labels, ious, matched, 385, 0.25, BG)
        hits[neg[neg < 1000]] += 1
        assert int((neg >= 1000).sum()) == 128
    p = hits / 200
    assert abs(float(p.mean()) - 0.256) < 1e-6  # exactly 256 per call
    # No positional bias: the first and the second half are picked alike (sd of a half's mean
    # is ~0.002).
    assert abs(float(p[:500].mean() - p[500:].mean())) < 0.015


def test_fill_is_uniform_when_the_bins_take_nothing_first():
    # num_pos 1, quota 4, floor_fraction 0.5 without a floor set: the balanced part is 2, so
    # per bin int(2 / 3) = 0 and both come from the fill, like the other 2: each of the 100
    # negatives is picked with probability 4 / 100 (12 of 300 draws, sd ~3.4), whatever its index.
    labels, ious, matched = _inputs(torch.full((100,), 0.1), [1.0])
    hits = torch.zeros(100)
    for seed in range(300):
        torch.manual_seed(seed)
        _, neg = _sample(labels, ious, matched, 5, 0.2, BG, floor_fraction=0.5)
        assert neg.numel() == 4
        hits[neg] += 1
    assert int(hits.max()) < 30


def test_negative_at_the_top_of_the_range_is_in_the_last_bin():
    # No GT appended: max IoU 0.45 is a negative. Bins: [0, .15), [.15, .3), [.3, .45].
    # 500 at 0.01, 500 at 0.2 and one at 0.45, quota 300, cap 100: the top one is alone in the
    # last bin, so it is always sampled (official half-open bins would leave it to the fill).
    labels, ious, matched = _inputs(
        torch.cat([torch.full((500,), 0.01), torch.full((500,), 0.2), torch.tensor([0.45])])
    )
    for seed in range(30):
        torch.manual_seed(seed)
        pos, neg = _sample(labels, ious, matched, 300, 0.25, BG)
        assert pos.numel() == 0 and neg.numel() == 300
        assert 1000 in neg.tolist()
        b0, b1 = _bin_counts(ious, neg, [0, 0.15, 0.3])
        assert b0 >= 100 and b1 >= 100 and b0 + b1 == 299


def test_iou_on_a_bin_edge_belongs_to_the_upper_bin():
    # Max IoU 0.75 (a positive) -> edges 0.25 and 0.5, exact in float32. Bins are half-open like
    # the official [start, end): the negatives at exactly 0.25 and 0.5 are alone in bins 1 and 2
    # and always sampled; in bin 0 each would be picked with probability 148 / 300.
    labels, ious, matched = _inputs(
        torch.cat([torch.zeros(300), torch.tensor([0.25, 0.5])]), [0.75]
    )
    for seed in range(20):
        torch.manual_seed(seed)
        _, neg = _sample(labels, ious, matched, 151, 0.25, BG)
        assert neg.numel() == 150 and {300, 301} <= set(neg.tolist())


@pytest.mark.parametrize("value", [0.0, 0.3])
def test_all_negatives_with_the_same_iou(value):
    # Image without GT (all IoU 0, empty range) or all at one IoU (everything at the top): one
    # bin, plain uniform sampling; no division by zero.
    labels, ious, matched = _inputs(torch.full((700,), value))
    torch.manual_seed(0)
    pos, neg = _sample(labels, ious, matched, 512, 0.25, BG)
    _check_contract(labels, pos, neg, 512, 0.25)
    assert neg.numel() == 512


# ------------------------------------------------------------------------------------------------
# Negatives: floor set
# ------------------------------------------------------------------------------------------------
def _floor_inputs(n_floor, floor_iou, n_per_cluster=300):
    # IoU-sampling clusters at 0.15 / 0.3 / 0.45 and one negative at 0.5 (the max). With
    # floor_thr 0.1 the bins over [0.1, 0.5] are [.1, .233), [.233, .367), [.367, .5].
    clusters = [torch.full((n_per_cluster,), v) for v in (0.15, 0.3, 0.45)]
    neg = torch.cat([torch.full((n_floor,), floor_iou)] + clusters + [torch.tensor([0.5])])
    return _inputs(neg)


@pytest.mark.parametrize(
    "fraction, n_floor_expected",
    [
        (0.5, 192),  # balanced part int(384 * 0.5) = 192, floor the other 192
        (0.3, 116),  # balanced int(384 * 0.7) = int(268.8) = 268, floor 384 - 268 = 116
        (1.0, 384),  # balanced part 0
        (0.0, 0),  # balanced part takes the whole quota
    ],
)
def test_floor_fraction(fraction, n_floor_expected):
    labels, ious, matched = _floor_inputs(1000, 0.05)
    for seed in range(5):
        torch.manual_seed(seed)
        _, neg = _sample(
            labels, ious, matched, 384, 0.25, BG, floor_thr=0.1, floor_fraction=fraction
        )
        assert neg.numel() == 384 and torch.unique(neg).numel() == 384
        assert int((ious[neg] < 0.1).sum()) == n_floor_expected
        if fraction == 0.5:
            # cap int(192 / 3) = 64 in each of the three plentiful bins
            assert _bin_counts(ious, neg, [0.1, 0.2333, 0.3667, 0.51]) == [64, 64, 64]


def test_floor_thr_zero_uses_exact_zeros_as_the_floor():
    # floor_thr 0: the floor set is IoU == 0. With floor_fraction 0 the 901 negatives with
    # IoU > 0 cover the quota of 384, so no zero is sampled (the official sampler's behaviour
    # from its second call on); with 0.5, exactly 384 - int(384 * 0.5) = 192 zeros.
    labels, ious, matched = _floor_inputs(1000, 0.0)
    torch.manual_seed(0)
    _, neg = _sample(labels, ious, matched, 384, 0.25, BG, floor_thr=0.0)
    assert neg.numel() == 384 and int((ious[neg] == 0).sum()) == 0
    _, neg = _sample(labels, ious, matched, 384, 0.25, BG, floor_thr=0.0, floor_fraction=0.5)
    assert neg.numel() == 384 and int((ious[neg] == 0).sum()) == 192


def test_floor_shortfalls():
    # Too few floor negatives (50): balanced part 192 as planned, floor 50 (all), the remaining
    # 384 - 192 - 50 = 142 come from the IoU-sampling leftovers -> 334 above the floor.
    labels, ious, matched = _floor_inputs(50, 0.05)
    torch.manual_seed(0)
    _, neg = _sample(labels, ious, matched, 384, 0.25, BG, floor_thr=0.1, floor_fraction=0.5)
    assert int((ious[neg] < 0.1).sum()) == 50 and int((ious[neg] >= 0.1).sum()) == 334
    # Too few IoU-sampling negatives (3 x 30 + 1 = 91 < 192): all 91 taken, floor gives 293.
    labels, ious, matched = _floor_inputs(1000, 0.05, n_per_cluster=30)
    _, neg = _sample(labels, ious, matched, 384, 0.25, BG, floor_thr=0.1, floor_fraction=0.5)
    assert int((ious[neg] >= 0.1).sum()) == 91 and int((ious[neg] < 0.1).sum()) == 293


# ------------------------------------------------------------------------------------------------
# Positives: instance balancing
# ------------------------------------------------------------------------------------------------
def test_instance_balanced_two_gts():
    # GT A: 200 positives, GT B: 10; quota int(512 * 0.25) = 128 < 210.
    # cap = round(128 / 2) + 1 = 65: A keeps 65, B all 10 -> 75; shortfall 53 can only come from
    # A's 135 leftovers -> A 118, B 10.
    gt = torch.cat([torch.zeros(200, dtype=torch.int64), torch.ones(10, dtype=torch.int64)])
    labels, ious, matched = _inputs(torch.full((1000,), 0.1), torch.full((210,), 0.7), gt)
    for seed in range(10):
        torch.manual_seed(seed)
        pos, neg = _sample(labels, ious, matched, 512, 0.25, BG)
        _check_contract(labels, pos, neg, 512, 0.25)
        assert torch.bincount(matched[pos], minlength=2).tolist() == [118, 10]


def test_instance_balanced_overshoot_is_trimmed():
    # 4 GTs x 100 positives, quota 128: cap = round(128 / 4) + 1 = 33 -> 132 primaries, the
    # overshoot of 4 is trimmed at random: each GT keeps 29..33, total 128, mean 32.
    gt = torch.arange(4).repeat_interleave(100)
    labels, ious, matched = _inputs(torch.full((1000,), 0.1), torch.full((400,), 0.7), gt)
    totals = torch.zeros(4)
    for seed in range(50):
        torch.manual_seed(seed)
        pos, _ = _sample(labels, ious, matched, 512, 0.25, BG)
        per_gt = torch.bincount(matched[pos], minlength=4)
        assert int(per_gt.sum()) == 128
        assert int(per_gt.max()) <= 33 and int(per_gt.min()) >= 29
        assert int((33 - per_gt).sum()) == 4
        totals += per_gt
    assert torch.allclose(totals / 50, torch.full((4,), 32.0), atol=0.5)


def test_instance_balanced_uses_python_rounding():
    # 4 GTs x 10 positives, quota int(40 * 0.25) = 10: 10 / 4 = 2.5 rounds half to even -> 2,
    # cap 3 -> 12 primaries trimmed to 10, so no GT ever has more than 3 (round-half-up would
    # give cap 4 and often a GT with 4).
    gt = torch.arange(4).repeat_interleave(10)
    labels, ious, matched = _inputs(torch.full((100,), 0.1), torch.full((40,), 0.7), gt)
    for seed in range(50):
        torch.manual_seed(seed)
        pos, _ = _sample(labels, ious, matched, 40, 0.25, BG)
        per_gt = torch.bincount(matched[pos], minlength=4)
        assert int(per_gt.sum()) == 10 and int(per_gt.max()) <= 3


def test_instance_balanced_sparse_gt_indices():
    # Ground-truth indices need not be small or contiguous: GTs 7 and 1000, 100 positives each,
    # quota 128: cap round(64) + 1 = 65 each -> 130 primaries trimmed by 2 -> 63..65 each.
    gt = torch.tensor([7, 1000]).repeat_interleave(100)
    labels, ious, matched = _inputs(torch.full((1000,), 0.1), torch.full((200,), 0.7), gt)
    torch.manual_seed(0)
    pos, _ = _sample(labels, ious, matched, 512, 0.25, BG)
    a, b = int((matched[pos] == 7).sum()), int((matched[pos] == 1000).sum())
    assert a + b == 128 and 63 <= a <= 65 and 63 <= b <= 65


def test_positives_below_the_quota_are_all_taken():
    labels, ious, matched = _inputs(torch.full((1000,), 0.1), torch.full((50,), 0.7))
    pos, neg = _sample(labels, ious, matched, 512, 0.25, BG)
    assert sorted(pos.tolist()) == list(range(1000, 1050)) and neg.numel() == 462


# ------------------------------------------------------------------------------------------------
# Contract over many random cases
# ------------------------------------------------------------------------------------------------
CONFIGS = [
    dict(),
    dict(num_bins=1),
    dict(num_bins=25),
    dict(floor_thr=0.0),
    dict(floor_thr=0.0, floor_fraction=0.5),
    dict(floor_thr=0.1, floor_fraction=0.0),
    dict(floor_thr=0.1, floor_fraction=0.5),
    dict(floor_thr=0.1, floor_fraction=1.0),
    dict(floor_thr=-1.0, floor_fraction=0.5),
    dict(num_bins=25, floor_thr=0.1, floor_fraction=0.5),
    dict(instance_balanced_pos=False),
]


def _random_case(gen):
    kind = int(torch.randint(6, (1,), generator=gen))
    n = int(torch.randint(0, 400, (1,), generator=gen))
    num_gt = int(torch.randint(1, 12, (1,), generator=gen))
    ious = torch.rand(n, generator=gen) ** 3
    if kind == 1:  # image without GT: all background, IoU 0
        return torch.full((n,), BG), torch.zeros(n), torch.zeros(n, dtype=torch.int64)
    if kind == 2:  # many exact zeros
        ious[torch.rand(n, generator=gen) < 0.5] = 0.0
    if kind == 3:  # all positives (no negatives)
        ious = 0.5 + 0.5 * torch.rand(n, generator=gen)
    if kind == 4:  # no positives
        ious = 0.5 * torch.rand(n, generator=gen)
    labels = torch.where(ious >= 0.5, torch.randint(0, BG, (n,), generator=gen), BG)
    labels[torch.rand(n, generator=gen) < 0.1] = -1  # ignored
    matched = torch.randint(0, num_gt, (n,), generator=gen)
    if kind == 5 and n > 0:  # a few GT boxes appended
        ious[-min(n, num_gt) :] = 1.0
        labels[-min(n, num_gt) :] = 1
    return labels, ious, matched


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_contract_on_random_cases(config):
    gen = torch.Generator().manual_seed(1234)
    for seed in range(60):
        labels, ious, matched = _random_case(gen)
        num_samples = int(torch.randint(1, 300, (1,), generator=gen))
        fraction = [0.25, 0.5, 0.0, 1.0][seed % 4]
        torch.manual_seed(seed)
        pos, neg = _sample(labels, ious, matched, num_samples, fraction, BG, **config)
        _check_contract(labels, pos, neg, num_samples, fraction)


def test_empty_input():
    e = torch.zeros(0, dtype=torch.int64)
    pos, neg = _sample(e, torch.zeros(0), e, 512, 0.25, BG)
    assert pos.numel() == 0 and neg.numel() == 0
    assert pos.dtype == torch.int64 and neg.dtype == torch.int64


def test_ignored_proposals_are_never_returned():
    labels, ious, matched = _inputs(torch.full((100,), 0.2), [0.9] * 20, num_ignored=500)
    for seed in range(10):
        torch.manual_seed(seed)
        pos, neg = _sample(labels, ious, matched, 512, 0.25, BG)
        assert pos.numel() == 20 and neg.numel() == 100  # everything but the 500 ignored
        assert int((labels[torch.cat([pos, neg])] == -1).sum()) == 0


@pytest.mark.parametrize(
    "name, value",
    [
        ("NUM_BINS", 0),
        ("NUM_BINS", 2.5),
        ("NUM_BINS", float("nan")),
        ("FLOOR_FRACTION", -0.1),
        ("FLOOR_FRACTION", float("nan")),
        ("FLOOR_THR", 1.0),
        ("FLOOR_THR", float("nan")),
    ],
)
def test_config_is_validated_where_the_heads_are_built(name, value):
    # Set directly (a YAML or merge_from_list would already reject a float NUM_BINS).
    cfg = add_libra_config(get_cfg())
    cfg.MODEL.ROI_HEADS.IOU_BALANCED[name] = value
    key = rf"MODEL\.ROI_HEADS\.IOU_BALANCED\.{name}"
    with pytest.raises(ValueError, match=rf"^{key} = {value!r} is out of range"):
        IoUBalancedROIHeads.from_config(cfg, None)


# ------------------------------------------------------------------------------------------------
# Determinism and device
# ------------------------------------------------------------------------------------------------
def _big_case():
    gt = torch.arange(5).repeat_interleave(60)
    return _inputs(
        torch.rand(3000, generator=torch.Generator().manual_seed(0)) * 0.5, [0.8] * 300, gt
    )


def test_deterministic_under_manual_seed():
    labels, ious, matched = _big_case()
    torch.manual_seed(7)
    a = _sample(labels, ious, matched, 512, 0.25, BG)
    torch.manual_seed(7)
    b = _sample(labels, ious, matched, 512, 0.25, BG)
    torch.manual_seed(8)
    c = _sample(labels, ious, matched, 512, 0.25, BG)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0].sort().values, c[0].sort().values)
    assert not torch.equal(a[1].sort().values, c[1].sort().values)


def test_explicit_generator():
    labels, ious, matched = _big_case()
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = _sample(labels, ious, matched, 512, 0.25, BG, generator=g1)
    b = _sample(labels, ious, matched, 512, 0.25, BG, generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype(device, dtype):
    labels, ious, matched = (t.to(device) for t in _big_case())
    ious = ious.to(dtype)
    torch.manual_seed(0)
    pos, neg = _sample(labels, ious, matched, 512, 0.25, BG)
    _check_contract(labels, pos, neg, 512, 0.25)
    assert pos.device.type == device and neg.device.type == device
    # 5 GTs x 60 positives, quota 128: cap round(25.6) + 1 = 27 -> 135 primaries trimmed by 7.
    per_gt = torch.bincount(matched[pos], minlength=5)
    assert int(per_gt.sum()) == 128 and int(per_gt.max()) <= 27 and int(per_gt.min()) >= 20
