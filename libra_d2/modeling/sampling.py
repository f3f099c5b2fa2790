"""
IoU-balanced sampling of second-stage training proposals (Libra R-CNN, arXiv 1904.02701, Sec. 3.1).

:func:`iou_balanced_subsample` is a drop-in replacement for
:func:`detectron2.modeling.sampling.subsample_labels` that draws negatives evenly over IoU bins and
positives evenly over ground-truth objects. It is written with about twenty whole-tensor torch
operations on the input's device (no numpy, no Python sets, no per-bin host synchronisation).
"""

import functools
import itertools
import math
from typing import Callable, List, Optional, Tuple

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

    Implementation (negatives): one ``bucketize`` gives every proposal its group (IoU bin, floor
    set, or "not a negative"); the proposals are shuffled once (``randperm``) and one cumulative
    sum of per-group counters packed into an int64 ranks each one inside its group in that order
    (a one-hot cumsum if the counters would not fit). Its last element holds the group sizes,
    read back to the host, where the per-group numbers are worked out exactly as the official
    loops do: ``min(cap, size)`` per bin, and a shortfall split over the groups' leftovers by a
    multivariate hypergeometric draw (what a uniform fill from the union of the leftovers gives;
    only drawn when two or more groups have leftovers). Taking the first ``limit[g]`` members of
    each group in the shuffled order is then a uniformly random subset of that size, so the
    result has the distribution of the official sampler; one subtraction and one bit test on
    the packed counters select them. Positives (only when there are more than ``q``): shuffled,
    ranked inside their ground truth by a sort, and a ``topk`` over ``fresh uniform key +
    (rank >= cap)`` keeps the primary ones first. There is no Python loop over proposals and no
    tensor operation per bin (only the host arithmetic on a few ints loops over bins); the host
    reads the positive count (``nonzero``, as ``subsample_labels``), the maximum IoU and the
    packed group sizes, plus the hypergeometric split when one is drawn.

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
    * Bin membership uses the official ``lo + i * width <= iou`` comparisons, but the edges are
      computed in float64 and rounded once to the IoUs' dtype, so an IoU within rounding error of
      an edge can land in the neighbouring bin.
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

    is_neg = labels == bg_label
    # (labels != -1) is true for positives and negatives; xor with is_neg leaves the positives.
    positive = torch.nonzero(labels.ne(-1).logical_xor_(is_neg)).squeeze(1)
    num_pos = min(int(num_samples * positive_fraction), positive.numel())

    if num_pos == positive.numel():
        pos_idx = positive
    elif instance_balanced_pos:
        pos_idx = _instance_balanced_positives(positive, matched_idxs, num_pos, generator)
    else:
        perm = torch.randperm(positive.numel(), device=positive.device, generator=generator)
        pos_idx = positive.index_select(0, perm[:num_pos])
    neg_idx = _iou_balanced_negatives(
        is_neg, max_ious, num_samples - num_pos, num_bins, floor_thr, floor_fraction, generator
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
    first, then at random from the rest (see :func:`iou_balanced_subsample`); ``k`` is less
    than ``positive.numel()`` (the caller returns all positives otherwise).
    """
    if k == 0:
        return positive[:0]
    perm = torch.randperm(positive.numel(), device=positive.device, generator=generator)
    cand = positive.index_select(0, perm)
    # The number of ground truths is unknown on the host: rank by sorting (few candidates).
    order, rank, num_gt = _rank_within_sorted_groups(matched_idxs.index_select(0, cand))
    # rank < round(k / G) + 1, with round-half-to-even in float64 like the official Python round().
    non_primary = rank > torch.div(k, num_gt.to(torch.float64)).round_()
    return cand.index_select(0, order.index_select(0, _primary_first(non_primary, k, generator)))


def _iou_balanced_negatives(
    is_neg: torch.Tensor,
    max_ious: torch.Tensor,
    quota: int,
    num_bins: int,
    floor_thr: float,
    floor_fraction: float,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """
    Indices of ``min(quota, #negatives)`` negatives, IoU-balanced with an optional floor set
    (see :func:`iou_balanced_subsample`).

    Args:
        is_neg (Tensor): bool [N], which proposals are negatives.
        max_ious (Tensor): float [N].
        quota (int): number of negatives wanted.

    Returns:
        Tensor: int64 [min(quota, #negatives)], indices into the N proposals.
    """
    num_props = is_neg.numel()
    device = is_neg.device
    if num_props == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    # Group of every proposal: IoU bins 0 .. num_bins - 1 over [lo, max IoU of all proposals)
    # (half-open like the official bins; the top value goes to the last bin), then the floor set
    # (if any), then one last group for the non-negatives, which are never picked.
    lo = max(floor_thr, 0.0)
    width = max(float(max_ious.max()) - lo, 1e-12) / num_bins  # host read 1 of 2
    num_groups = num_bins + (floor_thr >= 0)
    # The non-negatives get IoU inf, past the last edge (inf), behind the floor group.
    edges, inf = _bin_edges(lo, width, num_bins, num_groups - num_bins + 1, max_ious.dtype, device)
    ious = torch.where(is_neg, max_ious, inf)
    group = torch.bucketize(ious, edges, right=True)
    if floor_thr >= 0:
        group.masked_fill_(ious == 0 if floor_thr == 0 else ious < floor_thr, num_bins)

    # Shuffle once; the first `limit[g]` members of group g in this order are a uniformly random
    # subset of it.
    perm = torch.randperm(num_props, device=device, generator=generator)
    group = group.index_select(0, perm)
    sizes, take_first = _group_ranks(group, num_groups)  # host read 2 of 2
    num_neg = sum(sizes)
    k = min(quota, num_neg)

    # Primary picks: min(cap, size) per group. The shortfall is drawn uniformly from the
    # IoU-sampling leftovers first, then from the floor leftovers; only how many of the draws land
    # in each group matters (a multivariate hypergeometric split).
    num_balanced = int(k * (1 - floor_fraction))  # official: int(num_expected * (1 - fraction))
    caps = [int(num_balanced / num_bins)] * num_bins
    if floor_thr >= 0:
        caps.append(k - min(num_neg - sizes[num_bins], num_balanced))
    primary = [min(c, n) for c, n in zip(caps, sizes)]
    leftover = [n - p for n, p in zip(sizes, primary)]
    shortfall = k - sum(primary)
    from_bins = min(shortfall, sum(leftover[:num_bins]))
    fill = _hypergeometric_split(leftover[:num_bins], from_bins, device, generator)
    fill += [shortfall - from_bins] * (num_groups - num_bins)
    keep = take_first([p + f for p, f in zip(primary, fill)])
    return perm.index_select(0, keep)


def _group_ranks(
    group: torch.Tensor, num_groups: int
) -> Tuple[List[int], Callable[[List[int]], torch.Tensor]]:
    """
    Group sizes, and a selector of each group's first members in the order given.

    Args:
        group (Tensor): int64 [M], M >= 1, group id of each candidate in [0, num_groups]; the
            candidates of group ``num_groups`` are not counted and never selected.
        num_groups (int): number of counted groups (a few).

    Returns:
        sizes (list[int]): the ``num_groups`` group sizes, read back to the host.
        take_first (callable): ``take_first(limits)``, ``limits`` a list of ``num_groups`` ints,
            returns the int64 positions ``i`` with ``rank[i] <= limits[group[i]]``, where
            ``rank[i] = #{j <= i : group[j] == group[i]}``, in increasing order.
    """
    bits = 63 // num_groups
    half = 1 << (bits - 1)
    if group.numel() >= half:
        one_hot = group[:, None] == torch.arange(num_groups, device=group.device)
        counts = one_hot.cumsum(0)
        rank = counts.gather(1, group.clamp(max=num_groups - 1)[:, None]).squeeze(1)

        def take_first(limits: List[int]) -> torch.Tensor:
            limit = torch.tensor(limits + [-1], device=group.device).index_select(0, group)
            return torch.nonzero(rank <= limit).squeeze(1)

        return counts[-1].tolist(), take_first

    # One `bits`-wide counter per group packed into an int64 (group g in bits
    # [g * bits, (g + 1) * bits)): a single 1-D cumsum counts every group at once, and its last
    # element holds all the group sizes.
    unit = _packed_units(num_groups, bits, group.device).index_select(0, group)
    counts = unit.cumsum(0)
    total = int(counts[-1])
    sizes = [(total >> (g * bits)) & (2 * half - 1) for g in range(num_groups)]

    def take_first(limits: List[int]) -> torch.Tensor:
        # Field g of `offset - counts` is limits[g] + half - rank: its top bit (value `half`) is
        # set exactly when rank <= limits[g]. No field borrows (rank <= M < half) or overflows
        # (limits[g] <= M < half), so one subtraction tests every group at once; `unit * half`
        # picks the top bit of each candidate's own field (0 for the uncounted group).
        offset = sum((limit + half) << (g * bits) for g, limit in enumerate(limits))
        return torch.nonzero(torch.rsub(counts, offset).bitwise_and_(unit.mul_(half))).squeeze(1)

    return sizes, take_first


@functools.lru_cache(maxsize=64)
def _bin_edges(
    lo: float, width: float, num_bins: int, num_inf: int, dtype: torch.dtype, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Read-only [num_bins - 1 + num_inf]: ``lo + i * width`` for i = 1 .. num_bins - 1, then
    ``num_inf`` times inf; and a 0-d inf. Cached: during training the maximum IoU is 1.0 (ground
    truth appended as proposals), so the edges are the same on every call.
    """
    edges = [lo + i * width for i in range(1, num_bins)] + [math.inf] * num_inf
    edges = torch.tensor(edges, dtype=dtype, device=device)
    return edges, edges[-1]


@functools.lru_cache(maxsize=32)
def _packed_units(num_groups: int, bits: int, device: torch.device) -> torch.Tensor:
    """int64 [num_groups + 1]: 2 ** (g * bits) for each counted group g, then 0 (read-only)."""
    return torch.tensor([1 << (g * bits) for g in range(num_groups)] + [0], device=device)


def _hypergeometric_split(
    sizes: List[int], n: int, device: torch.device, generator: Optional[torch.Generator]
) -> List[int]:
    """
    How many members of each category a uniformly random ``n``-subset of a population holds,
    the population having ``sizes[c]`` members in category ``c`` (``n <= sum(sizes)``).

    Deterministic (no random draw) when ``n`` is 0 or everything, or when only one category has
    members -- the usual case for IoU-balanced negatives, where only the lowest bin overflows.
    """
    total = sum(sizes)
    if n == total:
        return list(sizes)
    if n == 0 or max(sizes) == total:  # nothing to draw, or a single non-empty category
        return [n if s == total else 0 for s in sizes]
    drawn = torch.randperm(total, device=device, generator=generator)[:n]
    edges = torch.tensor(list(itertools.accumulate(sizes[:-1])), device=device)
    counts = torch.bucketize(drawn, edges, right=True).bincount(minlength=len(sizes))
    return counts.tolist()


def _rank_within_sorted_groups(
    group: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Like :func:`_group_ranks` for any number of groups (ids not known on the host), by
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


def _primary_first(
    non_primary: torch.Tensor, k: int, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """
    Positions of ``k`` candidates: a uniformly random subset of the primary ones if there are
    more than ``k``, otherwise all of them plus a uniformly random fill from the others.

    Args:
        non_primary (Tensor): bool [M].
        k (int): number to pick, ``k <= M``.
        generator (torch.Generator, optional): random generator.

    Returns:
        Tensor: int64 [k], distinct positions into the M candidates.
    """
    # A fresh key in [0, 1), independent of how the primaries were drawn, makes the fill uniform.
    score = torch.rand(non_primary.numel(), generator=generator, device=non_primary.device)
    return torch.topk(score.add_(non_primary), k, largest=False, sorted=False).indices
