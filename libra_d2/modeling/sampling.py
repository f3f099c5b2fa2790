"""
IoU-balanced sampling of second-stage training proposals (Libra R-CNN, arXiv 1904.02701, Sec. 3.1).

:func:`iou_balanced_subsample` is a drop-in replacement for
:func:`detectron2.modeling.sampling.subsample_labels` that draws negatives evenly over IoU bins and
positives evenly over ground-truth objects. It is written with a handful of whole-tensor torch
operations on the input's device (no numpy, no Python sets, no per-bin host synchronisation).
"""

from typing import List, Optional, Tuple

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
    num_bins: int = 3,
    floor_thr: float = -1.0,
    floor_fraction: float = 0.0,
    instance_balanced_pos: bool = True,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Subsample positives and negatives like detectron2's ``subsample_labels``, but with Libra
    R-CNN's IoU-balanced negatives and instance-balanced positives.

    The counts follow ``subsample_labels`` exactly: ``num_pos = min(int(num_samples *
    positive_fraction), #positives)`` and ``num_neg = min(num_samples - num_pos, #negatives)``.
    Only *which* proposals are picked changes.

    Negatives (official ``IoUBalancedNegSampler`` semantics, ``q = num_neg``):

    * If there are no more negatives than ``q``, all of them are returned.
    * ``floor_thr < 0`` (official ``-1``): every negative takes part in IoU balancing. The range
      ``[0, max_ious.max())`` -- the maximum over *all* proposals, normally 1.0 because detectron2
      appends the ground-truth boxes as proposals -- is cut into ``num_bins`` equal-width bins.
      Each bin gives ``int(q / num_bins)`` negatives at random (all it has if fewer); the
      shortfall is filled uniformly at random from the negatives not yet taken.
    * ``floor_thr >= 0``: the negatives are split into a *floor* set (IoU < ``floor_thr``;
      IoU == 0 when ``floor_thr == 0``) and an IoU-sampling set (the others). The IoU-sampling
      set gets ``q_b = int(q * (1 - floor_fraction))`` negatives, IoU-balanced with
      ``int(q_b / num_bins)`` per bin over ``[floor_thr, max_ious.max())`` and filled up to
      ``q_b`` from its own leftovers; the floor set gives the rest of ``q`` at random; if it is
      too small, the remainder comes from the IoU-sampling set's leftovers.

    Positives (official ``InstanceBalancedPosSampler`` semantics, ``q = num_pos``), when
    ``instance_balanced_pos`` is True (otherwise uniformly at random, as ``subsample_labels``):

    * If there are no more positives than ``q``, all of them are returned.
    * Otherwise, with ``G`` the number of distinct ground-truth objects matched by positives,
      each object keeps at most ``round(q / G) + 1`` of its positives (Python's round, i.e.
      half-to-even), drawn at random; a shortfall is filled at random from the remaining
      positives and an overshoot is trimmed at random.

    Implementation: the candidates are shuffled once (``randperm``) and each gets its 1-based
    rank inside its group in that order -- group = IoU bin (or the floor set) for negatives,
    matched ground truth for positives -- from one cumulative sum of per-group counters packed
    into an int64 (a few groups; one-hot cumsum if the counters would not fit) or from a sort
    (positives, whose number of ground truths is not known on the host). Candidates with
    ``rank <= cap(group)`` are *primary*: a uniformly random subset of ``min(cap, size)`` members
    of each group. A single ``topk`` over ``fresh uniform key + tier`` (tier 0 for primary
    candidates, 1 or 2 for the fill pools in the order the official code fills them) then picks
    exactly the requested number, so every fill is uniformly random. This draws from the same
    distribution as the official per-bin loops. There is no Python loop over proposals or bins,
    and no host synchronisation beyond the two ``nonzero`` calls that ``subsample_labels`` makes
    too (they size the outputs).

    Differences from the official code (deliberate):

    * Negatives whose IoU equals the top of the range (``max_ious.max()``) fall in the last bin;
      the official bins are half-open, so such negatives could only come in through the fill.
      If the range is empty (``max_ious.max()`` at or below its lower end) all IoU-sampling
      negatives share one bin instead of dividing by zero.
    * ``floor_thr = -1`` bins ``[0, max)`` on every call. The official sampler (after its Dec 2019
      fix) sets ``self.floor_thr = 0`` during its first call, so from the second call on it runs
      the ``floor_thr == 0`` branch, where negatives with IoU exactly 0 are only used to fill;
      pass ``floor_thr=0.0, floor_fraction=0.0`` to get that behaviour.
    * Positives: exactly ``min(q, #positives)`` distinct indices. The official fill step builds
      Python sets of 0-d tensors (hashed by identity), so it can pick duplicates that are later
      dropped, returning fewer positives than the quota.
    * Bin membership is computed as ``floor((iou - lo) * num_bins / (max - lo))``, which can
      differ from the official ``lo + i * width <= iou`` comparisons for an IoU within rounding
      error of a bin edge.
    * ``floor_fraction`` is honoured even when ``floor_thr < 0`` (the IoU-balanced part then gets
      ``int(q * (1 - floor_fraction))`` and the rest is a uniform fill), as in the official code;
      the official constructor rejects ``floor_thr`` values other than -1 below 0, this function
      treats any negative ``floor_thr`` as "no floor".

    Args:
        labels (Tensor): int64 [N]; class of each proposal, ``bg_label`` for background,
            -1 for ignored proposals (never returned).
        max_ious (Tensor): float [N]; the maximum IoU of each proposal with any ground-truth box
            (0 when the image has none).
        matched_idxs (Tensor): int64 [N]; index of the matched ground-truth box of each proposal
            (only read for positives).
        num_samples (int): total number of proposals to sample (positives + negatives).
        positive_fraction (float): maximum fraction of positives in the sample.
        bg_label (int): label of the background class.
        num_bins (int): number of IoU bins for the negatives (>= 1; 1 means random sampling
            above the floor).
        floor_thr (float): IoU threshold of the floor set; negative (official -1) disables it.
        floor_fraction (float): share of the negative quota left to the floor set, in [0, 1]:
            the IoU-balanced part gets ``int(q * (1 - floor_fraction))``, so the floor part is
            ``q - int(q * (1 - floor_fraction))`` (official rounding; one more than
            ``int(q * floor_fraction)`` for some q). With ``floor_thr < 0`` there is no floor
            set and that share is a uniform fill.
        instance_balanced_pos (bool): balance positives across ground-truth objects; if False
            they are drawn uniformly at random.
        generator (torch.Generator, optional): random generator on the input's device; the
            default generator (seeded by ``torch.manual_seed``) when None.

    Returns:
        pos_idx, neg_idx (Tensor): 1-D int64 tensors on the input's device, indices into the N
        proposals of the sampled positives (``min(int(num_samples * positive_fraction),
        #positives)`` of them) and negatives (``min(num_samples - len(pos_idx), #negatives)``),
        each without repetition and in no particular order.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if not 0.0 <= floor_fraction <= 1.0:
        raise ValueError(f"floor_fraction must be in [0, 1], got {floor_fraction}")

    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]

    num_pos = min(int(num_samples * positive_fraction), positive.numel())
    num_neg = min(num_samples - num_pos, negative.numel())

    if instance_balanced_pos:
        pos_idx = _instance_balanced_positives(positive, matched_idxs, num_pos, generator)
    else:
        perm = torch.randperm(positive.numel(), device=positive.device, generator=generator)
        pos_idx = positive.index_select(0, perm[:num_pos])
    neg_idx = _iou_balanced_negatives(
        negative, max_ious, num_neg, num_bins, floor_thr, floor_fraction, generator
    )
    return pos_idx, neg_idx


def _instance_balanced_positives(
    positive: torch.Tensor,
    matched_idxs: torch.Tensor,
    k: int,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """
    Pick ``k`` of the ``positive`` indices, at most ``round(k / G) + 1`` per matched ground truth
    first, then at random from the rest (see :func:`iou_balanced_subsample`).
    """
    if k >= positive.numel():
        return positive
    if k == 0:
        return positive[:0]
    perm = torch.randperm(positive.numel(), device=positive.device, generator=generator)
    cand = positive.index_select(0, perm)
    # The number of ground truths is unknown on the host: rank by sorting (few candidates).
    order, rank, num_gt = _rank_within_sorted_groups(matched_idxs.index_select(0, cand))
    # rank < round(k / G) + 1, with round-half-to-even in float64 like the official Python round().
    non_primary = rank > torch.div(k, num_gt.to(torch.float64)).round_()
    return cand.index_select(0, order.index_select(0, _tiered_topk([non_primary], k, generator)))


def _iou_balanced_negatives(
    negative: torch.Tensor,
    max_ious: torch.Tensor,
    k: int,
    num_bins: int,
    floor_thr: float,
    floor_fraction: float,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """
    Pick ``k`` of the ``negative`` indices, IoU-balanced with an optional floor set
    (see :func:`iou_balanced_subsample`).
    """
    num_cand = negative.numel()
    if k >= num_cand:
        return negative
    if k == 0:
        return negative[:0]
    perm = torch.randperm(num_cand, device=negative.device, generator=generator)
    cand = negative.index_select(0, perm)
    ious = max_ious.index_select(0, cand)
    # Bins over [lo, max IoU of all proposals): bin = floor((iou - lo) / width), clamped to
    # [0, num_bins - 1]. clamp_min avoids 0/0 for an empty range; every IoU-sampling negative then
    # lands in one bin (its ious are all equal to max <= lo).
    if floor_thr > 0:
        bins_per_iou = torch.div(num_bins, (max_ious.max() - floor_thr).clamp_min(1e-12))
        scaled = (ious - floor_thr).mul_(bins_per_iou)
    else:
        scaled = ious * torch.div(num_bins, max_ious.max().clamp_min(1e-12))
    group = scaled.clamp_(0, num_bins - 1).to(torch.int64)
    num_balanced = int(k * (1 - floor_fraction))  # official: int(num_expected * (1 - fraction))
    bin_cap = int(num_balanced / num_bins)

    if floor_thr < 0:
        non_primary = _count_within_groups(group, num_bins) > bin_cap
        return cand.index_select(0, _tiered_topk([non_primary], k, generator))

    in_floor = ious == 0 if floor_thr == 0 else ious < floor_thr
    # The floor set is group `num_bins`; its cap is what the IoU-sampling set leaves of k.
    group = torch.where(in_floor, num_bins, group)
    caps = torch.full((num_bins + 1,), bin_cap, dtype=torch.int64, device=negative.device)
    caps[num_bins] = k - (num_cand - in_floor.sum()).clamp(max=num_balanced)
    non_primary = _count_within_groups(group, num_bins + 1) > caps.index_select(0, group)
    # Fill order: IoU-sampling leftovers (tier 1) before floor leftovers (tier 2).
    tiers = [non_primary, non_primary & in_floor]
    return cand.index_select(0, _tiered_topk(tiers, k, generator))


def _count_within_groups(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """
    1-based rank of each candidate inside its group, in the order given.

    The callers shuffle the candidates first, so that ``count <= cap`` keeps a uniformly random
    subset of ``min(cap, size)`` members of each group.

    Args:
        group (Tensor): int64 [M], group id of each candidate, in [0, num_groups).
        num_groups (int): number of groups (a few).

    Returns:
        Tensor: int64 [M], ``count[i] = #{j <= i : group[j] == group[i]}``.
    """
    bits = 63 // num_groups
    if group.numel() < (1 << bits):
        # One `bits`-wide counter per group packed into an int64 (group g in bits
        # [g * bits, (g + 1) * bits)): a single 1-D cumsum counts every group at once.
        shift = group.mul(bits)
        counts = torch.bitwise_left_shift(1, shift).cumsum_(0)
        return (counts >> shift).bitwise_and_((1 << bits) - 1)
    one_hot = group[:, None] == torch.arange(num_groups, device=group.device)
    return one_hot.cumsum(0).gather(1, group[:, None]).squeeze(1)


def _rank_within_sorted_groups(
    group: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Like :func:`_count_within_groups` for any number of groups (ids not known on the host), by
    sorting the candidates by (group, position).

    Args:
        group (Tensor): int64 [M], non-negative group id of each candidate.

    Returns:
        order (Tensor): int64 [M], the candidates sorted by (group, position).
        rank (Tensor): int64 [M], aligned with ``order``: 0-based rank of ``order[j]`` inside its
            group, i.e. ``#{i < order[j] : group[i] == group[order[j]]}``.
        num_groups (Tensor): int64 scalar, the number of distinct ids.
    """
    sorted_group, order = torch.sort(group, stable=True)
    position = torch.arange(group.numel(), device=group.device)
    is_first = torch.ones_like(sorted_group, dtype=torch.bool)
    torch.ne(sorted_group[1:], sorted_group[:-1], out=is_first[1:])
    # (torch.searchsorted(sorted_group, sorted_group) would give first_of_group in one call, but
    # it is pathologically slow on CPU with several OpenMP threads.)
    first_of_group = torch.where(is_first, position, 0).cummax(0).values
    return order, position - first_of_group, is_first.count_nonzero()


def _tiered_topk(
    tiers: List[torch.Tensor], k: int, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """
    Positions of ``k`` candidates, taken in increasing tier (a candidate's tier is the number of
    ``tiers`` masks it is in; tier 0 = primary) and uniformly at random inside a tier: a random
    subset of the primary candidates if there are more than ``k``, otherwise all of them and
    random fills.

    Args:
        tiers (list[Tensor]): bool [M] masks.
        k (int): number to pick, ``k <= M``.
        generator (torch.Generator, optional): random generator.

    Returns:
        Tensor: int64 [k], distinct positions into the M candidates.
    """
    # A fresh key in [0, 1), independent of how the tiers were drawn, makes each fill uniform.
    score = torch.rand(tiers[0].numel(), generator=generator, device=tiers[0].device)
    for tier in tiers:
        score += tier
    return torch.topk(score, k, largest=False, sorted=False).indices
