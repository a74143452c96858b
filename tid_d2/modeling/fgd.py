"""FGD: focal and global distillation (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022), for every distilled FPN level.

The reference is ``mmdet/distillation/losses/fgd.py`` of yzd-v/FGD (``FeatureLoss``); the
formulas below are its, written anew and vectorised over the batch and the boxes (the reference
loops over images and boxes in Python). With S = the adapted student features, T = the teacher's,
both (N, C, H, W), and N the images of this process:

- attention (:func:`fgd_attention`): spatial A^S = H W softmax_hw(mean_c |F| / temp), channel
  A^C = C softmax_c(mean_hw |F| / temp), for teacher and student;
- focal (:func:`fgd_masks`): M = 1 inside a GT box, 0 outside; scale S_fg = 1 / (the box's
  height x width in cells) inside a box (the largest where boxes overlap), S_bg = 1 / (the
  image's background cell count) outside; a box covers the cells floor(x1 / s) .. ceil(x2 / s)
  and floor(y1 / s) .. ceil(y2 / s), both ends included, as in the reference;
  L_fg = alpha / N sum S_fg A^S_T A^C_T (S - T)^2, L_bg = beta / N sum S_bg A^S_T A^C_T (S - T)^2;
- attention loss: L_at = gamma / N (sum |A^C_S - A^C_T| + sum |A^S_S - A^S_T|);
- global (:class:`GlobalContext`, a GcBlock): L_global = lambda / N sum (G_S(S) - G_T(T))^2, with
  one trainable GcBlock for the student and one for the teacher side.

The GcBlocks are trained with the student and saved in TID checkpoints (``tid_loss.``), never in
an exported student. Departures from the reference (docs/method.md): boxes are mapped to cells by
the level's stride (the reference scales by feature size / unpadded image size, which differs
from the stride when an image is padded); masks are zero outside the unpadded image.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .imitation import LevelImitation, LevelInputs

__all__ = [
    "FGD_DEFAULTS",
    "FGDParams",
    "fgd_params_for",
    "fgd_attention",
    "fgd_masks",
    "GlobalContext",
    "FGDImitation",
]


@dataclass(frozen=True)
class FGDParams:
    """FGD's temperature and the weights of its four terms."""

    temperature: float = 0.5
    alpha: float = 0.001  # foreground
    beta: float = 0.0005  # background
    gamma: float = 0.0005  # attention
    lambda_: float = 0.000005  # global


# FGD's published settings per student family (yzd-v/FGD, configs/distillers/fgd/):
FGD_DEFAULTS: Dict[str, FGDParams] = {
    # fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py
    "RetinaNet": FGDParams(0.5, 0.001, 0.0005, 0.0005, 0.000005),
    # fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py
    "GeneralizedRCNN": FGDParams(0.5, 0.00005, 0.000025, 0.00005, 0.0000005),
    # fgd_fcos_r101_distill_fcos_r50_2x_coco.py
    "FCOS": FGDParams(0.8, 0.0016, 0.0008, 0.0008, 0.000008),
    # fgd_gfl_r101_distill_gfl_r50_fpn_1x_coco.py (ATSS has no FGD config: GFL's, its sibling)
    "GFL": FGDParams(0.5, 0.001, 0.0005, 0.0005, 0.000005),
    "ATSS": FGDParams(0.5, 0.001, 0.0005, 0.0005, 0.000005),
}


def fgd_params_for(fgd_cfg, student_meta_architecture: str) -> FGDParams:
    """FGDParams from ``TID.FGD.*``: a negative value takes the student family's published one
    (RetinaNet's for a family FGD did not publish)."""
    base = FGD_DEFAULTS.get(student_meta_architecture, FGD_DEFAULTS["RetinaNet"])
    given = {
        "temperature": fgd_cfg.TEMPERATURE,
        "alpha": fgd_cfg.ALPHA,
        "beta": fgd_cfg.BETA,
        "gamma": fgd_cfg.GAMMA,
        "lambda_": fgd_cfg.LAMBDA,
    }
    values = {k: float(v) if v >= 0 else getattr(base, k) for k, v in given.items()}
    if values["temperature"] <= 0:
        raise ValueError(f"TID.FGD.TEMPERATURE must be > 0, got {values['temperature']}")
    return FGDParams(**values)


