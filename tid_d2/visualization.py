"""Pictures of where the distillation looks: significance heat maps and key / weak / rest regions.

Used by the distiller (event-storage images every ``VIS_PERIOD`` iterations, shown by TensorBoard)
and by ``tools/visualize_significance.py``.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from matplotlib import colormaps

__all__ = ["REGION_COLORS", "heatmap", "region_overlay", "significance_panel", "input_rgb"]

# RGB colours of the regions; a location both key and weak is drawn in the key+weak colour.
REGION_COLORS = {
    "key": (220, 40, 40),
    "weak": (250, 200, 30),
    "key+weak": (250, 120, 20),
    "rest": (40, 60, 140),
    "all": (40, 160, 80),
}
SIG_MAX = 4.0  # Score_c * Score_r <= 2.0 * 2.0


def input_rgb(image: torch.Tensor, input_format: str) -> np.ndarray:
    """(3, H, W) model-input tensor in ``input_format`` -> (H, W, 3) uint8 RGB."""
    img = image.detach().cpu().permute(1, 2, 0).numpy()
    if input_format == "BGR":
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))


def _resize(a: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    return cv2.resize(a, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


def heatmap(sig: torch.Tensor, hw: Tuple[int, int], vmax: float = SIG_MAX) -> np.ndarray:
    """(h, w) significance -> (H, W, 3) uint8 RGB with the viridis colour map over [0, vmax]."""
    s = (sig.detach().float().cpu().numpy() / vmax).clip(0, 1)
    rgb = (colormaps["viridis"](s)[:, :, :3] * 255).astype(np.uint8)
    return _resize(rgb, hw)


def region_overlay(
    image: np.ndarray, regions: Sequence[Tuple[str, torch.Tensor]], alpha: float = 0.55
) -> np.ndarray:
    """Blend region colours over ``image`` (H, W, 3). ``regions``: [(name, (h, w) bool mask)]."""
    hw = image.shape[:2]
    masks = {
        name: _resize(m.detach().cpu().numpy().astype(np.uint8), hw) > 0 for name, m in regions
    }
    color = np.zeros_like(image)
    painted = np.zeros(hw, dtype=bool)
    order: List[Tuple[str, np.ndarray]] = []
    if "key" in masks and "weak" in masks:
        order.append(("key+weak", masks["key"] & masks["weak"]))
    order += [(n, masks[n]) for n in ("key", "weak", "all", "rest") if n in masks]
    for name, m in order:
        m = m & ~painted
        color[m] = REGION_COLORS[name]
        painted |= m
    out = image.copy()
    out[painted] = ((1 - alpha) * image[painted] + alpha * color[painted]).astype(np.uint8)
    return out


def _title(img: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((14, img.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(bar, text, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, color=(255, 255, 255)) -> np.ndarray:
    out = image.copy()
    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), color, 1)
    return out


def significance_panel(
    batched_input: Dict,
    input_format: str,
    level: str,
    sig_t: Optional[torch.Tensor],
    sig_s: Optional[torch.Tensor],
    regions: Sequence[Tuple[str, torch.Tensor]],
) -> np.ndarray:
    """One row: input with GT boxes | Sig^T | Sig^S | regions, all at the input's size.

    Args:
        batched_input: a detectron2 input dict ("image" (3, H, W), optional "instances").
        sig_t, sig_s: (h, w) maps of ``level`` (None: panel left out).
        regions: [(name, (h, w) bool)] of ``level``.
    Returns:
        (14 + H, k * W, 3) uint8 RGB.
    """
    img = input_rgb(batched_input["image"], input_format)
    hw = img.shape[:2]
    if "instances" in batched_input:
        img_boxes = draw_boxes(img, batched_input["instances"].gt_boxes.tensor.cpu().numpy())
    else:
        img_boxes = img
    tiles = [_title(img_boxes, f"input + GT ({level})")]
    if sig_t is not None:
        tiles.append(_title(heatmap(sig_t, hw), f"Sig teacher 0..{SIG_MAX:g}"))
    if sig_s is not None:
        tiles.append(_title(heatmap(sig_s, hw), "Sig student"))
    names = "/".join(name for name, _ in regions)
    tiles.append(_title(region_overlay(img, regions), names))
    return np.concatenate(tiles, axis=1)
