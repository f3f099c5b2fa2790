#!/usr/bin/env python
"""
Time Libra R-CNN's sampling of second-stage training proposals.

Compares, on the same inputs:

* ``ours``: :func:`libra_d2.modeling.sampling.iou_balanced_subsample` (IoU-balanced negatives,
  instance-balanced positives, vectorised torch);
* ``subsample_labels``: detectron2's random sampler (the cost floor: what a Faster R-CNN pays);
* ``official``: a re-implementation, written for this benchmark from the description of the
  algorithm, of the official numpy/set-based ``InstanceBalancedPosSampler`` +
  ``IoUBalancedNegSampler`` (mmdetection v1 / Libra_R-CNN release): ``nonzero`` + per-GT loops for
  positives, Python sets, per-bin ``np.where`` loops, random choices in numpy and
  ``torch.from_numpy`` round trips, plus the ``unique()`` that mmdetection's ``BaseSampler``
  applies to both results.

Inputs are realistic second-stage inputs: ``N`` proposals per image (70% scattered over an
800x1333 image, 30% jittered around ~10 ground-truth boxes), the ground-truth boxes appended as
proposals (as detectron2 does), matched with detectron2's ``Matcher`` at IoU 0.5. Most negatives
then have an IoU near 0.

Timing: by default the three methods are called one after the other on each input, in an order
that rotates every round (caches about as cold as inside a training step, and machine noise hits
all three alike); ``--separate`` times each method in its own loop instead (warm caches). The
table reports medians and the two target ratios at each size.

Example::

    python benchmarks/bench_sampler.py --num-proposals 1000 2000 10000 --device cpu --json out.json
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.sampling import subsample_labels
from detectron2.structures import Boxes, pairwise_iou

from libra_d2.modeling.sampling import iou_balanced_subsample

NUM_CLASSES = 80


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
        x0 = (cx - bw / 2).clamp(0, w)
        y0 = (cy - bh / 2).clamp(0, h)
        x1 = (cx + bw / 2).clamp(0, w)
        y1 = (cy + bh / 2).clamp(0, h)
        return torch.stack([x0, y0, x1, y1], dim=1)

    size = lambda n: 16 + 300 * torch.rand(n, generator=g) ** 2  # noqa: E731
    gt = boxes_from(
        torch.rand(num_gt, generator=g) * w,
        torch.rand(num_gt, generator=g) * h,
        size(num_gt),
        size(num_gt),
    )
    num_near = int(0.3 * num_proposals)
    num_far = num_proposals - num_near
    far = boxes_from(
        torch.rand(num_far, generator=g) * w,
        torch.rand(num_far, generator=g) * h,
        size(num_far),
        size(num_far),
    )
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
# Re-implementation of the official numpy/set-based samplers (benchmark only).
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
def sampler_methods(num_samples, positive_fraction):
    """The three samplers compared, each a function of one ``make_inputs`` dict -> (pos, neg)."""
    ns, pf, bg = num_samples, positive_fraction, NUM_CLASSES
    return {
        "ours": lambda x: iou_balanced_subsample(
            x["labels"], x["max_ious"], x["matched_idxs"], ns, pf, bg
        ),
        "subsample_labels": lambda x: subsample_labels(x["labels"], ns, pf, bg),
        "official": lambda x: official_sample(x["gt_inds"], x["max_ious"], ns, pf),
    }


def time_rounds(names, fn, warmup, iters, sync, separate=False, after=None):
    """
    Time ``fn(name, it)`` for every name over ``warmup + iters`` rounds ``it``.

    By default the names take turns within each round, in an order that rotates every round, so
    that drift, noise and order effects (e.g. running right after a cache-thrashing call) hit
    every name alike; ``separate=True`` runs all rounds of one name before the next (warm caches).
    ``after(name, it, result)``, if given, is called untimed after each timed call.

    Returns:
        dict name -> list of ``iters`` durations in seconds.
    """
    rounds = range(warmup + iters)
    if separate:
        schedule = [(it, [name]) for name in names for it in rounds]
    else:
        schedule = [(it, names[it % len(names) :] + names[: it % len(names)]) for it in rounds]
    times = {n: [] for n in names}
    for it, order in schedule:
        for name in order:
            sync()
            t0 = time.perf_counter()
            result = fn(name, it)
            sync()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
                if after is not None:
                    after(name, it, result)
    return times


# --------------------------------------------------------------------------------------------
DISTRIBUTION_CONFIGS = [
    dict(floor_thr=-1.0, floor_fraction=0.0),  # the official first call / this project's default
    dict(floor_thr=0.0, floor_fraction=0.0),  # the official sampler from its second call on
    dict(floor_thr=0.1, floor_fraction=0.5),
    dict(floor_thr=-1.0, floor_fraction=0.3),
]
IOU_EDGES = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]


def compare_distributions(x, draws, num_samples, positive_fraction):
    """
    Mean number of sampled negatives per IoU range, ours vs the official algorithm, over
    ``draws`` seeded draws on one image, for each of DISTRIBUTION_CONFIGS.

    Returns:
        list of dict(config, ours, official): the two lists of per-range means.
    """
    ious = x["max_ious"].cpu().numpy()
    rows = []
    for config in DISTRIBUTION_CONFIGS:
        hist = {"ours": np.zeros(len(IOU_EDGES) - 1), "official": np.zeros(len(IOU_EDGES) - 1)}
        for seed in range(draws):
            torch.manual_seed(seed)
            np.random.seed(seed)
            _, ours = iou_balanced_subsample(
                x["labels"],
                x["max_ious"],
                x["matched_idxs"],
                num_samples,
                positive_fraction,
                NUM_CLASSES,
                **config,
            )
            _, official = official_sample(
                x["gt_inds"], x["max_ious"], num_samples, positive_fraction, **config
            )
            for name, idx in (("ours", ours), ("official", official)):
                hist[name] += np.histogram(ious[idx.cpu().numpy()], IOU_EDGES)[0]
        rows.append(dict(config=config, **{k: (v / draws).tolist() for k, v in hist.items()}))
    return rows


# --------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-proposals", type=int, nargs="+", default=[1000, 2000, 10000])
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--positive-fraction", type=float, default=0.25)
    parser.add_argument("--num-gt", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per method")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--num-images", type=int, default=8, help="distinct inputs, cycled")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0 = leave torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--separate",
        action="store_true",
        help="time each method in its own loop instead of interleaving them (warmer caches)",
    )
    parser.add_argument(
        "--distribution",
        type=int,
        default=0,
        metavar="DRAWS",
        help="also compare which negatives ours and the official algorithm pick (mean count per "
        "IoU range over DRAWS seeded draws on one image of the largest size, several configs)",
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    ns, pf, bg = args.num_samples, args.positive_fraction, NUM_CLASSES

    methods = sampler_methods(ns, pf)
    results = []
    for num_props in args.num_proposals:
        images = [
            make_inputs(num_props, args.num_gt, device, args.seed * 1000 + i)
            for i in range(args.num_images)
        ]
        stats = {name: dict(num_pos=[], num_neg=[], neg_iou_ge_0_1=[]) for name in methods}

        def record(name, it, result):
            pos, neg = result
            s = stats[name]
            s["num_pos"].append(pos.numel())
            s["num_neg"].append(neg.numel())
            x = images[it % len(images)]
            s["neg_iou_ge_0_1"].append((x["max_ious"][neg] >= 0.1).float().mean().item())

        times = time_rounds(
            list(methods),
            lambda name, it: methods[name](images[it % len(images)]),
            args.warmup,
            args.repeats,
            sync,
            separate=args.separate,
            after=record,
        )
        med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
        x0 = images[0]
        neg_mask = x0["labels"] == bg
        row = dict(
            num_proposals=num_props + args.num_gt,
            num_pos_candidates=int(((x0["labels"] != bg) & (x0["labels"] != -1)).sum()),
            num_neg_candidates=int(neg_mask.sum()),
            neg_candidates_iou_ge_0_1=float((x0["max_ious"][neg_mask] >= 0.1).float().mean()),
            median_us=med,
            ours_over_subsample_labels=med["ours"] / med["subsample_labels"],
            official_over_ours=med["official"] / med["ours"],
            mean_sampled={
                name: {k: statistics.mean(v) for k, v in s.items()} for name, s in stats.items()
            },
        )
        row["target_ours_le_2x_subsample_labels"] = row["ours_over_subsample_labels"] <= 2.0
        row["target_official_ge_10x_ours"] = row["official_over_ours"] >= 10.0
        results.append(row)

    print(
        f"\ndevice={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"num_samples={ns} positive_fraction={pf} num_gt={args.num_gt} repeats={args.repeats} "
        f"timing={'separate loops' if args.separate else 'interleaved, rotated'}\n"
    )
    print(
        "| proposals (+GT) | pos / neg candidates | ours (us) | subsample_labels (us) "
        "| official (us) | ours / subsample_labels | official / ours | targets met |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_us"]
        met = r["target_ours_le_2x_subsample_labels"] and r["target_official_ge_10x_ours"]
        print(
            f"| {r['num_proposals']} | {r['num_pos_candidates']} / {r['num_neg_candidates']} "
            f"| {m['ours']:.1f} | {m['subsample_labels']:.1f} | {m['official']:.1f} "
            f"| {r['ours_over_subsample_labels']:.2f}x | {r['official_over_ours']:.1f}x "
            f"| {'yes' if met else 'NO'} (<=2x: "
            f"{'yes' if r['target_ours_le_2x_subsample_labels'] else 'no'}, >=10x: "
            f"{'yes' if r['target_official_ge_10x_ours'] else 'no'}) |"
        )
    print("\nMean share of sampled negatives with IoU >= 0.1 (sanity check of the balancing):")
    for r in results:
        shares = ", ".join(
            f"{name} {s['neg_iou_ge_0_1']:.2f}" for name, s in r["mean_sampled"].items()
        )
        print(
            f"  N={r['num_proposals']}: negative candidates {r['neg_candidates_iou_ge_0_1']:.2f}; "
            f"sampled: {shares}"
        )
    distribution = []
    if args.distribution > 0:
        n = max(args.num_proposals)
        x = make_inputs(n, args.num_gt, device, args.seed * 1000)
        distribution = compare_distributions(x, args.distribution, ns, pf)
        ranges = [f"[{lo:g}, {hi:g})" for lo, hi in zip(IOU_EDGES[:-1], IOU_EDGES[1:])]
        print(
            f"\nMean sampled negatives per IoU range, {n + args.num_gt} proposals, "
            f"{args.distribution} draws (ours / official):"
        )
        print("| config | " + " | ".join(ranges) + " |")
        print("|---" * (len(ranges) + 1) + "|")
        for row in distribution:
            config = ", ".join(f"{k}={v}" for k, v in row["config"].items())
            cells = " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(row["ours"], row["official"]))
            print(f"| {config} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            out = dict(args=vars(args), device=str(device), results=results)
            json.dump(dict(out, distribution=distribution), f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
