"""Adaptive Training Sample Selection (ATSS, Zhang et al., CVPR 2020): which anchor trains on
which ground-truth box, with an IoU threshold chosen per GT from the statistics of its candidates.

For each GT box:

1. on every FPN level, the ``k`` anchors whose centres are closest (Euclidean distance) to the
   GT's centre are its candidates (all of a level's anchors when it has fewer than ``k``);
2. its IoU threshold is ``mean + std`` of the candidates' IoUs with it (``std`` the unbiased
   sample standard deviation, as ``torch.std`` and mmdetection compute it);
3. a candidate is positive for it if its IoU >= that threshold and the anchor's centre lies
   inside the box, i.e. its smallest distance to the four sides is > ``inside_eps`` (0.01 px,
   mmdetection's rule).

An anchor positive for several GTs goes to the one with the highest IoU; every other anchor is
background. The rule and its constants are those of mmdetection's ``ATSSAssigner``
(``mmdet/models/task_modules/assigners/atss_assigner.py``, ``alpha=None``, no ignored boxes);
this implementation is written independently and vectorised over GTs and anchors (a loop over
FPN levels only).

Two choices where mmdetection leaves the result to chance or to NaN: candidates at equal distance
are taken in anchor order (stable sort; ``torch.topk`` leaves ties unspecified), and a GT with a
single candidate (one level with one anchor) gets ``std = 0`` instead of NaN (which made it
unmatchable in mmdetection).
"""

from dataclasses import dataclass
from typing import Sequence

import torch
from detectron2.structures import Boxes, pairwise_iou
from torch import Tensor

__all__ = ["ATSSAssignment", "atss_assign"]


@dataclass
class ATSSAssignment:
    """ATSS assignment of one image with R anchors and M GT boxes.

    Attributes:
        matched_idxs: (R,) int64, the GT each anchor trains on, -1 for background.
        ious: (R,) IoU of each anchor with its reference GT: the matched GT for a positive, the
            GT of highest IoU for a background anchor (0 when the image has no GT).
        iou_thresholds: (R,) the adaptive IoU threshold (mean + std) of that reference GT;
            ``inf`` when the image has no GT. A positive has ``ious >= iou_thresholds``.
        gt_iou_thresholds: (M,) the adaptive IoU threshold of every GT.
    """

    matched_idxs: Tensor
    ious: Tensor
    iou_thresholds: Tensor
    gt_iou_thresholds: Tensor


@torch.no_grad()
def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    inside_eps: float = 0.01,
) -> ATSSAssignment:
    """ATSS assignment of the anchors of one image to its GT boxes.

    Args:
        anchors: (R, 4) XYXY anchor boxes of every level, concatenated level after level.
        num_anchors_per_level: anchors of each level, summing to R.
        gt_boxes: (M, 4) XYXY GT boxes; M may be 0 (every anchor background).
        topk: k, candidates per GT and level.
        inside_eps: an anchor centre is inside a GT box when its smallest distance to the box's
            sides exceeds this (pixels).

    Returns:
        :class:`ATSSAssignment`.
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if sum(num_anchors_per_level) != num_anchors:
        raise ValueError(
            f"num_anchors_per_level {list(num_anchors_per_level)} does not sum to the "
            f"{num_anchors} anchors"
        )
    anchors, gt_boxes = anchors.float(), gt_boxes.float()
    if num_gt == 0 or num_anchors == 0:
        return ATSSAssignment(
            matched_idxs=torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device),
            ious=anchors.new_zeros(num_anchors),
            iou_thresholds=anchors.new_full((num_anchors,), float("inf")),
            gt_iou_thresholds=gt_boxes.new_full((num_gt,), float("inf")),
        )

    iou = pairwise_iou(Boxes(gt_boxes), Boxes(anchors))  # (M, R)
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (R, 2)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (M, 2)
    distances = (gt_centers[:, None, :] - anchor_centers[None, :, :]).pow(2).sum(-1).sqrt()

    # 1. candidates: per level, the k anchors closest to each GT's centre -> (M, C)
    candidates = []
    start = 0
    for count in num_anchors_per_level:
        if count > 0:
            order = distances[:, start : start + count].sort(dim=1, stable=True).indices
            candidates.append(order[:, : min(topk, count)] + start)
        start += count
    candidates = torch.cat(candidates, dim=1)
    candidate_ious = iou.gather(1, candidates)  # (M, C)

    # 2. adaptive threshold per GT
    if candidates.shape[1] > 1:
        std = candidate_ious.std(dim=1)
    else:
        std = torch.zeros_like(candidate_ious[:, 0])
    gt_thresholds = candidate_ious.mean(dim=1) + std  # (M,)

    # 3. positives: IoU above the threshold and centre inside the GT
    cx, cy = anchor_centers[candidates].unbind(-1)  # each (M, C)
    x0, y0, x1, y1 = (v[:, None] for v in gt_boxes.unbind(-1))
    side_distances = torch.stack([cx - x0, cy - y0, x1 - cx, y1 - cy], dim=-1)
    inside = side_distances.amin(dim=-1) > inside_eps
    is_pos = (candidate_ious >= gt_thresholds[:, None]) & inside  # (M, C)

    # an anchor positive for several GTs trains on the one of highest IoU
    neg_inf = torch.tensor(float("-inf"), device=iou.device)
    positive_ious = torch.full_like(iou, float("-inf"))  # (M, R)
    positive_ious.scatter_(1, candidates, torch.where(is_pos, candidate_ious, neg_inf))
    best, best_gt = positive_ious.max(dim=0)  # (R,)
    matched_idxs = torch.where(best > float("-inf"), best_gt, torch.full_like(best_gt, -1))

    reference = torch.where(matched_idxs >= 0, matched_idxs, iou.argmax(dim=0))  # (R,)
    return ATSSAssignment(
        matched_idxs=matched_idxs,
        ious=iou.gather(0, reference[None]).squeeze(0),
        iou_thresholds=gt_thresholds[reference],
        gt_iou_thresholds=gt_thresholds,
    )
