#!/usr/bin/env python
"""
Time Libra R-CNN's sampling of second-stage training proposals and compare it with the official
algorithm.

Three samplers run on the same synthetic images (``N`` proposals: 70% scattered over an 800x1333
image, 30% jittered around ``--num-gt`` ground-truth boxes, the ground truth appended, matched
with detectron2's ``Matcher`` at IoU 0.5):

* ``ours``: :func:`libra_d2.modeling.iou_balanced_subsample` with the default
  ``MODEL.ROI_HEADS.IOU_BALANCED`` settings;
* ``subsample_labels``: detectron2's random sampler, what a Faster R-CNN pays;
* ``official``: a port, for this benchmark, of the official numpy/set-based
  ``InstanceBalancedPosSampler`` + ``IoUBalancedNegSampler`` (mmdetection v1 / Libra_R-CNN).

The timing table gives the median time per image (the three called in turn, in an order that
rotates every round) and the share of hard negatives (IoU > 0.05) each one samples.
``--distribution DRAWS`` also compares, on one image, the mean number of negatives ours and the
official port sample per IoU range over DRAWS seeded draws, for several floor settings.

Example::

    python benchmarks/bench_sampler.py --num-proposals 1000 2000 10000 --distribution 300
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, pairwise_iou

from libra_d2 import add_libra_config
from libra_d2.modeling import iou_balanced_subsample

NUM_CLASSES = 80
HARD_IOU = 0.05  # the paper's "hard negative" threshold
_IB = add_libra_config(get_cfg()).MODEL.ROI_HEADS.IOU_BALANCED
DEFAULTS = dict(
    num_bins=_IB.NUM_BINS,
    floor_thr=_IB.FLOOR_THR,
    floor_fraction=_IB.FLOOR_FRACTION,
    instance_balanced_pos=_IB.INSTANCE_BALANCED_POS,
)


def make_inputs(num_proposals, num_gt, device, seed):
    """
    One image's matcher output for ``num_proposals`` proposals + ``num_gt`` appended GT boxes.

    Returns:
        dict with labels (int64 [R]), max_ious (float32 [R]), matched_idxs (int64 [R]) and
        gt_inds (int64 [R]: 0 negative, i + 1 matched to GT i, as mmdetection's assigner).
    """
    g = torch.Generator().manual_seed(seed)
    h, w = 800.0, 1333.0

    def boxes_from(cx, cy, bw, bh):
        x0, x1 = (cx - bw / 2).clamp(0, w), (cx + bw / 2).clamp(0, w)
        y0, y1 = (cy - bh / 2).clamp(0, h), (cy + bh / 2).clamp(0, h)
        return torch.stack([x0, y0, x1, y1], dim=1)

    def scattered(n):  # uniform centres, sides 16-316 px (mostly small)
        size = lambda: 16 + 300 * torch.rand(n, generator=g) ** 2  # noqa: E731
        cx, cy = torch.rand(n, generator=g) * w, torch.rand(n, generator=g) * h
        return boxes_from(cx, cy, size(), size())

    gt = scattered(num_gt)
    num_near = int(0.3 * num_proposals)
    far = scattered(num_proposals - num_near)
    src = gt[torch.randint(num_gt, (num_near,), generator=g)]
    gw, gh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
    jitter = lambda: 0.6 * torch.randn(num_near, generator=g)  # noqa: E731
    near = boxes_from(
        (src[:, 0] + src[:, 2]) / 2 + jitter() * gw,
        (src[:, 1] + src[:, 3]) / 2 + jitter() * gh,
        gw * torch.exp(0.5 * jitter()),
        gh * torch.exp(0.5 * jitter()),
    )
    proposals = torch.cat([far, near, gt])  # GT appended, as detectron2's ROI heads do
    iou = pairwise_iou(Boxes(gt), Boxes(proposals))
    matched_idxs, matched_labels = Matcher([0.5], [0, 1], allow_low_quality_matches=False)(iou)
    max_ious = iou.max(dim=0).values
    gt_classes = torch.randint(NUM_CLASSES, (num_gt,), generator=g)
    labels = gt_classes[matched_idxs]
    labels[matched_labels == 0] = NUM_CLASSES
    gt_inds = torch.where(matched_labels == 1, matched_idxs + 1, 0)
    out = dict(labels=labels, max_ious=max_ious, matched_idxs=matched_idxs, gt_inds=gt_inds)
    return {k: v.to(device) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Port of the official numpy/set-based samplers (benchmark only).
# --------------------------------------------------------------------------------------------
def _official_random_choice(gallery, num):
    """Random subset of a list / ndarray / tensor, as mmdetection's RandomSampler.random_choice."""
    assert len(gallery) >= num
    if isinstance(gallery, list):
        gallery = np.array(gallery)
    cands = np.arange(len(gallery))
    np.random.shuffle(cands)
    rand_inds = cands[:num]
    if not isinstance(gallery, np.ndarray):
        rand_inds = torch.from_numpy(rand_inds).long().to(gallery.device)
    return gallery[rand_inds]


def _official_sample_pos(gt_inds, num_expected):
    pos_inds = torch.nonzero(gt_inds > 0).squeeze(1)
    if pos_inds.numel() <= num_expected:
        return pos_inds
    unique_gt_inds = gt_inds[pos_inds].unique()
    num_gts = len(unique_gt_inds)
    num_per_gt = int(round(num_expected / float(num_gts)) + 1)
    sampled_inds = []
    for i in unique_gt_inds:
        inds = torch.nonzero(gt_inds == i.item()).squeeze(1)
        if len(inds) > num_per_gt:
            inds = _official_random_choice(inds, num_per_gt)
        sampled_inds.append(inds)
    sampled_inds = torch.cat(sampled_inds)
    if len(sampled_inds) < num_expected:
        num_extra = num_expected - len(sampled_inds)
        # As the official code: sets of 0-d tensors (identity hashing, so nothing is removed).
        extra_inds = np.array(list(set(pos_inds.cpu()) - set(sampled_inds.cpu())))
        if len(extra_inds) > num_extra:
            extra_inds = _official_random_choice(extra_inds, num_extra)
        extra_inds = torch.from_numpy(extra_inds.astype(np.int64)).to(gt_inds.device).long()
        sampled_inds = torch.cat([sampled_inds, extra_inds])
    elif len(sampled_inds) > num_expected:
        sampled_inds = _official_random_choice(sampled_inds, num_expected)
    return sampled_inds


def _official_sample_via_interval(max_overlaps, full_set, num_expected, floor_thr, num_bins):
    max_iou = max_overlaps.max()
    iou_interval = (max_iou - floor_thr) / num_bins
    per_num_expected = int(num_expected / num_bins)
    sampled_inds = []
    for i in range(num_bins):
        start_iou = floor_thr + i * iou_interval
        end_iou = floor_thr + (i + 1) * iou_interval
        tmp_set = set(
            np.where(np.logical_and(max_overlaps >= start_iou, max_overlaps < end_iou))[0]
        )
        tmp_inds = list(tmp_set & full_set)
        if len(tmp_inds) > per_num_expected:
            tmp_sampled_set = _official_random_choice(tmp_inds, per_num_expected)
        else:
            tmp_sampled_set = np.array(tmp_inds, dtype=np.int64)
        sampled_inds.append(tmp_sampled_set)
    sampled_inds = np.concatenate(sampled_inds)
    if len(sampled_inds) < num_expected:
        num_extra = num_expected - len(sampled_inds)
        extra_inds = np.array(list(full_set - set(sampled_inds)))
        if len(extra_inds) > num_extra:
            extra_inds = _official_random_choice(extra_inds, num_extra)
        sampled_inds = np.concatenate([sampled_inds, extra_inds])
    return sampled_inds


def _official_sample_neg(gt_inds, max_overlaps_t, num_expected, floor_thr, floor_frac, num_bins):
    neg_inds = torch.nonzero(gt_inds == 0).squeeze(1)
    if len(neg_inds) <= num_expected:
        return neg_inds
    max_overlaps = max_overlaps_t.cpu().numpy()
    neg_set = set(neg_inds.cpu().numpy())
    if floor_thr > 0:
        floor_set = set(np.where(np.logical_and(max_overlaps >= 0, max_overlaps < floor_thr))[0])
        iou_sampling_set = set(np.where(max_overlaps >= floor_thr)[0])
    elif floor_thr == 0:
        floor_set = set(np.where(max_overlaps == 0)[0])
        iou_sampling_set = set(np.where(max_overlaps > floor_thr)[0])
    else:
        floor_set = set()
        iou_sampling_set = set(np.where(max_overlaps > floor_thr)[0])
        floor_thr = 0  # the official sampler does this on `self` (sticky after the first call)
    floor_neg_inds = list(floor_set & neg_set)
    iou_sampling_neg_inds = list(iou_sampling_set & neg_set)
    num_expected_iou_sampling = int(num_expected * (1 - floor_frac))
    if len(iou_sampling_neg_inds) > num_expected_iou_sampling:
        if num_bins >= 2:
            iou_sampled_inds = _official_sample_via_interval(
                max_overlaps,
                set(iou_sampling_neg_inds),
                num_expected_iou_sampling,
                floor_thr,
                num_bins,
            )
        else:
            iou_sampled_inds = _official_random_choice(
                iou_sampling_neg_inds, num_expected_iou_sampling
            )
    else:
        iou_sampled_inds = np.array(iou_sampling_neg_inds, dtype=np.int64)
    num_expected_floor = num_expected - len(iou_sampled_inds)
    if len(floor_neg_inds) > num_expected_floor:
        sampled_floor_inds = _official_random_choice(floor_neg_inds, num_expected_floor)
    else:
        sampled_floor_inds = np.array(floor_neg_inds, dtype=np.int64)
    sampled_inds = np.concatenate((sampled_floor_inds, iou_sampled_inds))
    if len(sampled_inds) < num_expected:
        num_extra = num_expected - len(sampled_inds)
        extra_inds = np.array(list(neg_set - set(sampled_inds)))
        if len(extra_inds) > num_extra:
            extra_inds = _official_random_choice(extra_inds, num_extra)
        sampled_inds = np.concatenate((sampled_inds, extra_inds))
    return torch.from_numpy(sampled_inds.astype(np.int64)).long().to(gt_inds.device)


def official_sample(
    gt_inds, max_overlaps, num, pos_fraction, floor_thr=-1, floor_fraction=0, num_bins=3
):
    """Official combined sampling (positives first, negatives fill the rest), mmdet BaseSampler."""
    num_expected_pos = int(num * pos_fraction)
    pos_inds = _official_sample_pos(gt_inds, num_expected_pos).unique()
    num_expected_neg = num - pos_inds.numel()
    neg_inds = _official_sample_neg(
        gt_inds, max_overlaps, num_expected_neg, floor_thr, floor_fraction, num_bins
    ).unique()
    return pos_inds, neg_inds


# --------------------------------------------------------------------------------------------
def samplers(num_samples, positive_fraction):
    """The three samplers, each a function of one ``make_inputs`` dict -> (pos_idx, neg_idx)."""
    ns, pf = num_samples, positive_fraction
    return {
        "ours": lambda x: iou_balanced_subsample(
            x["labels"], x["max_ious"], x["matched_idxs"], ns, pf, NUM_CLASSES, **DEFAULTS
        ),
        "subsample_labels": lambda x: subsample_labels(x["labels"], ns, pf, NUM_CLASSES),
        "official": lambda x: official_sample(x["gt_inds"], x["max_ious"], ns, pf),
    }


def time_samplers(images, methods, warmup, repeats, sync):
    """
    Median microseconds per call of each method, and the mean share of hard negatives it samples;
    the methods take turns on each image, in an order that rotates every round.
    """
    names = list(methods)
    times = {n: [] for n in names}
    hard = {n: [] for n in names}
    for it in range(warmup + repeats):
        x = images[it % len(images)]
        for name in names[it % 3 :] + names[: it % 3]:
            sync()
            t0 = time.perf_counter()
            _, neg = methods[name](x)
            sync()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
                hard[name].append(float((x["max_ious"][neg] > HARD_IOU).float().mean()))
    return {
        n: dict(median_us=statistics.median(times[n]) * 1e6, hard_share=statistics.mean(hard[n]))
        for n in names
    }


DISTRIBUTION_CONFIGS = [
    dict(floor_thr=-1.0, floor_fraction=0.0),  # the default, and the official first call
    dict(floor_thr=0.0, floor_fraction=0.0),  # the official sampler from its second call on
    dict(floor_thr=0.1, floor_fraction=0.5),
    dict(floor_thr=-1.0, floor_fraction=0.3),
]
IOU_EDGES = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]


