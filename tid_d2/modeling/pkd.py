"""PKD: imitation of Pearson-normalised FPN features (Cao et al., "PKD: General Distillation
Framework for Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022).

Each distilled level's teacher and (adapted) student features are standardised per channel over
all locations of the batch (zero mean, unit sample std over N x H x W, as mmrazor's
``mmrazor/models/losses/pkd_loss.py`` does), then compared by MSE / 2, uniformly over locations:

    L_l = w / 2 * mean_{n, c, h, w} ( z(phi_l(F^S_l)) - z(F^T_l) )^2

which is ``w * (1 - r)`` per channel with r the Pearson correlation of the two feature maps. The
standardisation makes the loss blind to the scale and offset of each teacher channel, which is
what PKD adds over plain imitation (``fitnet``) for heterogeneous teacher / student pairs.

Departures from the reference (docs/method.md): statistics and the mean run over the valid
(unpadded) locations only, so padding does not enter them; a 1x1 adapter phi_l bridges different
widths (PKD's configs pair equal widths and use none).
"""

from typing import Dict

import torch

from .imitation import LevelImitation, LevelInputs

__all__ = [
    "PKD_LOSS_WEIGHTS",
    "pkd_default_loss_weight",
    "pearson_normalize",
    "pkd_loss",
    "PKDImitation",
]

# mmrazor's configs/distill/mmdet/pkd/: loss_weight 6 for Faster R-CNN students
# (pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py), 10 for dense students
# (pkd_fpn_retina_x101_retina_r50_2x_coco.py, pkd_fpn_fcos_x101_retina_r50_1x_coco.py).
PKD_LOSS_WEIGHTS = {"GeneralizedRCNN": 6.0}
_PKD_DENSE_LOSS_WEIGHT = 10.0


def pkd_default_loss_weight(student_meta_architecture: str) -> float:
    """PKD's published loss weight for a student of this meta-architecture (dense: 10)."""
    return PKD_LOSS_WEIGHTS.get(student_meta_architecture, _PKD_DENSE_LOSS_WEIGHT)


def pearson_normalize(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each channel over the valid locations of the whole batch.

    Args:
        x: (N, C, H, W) features (any float dtype; computed in fp32).
        valid: (N, H, W) bool, locations inside the unpadded images.
    Returns:
        (N, C, H, W) fp32: (x - mean_c) / (std_c + eps), mean and sample std of channel c over
        the valid (n, h, w); 0 at invalid locations.
    """
    x = x.float()
    v = valid[:, None].to(x.dtype)  # (N, 1, H, W)
    count = v.sum()
    mean = (x * v).sum(dim=(0, 2, 3), keepdim=True) / count.clamp(min=1.0)
    var = ((x - mean).pow(2) * v).sum(dim=(0, 2, 3), keepdim=True) / (count - 1).clamp(min=1.0)
    return (x - mean) / (var.sqrt() + eps) * v


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """PKD's loss of one level before its weight: MSE / 2 of the standardised features over the
    valid locations and all channels.

    Args:
        student: (N, C, H, W) adapted student features (with grad).
        teacher: (N, C, H, W) teacher features (detached here).
        valid: (N, H, W) bool.
    Returns:
        scalar fp32.
    """
    s = pearson_normalize(student, valid)
    t = pearson_normalize(teacher.detach(), valid)
    n = valid.sum().clamp(min=1) * student.shape[1]
    return (s - t).pow(2).sum() / n / 2


class PKDImitation(LevelImitation):
    """``TID.MODE pkd``: :func:`pkd_loss` per level (no parameters of its own)."""

    def forward(self, level: str, student, teacher, inputs: LevelInputs) -> Dict[str, torch.Tensor]:
        """{"loss_tid_<level>": loss} before lambda."""
        with torch.autocast(student.device.type, enabled=False):
            return {f"loss_tid_{level}": pkd_loss(student, teacher, inputs.valid)}
