"""LDAM: key, weak and rest areas of a feature level (docs/method.md, section 2), and the region
masks of the baseline variants that share the loss machinery.

Every function returns a list of (mask, weight) pairs. Masks are (N, H, W) bool over one FPN
level; they may overlap (a location can be key *and* weak). The imitation loss normalises each
region by its own location count.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch

__all__ = [
    "RegionParams",
    "ldam_regions",
    "uniform_regions",
    "gt_mask_regions",
    "valid_mask",
]


@dataclass(frozen=True)
class RegionParams:
    """kappa, the weak-area rule (delta or rho) and (alpha_key, alpha_weak, alpha_rest)."""

    key_thresh: float = 3.0
    weak_rule: str = "difference"
    weak_thresh: float = 1.0
    weak_ratio: float = 2.0
    weights: Tuple[float, float, float] = (1.0, 1.0, 0.05)

    def __post_init__(self):
        if self.weak_rule not in ("difference", "ratio"):
            raise ValueError(
                f"TID.REGION.WEAK_RULE must be 'difference' or 'ratio', got {self.weak_rule!r}"
            )
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise ValueError(
                "TID.REGION.WEIGHTS must be three non-negative numbers (alpha_key, alpha_weak, "
                f"alpha_rest), got {list(self.weights)}"
            )


@torch.no_grad()
def ldam_regions(
    sig_t: torch.Tensor,
    sig_s: torch.Tensor,
    valid: torch.Tensor,
    params: RegionParams,
    use_weak: bool = True,
) -> List[Tuple[str, torch.Tensor, float]]:
    """Key area K (Sig^T >= kappa), weak area W (teacher ahead of student), rest R.

    Args:
        sig_t, sig_s: (N, H, W) fp32 significance of teacher and student.
        valid: (N, H, W) bool, locations inside the (unpadded) image.
        use_weak: False drops W (the ``no_ldam`` variant): R is then "not key".
    Returns:
        [(name, mask (N, H, W) bool, alpha)] for key, weak (if used) and rest.
    """
    a_key, a_weak, a_rest = params.weights
    key = (sig_t >= params.key_thresh) & valid
    if not use_weak:
        return [("key", key, a_key), ("rest", valid & ~key, a_rest)]
    if params.weak_rule == "difference":
        weak = sig_t - sig_s >= params.weak_thresh
    else:
        weak = sig_t >= params.weak_ratio * sig_s
    weak = weak & valid
    rest = valid & ~key & ~weak
    return [("key", key, a_key), ("weak", weak, a_weak), ("rest", rest, a_rest)]


@torch.no_grad()
def uniform_regions(valid: torch.Tensor) -> List[Tuple[str, torch.Tensor, float]]:
    """``fitnet``: one region, every valid location, weight 1."""
    return [("all", valid, 1.0)]


@torch.no_grad()
def gt_mask_regions(
    inside_gt: torch.Tensor, valid: torch.Tensor, params: RegionParams
) -> List[Tuple[str, torch.Tensor, float]]:
    """``gt_mask``: foreground inside GT boxes (alpha_key), background elsewhere (alpha_rest)."""
    fg = inside_gt & valid
    return [("key", fg, params.weights[0]), ("rest", valid & ~fg, params.weights[2])]


def valid_mask(
    image_sizes: List[Tuple[int, int]], shape: Tuple[int, int], stride: int, device=None
) -> torch.Tensor:
    """(N, H, W) bool: cells whose top-left corner lies inside each image's unpadded size.

    Args:
        image_sizes: per image (h, w) before padding.
        shape: (H, W) of the level.
        stride: the level's stride.
    """
    h, w = shape
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).view(-1, 2)
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride
    return (ys[None, :, None] < sizes[:, 0, None, None]) & (
        xs[None, None, :] < sizes[:, 1, None, None]
    )
