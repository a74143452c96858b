"""DIEM: dual-task significance of predictions (docs/method.md, section 1).

Pure tensor maths, no detectron2 models: a probe (``probes.py``) turns a detector's head outputs
into predicted boxes and class probabilities, and the functions here score them:

    Score_r = tier(IoU_max(b_i, GT); t_neg, t_pos)       localization
    Score_c = tier(q_i; s_neg, s_pos)                    classification
    Sig_i   = Score_c * Score_r                          in [0.16, 4.0] with the default tiers

Everything runs under ``torch.no_grad()`` and in fp32, whatever dtype the inputs have, so it is
safe under AMP.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou

__all__ = [
    "SigParams",
    "tier",
    "match_to_gt",
    "classification_quality",
    "significance",
    "paint_boxes",
]

# Upper bound of elements of one IoU block (images x predictions x GT boxes): 4M floats = 16 MB.
_IOU_BLOCK = 1 << 22


def _batched_box_iou():
    """torchvision's ``box_iou`` over a leading batch dimension: (N, M, 4) x (N, G, 4) ->
    (N, M, G). Recent torchvision broadcasts over leading dimensions itself; older releases only
    take 2-D inputs, so there it is vectorised with ``torch.vmap``."""
    try:
        if box_iou(torch.zeros(2, 1, 4), torch.zeros(2, 3, 4)).shape == (2, 1, 3):
            return box_iou
    except (IndexError, RuntimeError):
        pass
    return torch.vmap(box_iou)


_box_iou_nmg = _batched_box_iou()


@dataclass(frozen=True)
class SigParams:
    """Thresholds and tier values of one model's significance.

    Attributes:
        iou_thresholds: (t_neg, t_pos) of Score_r.
        cls_thresholds: (s_neg, s_pos) of Score_c.
        values: (low, mid, high) tier values, 0.4 / 1.5 / 2.0 in the paper.
        use_cls: False replaces Score_c by ``ablated_score`` (the ``reg_only`` variant).
        use_reg: False replaces Score_r by ``ablated_score`` (the ``cls_only`` variant).
        ablated_score: value of a switched-off score.
    """

    iou_thresholds: Tuple[float, float]
    cls_thresholds: Tuple[float, float] = (0.2, 0.5)
    values: Tuple[float, float, float] = (0.4, 1.5, 2.0)
    use_cls: bool = True
    use_reg: bool = True
    ablated_score: float = 2.0

    def __post_init__(self):
        for name in ("iou_thresholds", "cls_thresholds"):
            lo, hi = getattr(self, name)
            if not (0.0 <= lo <= hi <= 1.0):
                raise ValueError(
                    f"significance {name} must satisfy 0 <= low <= high <= 1, got ({lo}, {hi}); "
                    "fix TID.SIG.* or the detector's IOU_THRESHOLDS."
                )
        if len(self.values) != 3:
            raise ValueError(f"TID.SIG.SCORE_VALUES needs 3 values, got {list(self.values)}")


def tier(
    x: torch.Tensor,
    lo: Union[float, torch.Tensor],
    hi: Union[float, torch.Tensor],
    values: Sequence[float],
) -> torch.Tensor:
    """Three-tier score: ``values[2]`` if x >= hi, ``values[1]`` if lo < x < hi, else ``values[0]``.

    Args:
        x: any shape, fp32.
        lo, hi: numbers, or tensors of x's shape (per-prediction thresholds, e.g. ATSS's).
    Returns:
        Tensor of x's shape and dtype.
    """
    low, mid, high = (float(v) for v in values)
    out = torch.full_like(x, low)
    out = torch.where(x > lo, torch.full_like(x, mid), out)
    return torch.where(x >= hi, torch.full_like(x, high), out)


@torch.no_grad()
def match_to_gt(
    pred_boxes: List[torch.Tensor],
    gt_boxes: List[torch.Tensor],
    gt_classes: List[torch.Tensor],
    return_index: bool = False,
) -> Tuple[List[torch.Tensor], ...]:
    """Best-overlapping GT of every predicted box, within its own image (as detectron2's matchers).

    Vectorised over the batch: predictions and GT are padded to the largest image's counts and
    one (N, M, G) IoU tensor is built, in blocks of predictions so that a block has at most
    ``_IOU_BLOCK`` elements (an image with thousands of GT boxes needs a bounded amount of
    memory). Padded GT columns never win; ties go to the first GT of the image.

    Args:
        pred_boxes: per image, (M_i, 4) XYXY boxes.
        gt_boxes: per image, (G_i, 4) XYXY boxes; G_i may be 0.
        gt_classes: per image, (G_i,) int64 class ids.
    Returns:
        iou_max: per image, (M_i,) fp32, 0 where the image has no GT.
        matched_class: per image, (M_i,) int64 class of the best GT, -1 where the image has no GT.
        matched_index: with ``return_index``, per image, (M_i,) int64 index of the best GT in
            the image's list, -1 where the image has no GT.
    """
    n = len(pred_boxes)
    if n == 0:
        return [], []
    device = pred_boxes[0].device
    counts = [int(b.shape[0]) for b in pred_boxes]
    g_counts = torch.tensor([int(g.shape[0]) for g in gt_boxes], device=device)
    g_max = max(int(g.shape[0]) for g in gt_boxes)
    if g_max == 0 or max(counts) == 0:
        best = torch.zeros(n, max(counts), device=device)
        best_cls = torch.full((n, max(counts)), -1, dtype=torch.long, device=device)
        best_idx = best_cls.clone()
    else:
        preds = pad_sequence(pred_boxes, batch_first=True).float()  # (N, M, 4)
        gts = pad_sequence(gt_boxes, batch_first=True).to(device, torch.float32)  # (N, G, 4)
        cls = pad_sequence(gt_classes, batch_first=True).to(device)  # (N, G)
        padded_gt = torch.arange(g_max, device=device)[None, None, :] >= g_counts[:, None, None]
        rows = max(1, _IOU_BLOCK // (n * g_max))
        best_parts, idx_parts = [], []
        for r0 in range(0, preds.shape[1], rows):
            # zero-area boxes give 0/0: no overlap; padded GT: -1, below any real IoU
            iou = _box_iou_nmg(preds[:, r0 : r0 + rows], gts).nan_to_num_(0.0)
            v, i = iou.masked_fill_(padded_gt, -1.0).max(dim=2)
            best_parts.append(v)
            idx_parts.append(i)
        best = torch.cat(best_parts, dim=1)  # (N, M); -1 in images without GT
        idx = torch.cat(idx_parts, dim=1)
        best_cls = torch.where(best >= 0, cls.gather(1, idx), torch.full_like(idx, -1))
        best_idx = torch.where(best >= 0, idx, torch.full_like(idx, -1))
        best = best.clamp(min=0)
    outputs = (best, best_cls, best_idx) if return_index else (best, best_cls)
    if len(set(counts)) == 1:
        return tuple(list(x.unbind(0)) for x in outputs)
    return tuple([x[:m] for x, m in zip(t, counts)] for t in outputs)


@torch.no_grad()
def classification_quality(
    probs: torch.Tensor, matched_class: torch.Tensor, is_foreground: torch.Tensor, background: str
) -> torch.Tensor:
    """q_i: the model's confidence in the right answer at each prediction.

    Args:
        probs: (..., C) probabilities. Sigmoid heads: C foreground classes (C = 1 for the RPN's
            class-agnostic objectness). Softmax heads: C = K + 1 with background last.
        matched_class: (...) int64 class of the matched GT (-1 or anything where background).
        is_foreground: (...) bool, IoU_max > t_neg.
        background: "sigmoid" -> q = 1 - max over foreground classes where background;
            "softmax" -> q = the background column.
    Returns:
        (...) fp32 q in [0, 1].
    """
    probs = probs.float()
    num_fg = probs.shape[-1] - (1 if background == "softmax" else 0)
    idx = matched_class.clamp(min=0, max=num_fg - 1).unsqueeze(-1)
    q_fg = probs.gather(-1, idx).squeeze(-1)
    if background == "sigmoid":
        q_bg = 1.0 - probs.max(dim=-1).values
    elif background == "softmax":
        q_bg = probs[..., -1]
    else:
        raise ValueError(f"unknown background mode {background!r}")
    return torch.where(is_foreground, q_fg, q_bg)


@torch.no_grad()
def significance(
    iou_max: torch.Tensor,
    probs: torch.Tensor,
    matched_class: torch.Tensor,
    params: SigParams,
    background: str,
    iou_thresholds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Sig_i = Score_c,i * Score_r,i for a batch of predictions.

    Args:
        iou_max: (...) fp32 best IoU of each predicted box with the GT of its image.
        probs, matched_class, background: see :func:`classification_quality`.
        iou_thresholds: per-prediction (t_neg, t_pos), each of iou_max's shape, instead of
            ``params.iou_thresholds`` (ATSS / GFL: the adaptive threshold of the matched GT).
    Returns:
        (...) fp32 significance.
    """
    iou_max = iou_max.float()
    t_neg, t_pos = params.iou_thresholds if iou_thresholds is None else iou_thresholds
    s_neg, s_pos = params.cls_thresholds
    if params.use_reg:
        score_r = tier(iou_max, t_neg, t_pos, params.values)
    else:
        score_r = torch.full_like(iou_max, params.ablated_score)
    if params.use_cls:
        q = classification_quality(probs, matched_class, iou_max > t_neg, background)
        score_c = tier(q, s_neg, s_pos, params.values)
    else:
        score_c = torch.full_like(iou_max, params.ablated_score)
    return score_c * score_r


@torch.no_grad()
def paint_boxes(
    boxes: torch.Tensor,
    values: torch.Tensor,
    batch_idx: torch.Tensor,
    shape: Tuple[int, int, int],
    stride: int,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Paint a value over each box's footprint on a feature map, keeping the max per location.

    The footprint of a box is every cell [x*s, (x+1)*s) x [y*s, (y+1)*s) that it overlaps, so a
    box smaller than a cell still covers the cell it lies in.

    Args:
        boxes: (R, 4) XYXY boxes in input-image pixels.
        values: (R,) values to paint (>= 0).
        batch_idx: (R,) int64 image index of each box.
        shape: (N, H, W) of the output map.
        stride: the feature map's stride in pixels.
        max_elements: bound of the (boxes x H x W) block built at once.
    Returns:
        (N, H, W) fp32 map, 0 where no box lies.
    """
    n, h, w = shape
    device = boxes.device
    out = torch.zeros(n, h, w, device=device)
    if boxes.numel() == 0:
        return out
    boxes = boxes.float()
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride
    chunk = max(1, max_elements // max(1, h * w))
    for r0 in range(0, boxes.shape[0], chunk):
        b = boxes[r0 : r0 + chunk]
        in_x = (xs[None, :] < b[:, 2:3]) & (xs[None, :] + stride > b[:, 0:1])  # (r, W)
        in_y = (ys[None, :] < b[:, 3:4]) & (ys[None, :] + stride > b[:, 1:2])  # (r, H)
        inside = in_y[:, :, None] & in_x[:, None, :]  # (r, H, W)
        painted = (inside.float() * values[r0 : r0 + chunk].float()[:, None, None]).view(len(b), -1)
        index = batch_idx[r0 : r0 + chunk, None].expand(-1, h * w)
        out.view(n, h * w).scatter_reduce_(0, index, painted, "amax", include_self=True)
    return out
