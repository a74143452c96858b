"""The two losses of Generalized Focal Loss (Li et al., NeurIPS 2020) and the integral decoding of
its box distributions, as plain functions (no reduction: callers weight and normalise).

Definitions as in the paper and mmdetection (``mmdet/models/losses/gfocal_loss.py``,
``mmdet/models/dense_heads/gfl_head.py``), written independently.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["quality_focal_loss", "distribution_focal_loss", "integral_distances"]


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Quality Focal Loss, elementwise: ``BCE(sigmoid(x), y) * |y - sigmoid(x)| ** beta``.

    Args:
        logits: (..., K) class-quality logits x.
        targets: (..., K) soft targets y in [0, 1]: at a positive location its class holds the
            IoU of the predicted box with its GT, every other entry is 0.
        beta: the focusing exponent.

    Returns:
        (..., K) fp32 losses (the modulating factor is differentiated too, as in the paper).
    """
    logits, targets = logits.float(), targets.float()
    modulator = (targets - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulator


def distribution_focal_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Distribution Focal Loss: cross-entropy towards the two bins around a continuous target,
    ``(y_r - y) * CE(logits, y_l) + (y - y_l) * CE(logits, y_r)``, y_l = floor(y), y_r = y_l + 1.

    Args:
        logits: (P, n + 1) logits over the bins 0..n of one side's distance.
        targets: (P,) distances y in [0, n] (in bins; a target of n puts all weight on bin n).

    Returns:
        (P,) fp32 losses.
    """
    logits, targets = logits.float(), targets.float()
    left = targets.floor()
    weight_left = left + 1 - targets
    weight_right = targets - left
    left = left.long()
    right = (left + 1).clamp(max=logits.shape[-1] - 1)
    log_probs = logits.log_softmax(dim=-1)
    nll_left = -log_probs.gather(-1, left[:, None]).squeeze(-1)
    nll_right = -log_probs.gather(-1, right[:, None]).squeeze(-1)
    return weight_left * nll_left + weight_right * nll_right


def integral_distances(logits: Tensor, reg_max: int) -> Tensor:
    """Expected distances of the box distributions: softmax over the bins, then sum_i p_i * i.

    Args:
        logits: (..., 4 * (reg_max + 1)) per location, the left, top, right and bottom sides'
            bin logits one after the other.
        reg_max: n, the last bin.

    Returns:
        (..., 4) distances in [0, reg_max] (in bins, i.e. strides of the level).
    """
    probs = logits.unflatten(-1, (4, reg_max + 1)).softmax(dim=-1)
    bins = torch.arange(reg_max + 1, device=logits.device, dtype=probs.dtype)
    return (probs * bins).sum(dim=-1)
