"""IoU-balanced sampling of the second-stage training proposals (Libra R-CNN, Sec. 3.1)."""

from typing import Optional, Tuple

import torch

__all__ = ["iou_balanced_subsample"]


def iou_balanced_subsample(
    labels: torch.Tensor,
    max_ious: torch.Tensor,
    matched_idxs: torch.Tensor,
    num_samples: int,
    positive_fraction: float,
    bg_label: int,
    *,
    num_bins: int,
    floor_thr: float,
    floor_fraction: float,
    instance_balanced_pos: bool,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    detectron2's ``subsample_labels`` with Libra R-CNN's choice of *which* proposals are taken:
    negatives evenly over IoU bins, positives evenly over ground-truth objects.

    The counts are those of ``subsample_labels``: ``num_pos = min(int(num_samples *
    positive_fraction), #positives)`` and ``num_neg = min(num_samples - num_pos, #negatives)``.

    Negatives (``q = num_neg``; all of them if there are no more than ``q``): with
    ``q_b = int(q * (1 - floor_fraction))``,

    * ``floor_thr < 0``: the range ``[0, max_ious.max())`` (the maximum over all proposals, 1.0
      when the ground-truth boxes are appended as proposals) is cut into ``num_bins`` equal-width
      bins; each bin gives ``int(q_b / num_bins)`` negatives at random, or all it has; the rest of
      ``q`` is drawn uniformly from the negatives not taken yet.
    * ``floor_thr >= 0``: the negatives with IoU < ``floor_thr`` (IoU == 0 when ``floor_thr`` is
      0) form the floor set. The others are IoU-balanced as above over ``[floor_thr, max)`` and
      filled up to ``q_b`` from their own leftovers; the floor set gives the rest of ``q`` at
      random; a remaining shortfall is drawn from all the negatives not taken yet.

    Positives (``q = num_pos``; all of them if there are no more than ``q``): if
    ``instance_balanced_pos``, each of the ``G`` ground-truth objects matched by positives gives
    at most ``round(q / G) + 1`` of its positives at random (Python's round, half to even); a
    shortfall is filled at random from the other positives, an overshoot trimmed at random.
    Otherwise they are drawn uniformly, as by ``subsample_labels``.

    Differences from the official samplers (``IoUBalancedNegSampler``,
    ``InstanceBalancedPosSampler``), all deliberate:

    * The last bin is closed: a negative with IoU == ``max_ious.max()`` is in it (officially it
      can only come in through the fill).
    * Any ``floor_thr < 0`` bins ``[0, max)`` on every call. The official sampler sets its
      ``floor_thr`` (-1) to 0 during its first call, so later calls leave IoU-0 negatives to the
      fill; ``floor_thr=0.0`` gives that behaviour.
    * Exactly ``num_pos`` distinct positives: the official fill builds Python sets of tensors
      (hashed by identity), so it can pick duplicates and return fewer.

    Args:
        labels (Tensor): int64 [N]; class of each proposal, ``bg_label`` for background, -1 for
            ignored proposals (never returned).
        max_ious (Tensor): float [N]; the maximum IoU of each proposal with any ground-truth box
            (0 when the image has none).
        matched_idxs (Tensor): int64 [N]; matched ground-truth index of each proposal (read for
            positives only).
        num_samples (int): number of proposals to sample (positives + negatives).
        positive_fraction (float): maximum fraction of positives in the sample.
        bg_label (int): label of the background class.
        num_bins (int): number of IoU bins, >= 1.
        floor_thr (float): IoU threshold of the floor set; < 0 for none.
        floor_fraction (float): in [0, 1], the share of the negative quota not IoU-balanced.
        instance_balanced_pos (bool): balance the positives over ground-truth objects.
        generator (torch.Generator, optional): random generator on the input's device (the
            default generator when None).

    Returns:
        pos_idx, neg_idx (Tensor): int64 [num_pos] and [num_neg] on the input's device, indices
        into the N proposals, each without repetition, in no particular order.
    """
    is_neg = labels == bg_label
    positive = torch.nonzero((labels != -1) & ~is_neg).squeeze(1)
    num_pos = min(int(num_samples * positive_fraction), positive.numel())
    if num_pos == positive.numel():
        pos_idx = positive
    elif instance_balanced_pos:
        pos_idx = positive[_instance_balanced(matched_idxs[positive], num_pos, generator)]
    else:
        pos_idx = _random_split(positive, num_pos, generator)[0]
    neg_idx = _iou_balanced_negatives(
        is_neg, max_ious, num_samples - num_pos, num_bins, floor_thr, floor_fraction, generator
    )
    return pos_idx, neg_idx


def _random_split(pool: torch.Tensor, m: int, generator, shuffled: bool = False):
    """
    A uniformly random ``m``-subset of the 1-D ``pool`` (all of it if smaller) and the rest, the
    rest in random order if ``0 < m < len(pool)``. ``shuffled``: ``pool`` is already in random
    order, so its first ``m`` are taken.
    """
    if m <= 0:
        return pool[:0], pool
    if m >= pool.numel():
        return pool, pool[:0]
    if not shuffled:
        pool = pool[torch.randperm(pool.numel(), device=pool.device, generator=generator)]
    return pool[:m], pool[m:]


def _iou_balanced_negatives(is_neg, ious, k, num_bins, floor_thr, floor_fraction, generator):
    """Indices of ``min(k, #negatives)`` of the negatives ``is_neg`` (bool [N]), IoU-balanced."""
    if is_neg.numel() == 0:
        return torch.nonzero(is_neg).squeeze(1)
    lo = max(floor_thr, 0.0)
    width = (float(ious.max()) - lo) / num_bins
    edges = [lo + i * width for i in range(1, num_bins)]
    # Group of each proposal: its IoU bin [start, end), num_bins for the floor set, -1 if it
    # is not a negative.
    group = torch.bucketize(
        ious, torch.tensor(edges, dtype=ious.dtype, device=ious.device), right=True
    )
    if floor_thr >= 0:
        group.masked_fill_((ious == 0) if floor_thr == 0 else (ious < floor_thr), num_bins)
    group.masked_fill_(~is_neg, -1)
    bins = [torch.nonzero(group == i).squeeze(1) for i in range(num_bins)]
    floor = torch.nonzero(group == num_bins).squeeze(1) if floor_thr >= 0 else group[:0]
    if sum(map(len, bins)) + len(floor) <= k:
        return torch.cat(bins + [floor])

    # Each bin gives a random subset of up to per_bin; a uniform fill from the bins' leftovers
    # tops that up to k_balanced; the floor set gives the rest of k; a uniform fill from all the
    # leftovers makes up any shortfall.
    k_balanced = int(k * (1 - floor_fraction))
    per_bin = k_balanced // num_bins
    taken, rest = [], []
    for members in bins:
        t, r = _random_split(members, per_bin, generator)
        taken.append(t)
        rest.append(r)
    # Leftovers from a single bin (the usual case) are already in random order if per_bin > 0.
    one_bin = per_bin > 0 and sum(len(r) > 0 for r in rest) == 1
    m = k_balanced - sum(map(len, taken))
    t, bins_rest = _random_split(torch.cat(rest), m, generator, shuffled=one_bin)
    taken.append(t)
    t, floor_rest = _random_split(floor, k - sum(map(len, taken)), generator)
    taken.append(t)
    shortfall = k - sum(map(len, taken))
    if shortfall > 0:
        taken.append(_random_split(torch.cat([bins_rest, floor_rest]), shortfall, generator)[0])
    return torch.cat(taken)


def _instance_balanced(gt, k, generator):
    """Positions of ``k`` of the positives (more than ``k``), balanced over their ground truth."""
    order = torch.randperm(gt.numel(), device=gt.device, generator=generator)
    # Sorting the shuffled positives by ground truth (stably) groups them, each group in a random
    # order, so that the first members of a group are a uniformly random subset of it.
    sorted_gt, by_gt = torch.sort(gt[order], stable=True)
    sizes = torch.unique_consecutive(sorted_gt, return_counts=True)[1].tolist()
    groups = order[by_gt].split(sizes)
    per_gt = round(k / len(groups)) + 1
    taken = torch.cat([g[:per_gt] for g in groups])
    if taken.numel() >= k:
        return _random_split(taken, k, generator)[0]
    rest = torch.cat([g[per_gt:] for g in groups])
    return torch.cat([taken, _random_split(rest, k - taken.numel(), generator)[0]])
