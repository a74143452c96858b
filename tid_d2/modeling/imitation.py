"""SFDM: region-weighted FPN feature imitation (docs/method.md, section 3).

    L_l = lambda * sum_r alpha_r / (|r| * C_T) * sum_{i in r} || phi_l(F^S_l)_i - F^T_l,i ||^2

Each region is normalised by its own location count over the whole batch, so the loss does not
change when the same images are repeated in a batch, nor with the number of objects per image.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "LevelInputs",
    "LevelImitation",
    "RegionImitation",
    "FeatureAdapters",
    "REGION_NORMALIZERS",
    "check_feature_norm",
    "check_region_normalize",
    "normalize_features",
    "region_counts",
    "region_imitation_loss",
]


ADAPTER_INITS = ("kaiming", "orthogonal")
# TID.REGION.NORMALIZE values: |r| per level, pooled over levels, or the level's location count
REGION_NORMALIZERS = ("level", "all_levels", "locations")


class FeatureAdapters(nn.Module):
    """phi_l: one 1x1 conv per distilled level (identity when widths match and mode is "auto").

    Held in an ``nn.ModuleDict`` so the adapters are trained, saved and moved with the model.
    """

    def __init__(
        self,
        student_channels: Dict[str, int],
        teacher_channels: Dict[str, int],
        mode="auto",
        init="kaiming",
        trainable=True,
    ):
        """
        Args:
            student_channels, teacher_channels: {level: C_S} and {level: C_T}.
            mode: "auto" (a conv only where C_S != C_T) or "conv" (everywhere).
            init: the conv weights' start (see TID.ADAPTER_INIT): "kaiming" (uniform, std
                1/sqrt(C_S)) or "orthogonal" (a (C_T, C_S) matrix with orthonormal columns, or
                rows when C_T < C_S: every singular value 1, so no student direction is lost or
                amplified at the start). Biases start at 0.
            trainable: False keeps every conv at its start (``requires_grad=False``): a fixed
                projection, saved in checkpoints like a trained one (see TID.ADAPTER_TRAIN).
        """
        super().__init__()
        if mode not in ("auto", "conv"):
            raise ValueError(f"TID.ADAPTER must be 'auto' or 'conv', got {mode!r}")
        if init not in ADAPTER_INITS:
            raise ValueError(f"TID.ADAPTER_INIT must be one of {ADAPTER_INITS}, got {init!r}")
        self.adapters = nn.ModuleDict()
        for level, c_s in student_channels.items():
            c_t = teacher_channels[level]
            if mode == "conv" or c_s != c_t:
                conv = nn.Conv2d(c_s, c_t, kernel_size=1)
                if init == "orthogonal":
                    nn.init.orthogonal_(conv.weight)
                else:
                    nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                conv.requires_grad_(trainable)
                self.adapters[level] = conv

    def forward(self, level: str, x: torch.Tensor) -> torch.Tensor:
        """(N, C_S, H, W) -> (N, C_T, H, W)."""
        return self.adapters[level](x) if level in self.adapters else x


FEATURE_NORMS = ("none", "channel")


def check_feature_norm(mode: str) -> str:
    """``mode`` if it is a ``TID.FEATURE_NORM`` value, else a ValueError naming the choices."""
    if mode not in FEATURE_NORMS:
        raise ValueError(f"TID.FEATURE_NORM must be 'none' or 'channel', got {mode!r}")
    return mode


def check_region_normalize(rule: str) -> str:
    """``rule`` if it is a ``TID.REGION.NORMALIZE`` value, else a ValueError naming the choices."""
    if rule not in REGION_NORMALIZERS:
        raise ValueError(f"TID.REGION.NORMALIZE must be one of {REGION_NORMALIZERS}, got {rule!r}")
    return rule


def normalize_features(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``mode`` "none": x; "channel": (N, C, H, W) -> zero mean, unit std per image and channel
    (sample std; a 1x1 level, e.g. P7 of a small image, has nothing left after the mean: 0)."""
    if check_feature_norm(mode) == "none":
        return x
    x = x.float()
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, correction=1 if x.shape[2] * x.shape[3] > 1 else 0)
    return (x - mean) / (std + 1e-6)