def fgd_attention(x: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spatial and channel attention of features.

    Args:
        x: (N, C, H, W) fp32.
    Returns:
        spatial (N, H, W), summing to H*W per image; channel (N, C), summing to C per image.
    """
    n, c, h, w = x.shape
    a = x.abs()
    spatial = h * w * F.softmax(a.mean(dim=1).reshape(n, -1) / temperature, dim=1)
    channel = c * F.softmax(a.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


@torch.no_grad()
def fgd_masks(
    boxes: torch.Tensor, batch_idx: torch.Tensor, valid: torch.Tensor, stride: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's foreground scale mask and normalised background mask of one level.

    Args:
        boxes: (B, 4) XYXY GT boxes in input pixels, all images together.
        batch_idx: (B,) int64 image of each box.
        valid: (N, H, W) bool, cells inside the unpadded images.
        stride: the level's stride.
    Returns:
        fg (N, H, W) fp32: 1 / (box height x width in cells) over each box's cells, the max where
        boxes overlap, 0 elsewhere; bg (N, H, W) fp32: 1 / (the image's count of valid cells in
        no box) on those cells, 0 elsewhere (an image without background: all 0).
    """
    n, h, w = valid.shape
    device = valid.device
    fg = torch.zeros(n, h * w, device=device)
    if boxes.numel():
        cells = boxes.float() / stride
        x0, y0 = cells[:, 0].floor(), cells[:, 1].floor()
        x1, y1 = cells[:, 2].ceil(), cells[:, 3].ceil()
        area = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1))  # (B,)
        xs = torch.arange(w, device=device, dtype=torch.float32)
        ys = torch.arange(h, device=device, dtype=torch.float32)
        in_x = (xs[None] >= x0[:, None]) & (xs[None] <= x1[:, None])  # (B, W)
        in_y = (ys[None] >= y0[:, None]) & (ys[None] <= y1[:, None])  # (B, H)
        painted = (in_y[:, :, None] & in_x[:, None, :]).float() * area[:, None, None]
        index = batch_idx.long()[:, None].expand(-1, h * w)
        fg.scatter_reduce_(0, index, painted.view(len(boxes), -1), "amax", include_self=True)
    fg = fg.view(n, h, w) * valid
    bg = ((fg == 0) & valid).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
    return fg, bg


class GlobalContext(nn.Module):
    """GcBlock (Cao et al., GCNet) as FGD uses it: x + transform(attention-pooled context).

    context = sum_hw softmax_hw(conv_1x1(x)) x (N, C, 1, 1); transform = 1x1 conv C -> C/2,
    LayerNorm, ReLU, 1x1 conv C/2 -> C, whose last conv starts at zero (the block starts as the
    identity). The pooling conv starts from Kaiming-normal (fan-in) weights, as in the reference.
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.pool = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.pool.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.pool.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        n, c, h, w = x.shape
        weights = F.softmax(self.pool(x).view(n, 1, h * w), dim=2)  # (N, 1, HW)
        context = torch.bmm(x.view(n, c, h * w), weights.transpose(1, 2))  # (N, C, 1)
        return x + self.transform(context.view(n, c, 1, 1))


class FGDImitation(LevelImitation):
    """``TID.MODE fgd``: focal + attention + global distillation of each level.

    Holds a student-side and a teacher-side :class:`GlobalContext` per level (trainable; saved
    under ``tid_loss.``). :meth:`pop_log` gives the step's four terms summed over levels.
    """

    def __init__(self, teacher_channels: Dict[str, int], params: FGDParams):
        super().__init__()
        self.params = params
        self.gc_student = nn.ModuleDict(
            {lv: GlobalContext(c) for lv, c in teacher_channels.items()}
        )
        self.gc_teacher = nn.ModuleDict(
            {lv: GlobalContext(c) for lv, c in teacher_channels.items()}
        )
        self.last_terms: Dict[str, torch.Tensor] = {}

    def terms(self, level: str, student, teacher, fg, bg) -> Dict[str, torch.Tensor]:
        """The four weighted terms of one level, fp32.

        Args:
            student: (N, C, H, W) adapted student features (with grad).
            teacher: (N, C, H, W) teacher features.
            fg, bg: (N, H, W) masks of :func:`fgd_masks`.
        Returns:
            {"fg", "bg", "attention", "global"}: scalars, each times its weight.
        """
        p = self.params
        s, t = student.float(), teacher.float().detach()
        n = s.shape[0]
        with torch.no_grad():
            spatial_t, channel_t = fgd_attention(t, p.temperature)
            weight = spatial_t[:, None] * channel_t[:, :, None, None]  # (N, C, H, W)
        spatial_s, channel_s = fgd_attention(s, p.temperature)
        err = (s - t).pow(2) * weight
        return {
            "fg": p.alpha * (err * fg[:, None]).sum() / n,
            "bg": p.beta * (err * bg[:, None]).sum() / n,
            "attention": p.gamma
            * ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum())
            / n,
            "global": p.lambda_
            * (self.gc_student[level](s) - self.gc_teacher[level](t)).pow(2).sum()
            / n,
        }

    def forward(self, level: str, student, teacher, inputs: LevelInputs) -> Dict[str, torch.Tensor]:
        """{"loss_tid_<level>": sum of the four terms} before lambda."""
        with torch.autocast(student.device.type, enabled=False):
            fg, bg = fgd_masks(inputs.gt_boxes, inputs.gt_batch_idx, inputs.valid, inputs.stride)
            terms = self.terms(level, student, teacher, fg, bg)
        for name, value in terms.items():
            self.last_terms[name] = self.last_terms.get(name, 0.0) + value.detach()
        return {f"loss_tid_{level}": sum(terms.values())}

    def pop_log(self) -> Dict[str, float]:
        """{"fgd/fg", "fgd/bg", "fgd/attention", "fgd/global"} of the last step (before lambda,
        summed over levels; one host sync); cleared."""
        terms, self.last_terms = self.last_terms, {}
        if not terms:
            return {}
        values = torch.stack(list(terms.values())).tolist()
        return {f"fgd/{name}": v for name, v in zip(terms, values)}