def compare_distributions(x, draws, num_samples, positive_fraction):
    """
    Number of sampled negatives per IoU range (``IOU_EDGES``), ours vs the official port, over
    ``draws`` seeded draws on one image, for each of ``DISTRIBUTION_CONFIGS``.

    Returns:
        list of dict(config, ours, official), ``ours``/``official`` each a dict of ``mean`` and
        ``sem`` (standard error of the mean) lists, one value per IoU range.
    """
    ious = x["max_ious"].cpu().numpy()
    rows = []
    for config in DISTRIBUTION_CONFIGS:
        counts = {"ours": [], "official": []}
        for seed in range(draws):
            torch.manual_seed(seed)
            np.random.seed(seed)
            _, ours = iou_balanced_subsample(
                x["labels"], x["max_ious"], x["matched_idxs"], num_samples, positive_fraction,
                NUM_CLASSES, **{**DEFAULTS, **config},
            )  # fmt: skip
            _, official = official_sample(
                x["gt_inds"], x["max_ious"], num_samples, positive_fraction, **config
            )
            for name, idx in (("ours", ours), ("official", official)):
                counts[name].append(np.histogram(ious[idx.cpu().numpy()], IOU_EDGES)[0])
        row = dict(config=config)
        for name, c in counts.items():
            c = np.array(c, dtype=np.float64)
            sem = c.std(axis=0, ddof=1) / np.sqrt(draws) if draws > 1 else np.zeros(c.shape[1])
            row[name] = dict(mean=c.mean(axis=0).tolist(), sem=sem.tolist())
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-proposals", type=int, nargs="+", default=[1000, 2000, 10000])
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--positive-fraction", type=float, default=0.25)
    parser.add_argument("--num-gt", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per sampler")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--distribution",
        type=int,
        default=0,
        metavar="DRAWS",
        help="also compare ours with the official port per IoU range over DRAWS seeded draws "
        "(one image of the largest size)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    methods = samplers(args.num_samples, args.positive_fraction)

    print(
        f"device={device} threads={torch.get_num_threads()} num_samples={args.num_samples} "
        f"positive_fraction={args.positive_fraction} num_gt={args.num_gt} "
        f"repeats={args.repeats}\n"
    )
    print("| proposals | sampler | median us | x subsample_labels | hard negatives (IoU > 0.05) |")
    print("|---|---|---|---|---|")
    results = []
    for n in args.num_proposals:
        images = [make_inputs(n, args.num_gt, device, args.seed * 1000 + i) for i in range(8)]
        stats = time_samplers(images, methods, args.warmup, args.repeats, sync)
        base = stats["subsample_labels"]["median_us"]
        for name, st in stats.items():
            print(
                f"| {n + args.num_gt} | {name} | {st['median_us']:.1f} "
                f"| {st['median_us'] / base:.2f} | {100 * st['hard_share']:.1f}% |"
            )
        results.append(dict(num_proposals=n + args.num_gt, samplers=stats))

    distribution = []
    if args.distribution > 0:
        n = max(args.num_proposals)
        x = make_inputs(n, args.num_gt, device, args.seed * 1000)
        distribution = compare_distributions(
            x, args.distribution, args.num_samples, args.positive_fraction
        )
        ranges = [f"[{lo:g}, {hi:g})" for lo, hi in zip(IOU_EDGES[:-1], IOU_EDGES[1:])]
        print(
            f"\nMean sampled negatives per IoU range, {n + args.num_gt} proposals, "
            f"{args.distribution} draws (ours / official):\n"
        )
        print("| config | " + " | ".join(ranges) + " |")
        print("|---" * (len(ranges) + 1) + "|")
        for row in distribution:
            config = ", ".join(f"{k}={v:g}" for k, v in row["config"].items())
            pairs = zip(row["ours"]["mean"], row["official"]["mean"])
            print(f"| {config} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in pairs) + " |")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(args=vars(args), results=results, distribution=distribution), f, indent=2
            )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