def region_counts(
    levels: List[List[Tuple[str, torch.Tensor, float]]],
    normalize: str = "level",
    world_size: int = 1,
) -> List[torch.Tensor]:
    """|r|: the normaliser of every region of every level, for this process's loss.

    Args:
        levels: per distilled level, its regions [(name, mask (N, H, W) bool, alpha)].
        normalize: the rule (``TID.REGION.NORMALIZE``):
            "level": each region by its own location count (the method doc's SFDM);
            "all_levels": the regions of one name (e.g. "key" of every level) share one count,
            their total, so a location weighs the same whatever its level;
            "locations": every region of a level by the level's location count (the union of
            its masks), so a location weighs alpha_r / (N H W) as in uniform imitation.
        world_size: with > 1 the counts are summed over all processes and divided by the world
            size: DDP averages the processes' gradients, so each process then contributes
            exactly its share of the loss that one process would compute on the whole global
            batch, and the loss does not depend on how many images each GPU holds. One
            all-reduce for all levels.
    Returns:
        per level, (R_l,) fp32 counts, at least 1 / world_size.
    """
    check_region_normalize(normalize)
    regions = [r for level in levels for r in level]
    sizes = [len(level) for level in levels]
    if normalize == "locations":  # each level's union once, repeated for its regions
        unions = [torch.stack([mask for _, mask, _ in level]).any(dim=0).sum() for level in levels]
        counts = torch.stack([u for u, n in zip(unions, sizes) for _ in range(n)]).float()
    else:
        counts = torch.stack([mask.sum() for _, mask, _ in regions]).float()
    if world_size > 1:
        torch.distributed.all_reduce(counts)
    if normalize == "all_levels":
        names = [name for name, _, _ in regions]
        totals: Dict[str, torch.Tensor] = {}
        for name, c in zip(names, counts):
            totals[name] = totals[name] + c if name in totals else c
        counts = torch.stack([totals[name] for name in names])
    return list((counts.clamp(min=1.0) / world_size).split(sizes))


def region_imitation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    regions: List[Tuple[str, torch.Tensor, float]],
    counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Region-normalised squared error of one level, in fp32.

    Args:
        student: (N, C, H, W) adapted student features (any float dtype; with grad).
        teacher: (N, C, H, W) teacher features.
        regions: [(name, mask (N, H, W) bool, alpha)].
        counts: (R,) normalisers from :func:`region_counts` (default: this batch's counts, rule
            "level").
    Returns:
        scalar fp32 loss (before lambda).
    """
    if counts is None:
        counts = region_counts([regions])[0]
    diff = (student.float() - teacher.float().detach()).pow(2).sum(dim=1)  # (N, H, W)
    with torch.no_grad():  # one weight per location: sum over its regions of alpha_r / |r|
        weight = torch.zeros_like(diff)
        for (_name, mask, alpha), count in zip(regions, counts):
            if alpha != 0:
                weight.add_(mask * (alpha / count))
    return (diff * weight).sum() / teacher.shape[1]


@dataclass
class LevelInputs:
    """What an imitation method may use at one distilled level besides the two feature maps.

    valid: (N, H, W) bool, cells inside the unpadded images; regions: the mode's
    [(name, mask (N, H, W) bool, alpha)]; counts: (R,) their normalisers
    (:func:`region_counts`); gt_boxes: (B, 4) XYXY input-pixel GT boxes of all images,
    gt_batch_idx: (B,) int64 image of each; stride: the level's stride.
    """

    valid: torch.Tensor
    regions: List[Tuple[str, torch.Tensor, float]]
    counts: torch.Tensor
    gt_boxes: torch.Tensor
    gt_batch_idx: torch.Tensor
    stride: int


class LevelImitation(nn.Module):
    """An imitation method: ``forward(level, student, teacher, inputs)`` -> {loss name: scalar}
    before lambda, with student (N, C_T, H, W) adapted features and teacher (N, C_T, H, W).
    A method with parameters (FGD's GcBlocks) is saved under ``tid_loss.`` in TID checkpoints."""

    def pop_log(self) -> Dict[str, float]:
        """Scalars to log for the last step (e.g. a method's separate terms); cleared."""
        return {}


class RegionImitation(LevelImitation):
    """SFDM (``tid`` and every mode that shares its masks: ``fitnet``, ``gt_mask``, the
    ablations): :func:`region_imitation_loss` on features normalised by ``TID.FEATURE_NORM``."""

    def __init__(self, feature_norm: str = "none"):
        super().__init__()
        self.feature_norm = check_feature_norm(feature_norm)

    def forward(self, level, student, teacher, inputs: LevelInputs) -> Dict[str, torch.Tensor]:
        s = normalize_features(student, self.feature_norm)
        t = normalize_features(teacher, self.feature_norm)
        return {f"loss_tid_{level}": region_imitation_loss(s, t, inputs.regions, inputs.counts)}
