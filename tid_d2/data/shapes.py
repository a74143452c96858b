"""``tid_shapes``: a deterministic synthetic detection dataset, generated on first use.

Six classes that differ by *shape* only (a random colour never identifies a class), drawn with a
random rotation, a mild aspect jitter and, for most classes, either filled or as an outline, on
textured and cluttered backgrounds (smooth colour noise, gradients, stripes, lines) together with
unlabeled distractors (irregular blobs, arcs, irregular polygons, lines), followed by a mild
per-image blur and Gaussian noise. Objects are 8 to 100 pixels across, a good share of them small
in COCO terms, and may occlude one another. Two levels of clutter (``ShapesSpec.difficulty``):
``standard`` (default: 1 to 4 objects per image, light clutter and noise) and ``hard`` (1 to 8
objects, twice the outlines, more distractors, stronger blur and noise: the first version of the
dataset, reproduced image for image).

The dataset is written in COCO format (one JSON file per split, JPEG images of quality 95) into a
cache folder named from its parameters, under ``$TID_D2_DATASETS`` or else
``$DETECTRON2_DATASETS`` (default ``datasets``)::

    tid_shapes_s0_n1500-300-300_160_standard/
        train.json  val.json  test.json
        images/train/000000.jpg ...

Every image is drawn from its own random generator, seeded from ``(seed, split, index)``: the same
parameters always give byte-identical JSON files and identical pixels, and the images can be drawn
in any order or in parallel. Files are written under a temporary name and moved into place with
``os.replace``; a split's JSON file is written last and marks the split as complete, so an
interrupted generation is redone, and two processes generating at once are harmless.

Command line::

    python -m tid_d2.data.shapes --seed 0 --sizes 1500 300 300 --image-size 160 \\
        [--difficulty standard|hard] [--root DIR] [--preview out.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import sys
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "ShapesSpec",
    "DIFFICULTIES",
    "generate_shapes",
    "register_tid_shapes",
    "ensure_generated",
    "render_preview",
    "main",
]

logger = logging.getLogger(__name__)

SHAPES_CLASSES: List[str] = ["circle", "square", "triangle", "star", "cross", "ring"]
SHAPES_SPLITS: Tuple[str, ...] = ("train", "val", "test")

# Bump when the drawing changes: part of the cache folder's name, so a new generator never reuses
# images drawn by an old one.
_FORMAT_VERSION = 1

_MIN_OBJECT_PX = 8.0  # smallest object extent (the diameter of its enclosing circle), pixels
_MAX_OBJECT_PX = 100.0  # largest object extent, pixels
_JPEG_QUALITY = 95
_MAX_OCCLUDED = 0.7  # an object more occluded than this (fraction of its drawn pixels) is dropped


@dataclass(frozen=True)
class _Clutter:
    """How crowded and noisy the images of one difficulty are (ranges are [low, high))."""

    objects: Tuple[int, int]  # labelled objects per image
    small_share: float  # probability that an object is small (8-34 px across)
    outline_prob: float  # probability that an object (of a class that allows it) is an outline
    lines: Tuple[int, int]  # background lines
    blobs: Tuple[int, int]  # distractor blobs/arcs/polygons under the objects
    thin_on_top: Tuple[int, int]  # thin distractors drawn over the objects (may occlude them)
    blur_prob: float  # probability of a Gaussian blur
    noise: Tuple[float, float]  # standard deviation of the pixel noise


# "standard" (the default) is the one a small from-scratch student learns in about 1000 CPU
# iterations; "hard" is the first, more crowded version (students reach about AP 1.5 there in the
# same schedule, too little for a distillation effect to show).
DIFFICULTIES: Dict[str, _Clutter] = {
    "standard": _Clutter((1, 5), 0.35, 0.15, (0, 3), (0, 3), (0, 1), 0.3, (1.0, 4.0)),
    "hard": _Clutter((1, 9), 0.45, 0.3, (0, 6), (0, 5), (0, 3), 0.5, (2.0, 8.0)),
}


# ---------------------------------------------------------------------------------------- spec
def _default_root() -> str:
    return os.environ.get("TID_D2_DATASETS") or os.environ.get("DETECTRON2_DATASETS", "datasets")


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of one ``tid_shapes`` dataset; together they name its cache folder.

    Args:
        seed: base random seed.
        sizes: number of images of the ``train``, ``val`` and ``test`` splits (each at least 6, so
            that every class can be guaranteed to appear in every split).
        image_size: width and height of the square images, pixels.
        difficulty: a key of ``DIFFICULTIES``: ``"standard"`` (default: up to 4 objects, light
            clutter and noise) or ``"hard"`` (up to 8 objects, more outlines, distractors, noise).
        root: parent folder of the cache folder; ``None`` means ``$TID_D2_DATASETS``, else
            ``$DETECTRON2_DATASETS``, else ``datasets`` (read when the path is needed).
    """

    seed: int = 0
    sizes: Tuple[int, int, int] = (1500, 300, 300)
    image_size: int = 160
    difficulty: str = "standard"
    root: Optional[str] = None

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) != len(SHAPES_SPLITS):
            raise ValueError(f"ShapesSpec.sizes needs 3 numbers (train, val, test), got {sizes}")
        if min(sizes) < len(SHAPES_CLASSES):
            raise ValueError(
                f"ShapesSpec.sizes={sizes}: every split needs at least {len(SHAPES_CLASSES)} "
                "images so that every class appears in it"
            )
        if int(self.image_size) < 32:
            raise ValueError(f"ShapesSpec.image_size={self.image_size}: use at least 32 pixels")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(
                f"ShapesSpec.difficulty={self.difficulty!r}: choose one of {sorted(DIFFICULTIES)}"
            )
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.root is not None:
            object.__setattr__(self, "root", os.fspath(self.root))

    @property
    def name(self) -> str:
        """Name of the cache folder, e.g. ``tid_shapes_s0_n1500-300-300_160_standard``."""
        n = "-".join(str(s) for s in self.sizes)
        suffix = "" if _FORMAT_VERSION == 1 else f"_v{_FORMAT_VERSION}"
        level = "" if self.difficulty == "hard" else f"_{self.difficulty}"  # hard: the v1 name
        return f"tid_shapes_s{self.seed}_n{n}_{self.image_size}{level}{suffix}"

    @property
    def dir(self) -> str:
        """Absolute path of the cache folder (it may not exist yet)."""
        root = self.root if self.root is not None else _default_root()
        return os.path.abspath(os.path.join(root, self.name))

    @classmethod
    def from_env(cls) -> "ShapesSpec":
        """The spec of the default ``tid_shapes_*`` names: the defaults, overridable with
        ``$TID_D2_SHAPES_SEED``, ``$TID_D2_SHAPES_SIZES`` ("train,val,test") and
        ``$TID_D2_SHAPES_IMAGE_SIZE`` (e.g. a small copy for smoke tests of the benchmark) and
        ``$TID_D2_SHAPES_DIFFICULTY``."""
        env = os.environ
        kwargs: Dict[str, Any] = {}
        if env.get("TID_D2_SHAPES_SEED"):
            kwargs["seed"] = int(env["TID_D2_SHAPES_SEED"])
        if env.get("TID_D2_SHAPES_SIZES"):
            kwargs["sizes"] = tuple(int(x) for x in env["TID_D2_SHAPES_SIZES"].split(","))
        if env.get("TID_D2_SHAPES_IMAGE_SIZE"):
            kwargs["image_size"] = int(env["TID_D2_SHAPES_IMAGE_SIZE"])
        if env.get("TID_D2_SHAPES_DIFFICULTY"):
            kwargs["difficulty"] = env["TID_D2_SHAPES_DIFFICULTY"]
        return cls(**kwargs)

    def resolved(self) -> "ShapesSpec":
        """The same spec with ``root`` fixed to an absolute path (environment read now)."""
        return dataclasses.replace(self, root=os.path.dirname(self.dir))

    def json_path(self, split: str) -> str:
        """Path of the COCO JSON file of ``split``."""
        _split_index(split)
        return os.path.join(self.dir, f"{split}.json")

    def image_root(self, split: str) -> str:
        """Folder of the images of ``split`` (``file_name`` in the JSON is relative to it)."""
        _split_index(split)
        return os.path.join(self.dir, "images", split)

    def size(self, split: str) -> int:
        """Number of images of ``split``."""
        return self.sizes[_split_index(split)]


def _split_index(split: str) -> int:
    try:
        return SHAPES_SPLITS.index(split)
    except ValueError:
        raise ValueError(f"unknown tid_shapes split {split!r}; expected one of {SHAPES_SPLITS}")


# ------------------------------------------------------------------------------------- drawing
def _regular(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(a), -np.sin(a)], axis=1) * radius


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outer = _regular(points)
    inner_pts = _regular(points, inner, phase=math.pi / 2 + math.pi / points)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.3) -> np.ndarray:
    a = arm
    return np.array(
        [
            [a, 1],
            [a, a],
            [1, a],
            [1, -a],
            [a, -a],
            [a, -1],
            [-a, -1],
            [-a, -a],
            [-1, -a],
            [-1, a],
            [-a, a],
            [-a, 1],
        ],
        dtype=np.float64,
    )


# Unit outlines of the classes, all inside the unit circle. A ring is two circles: the outer one
# filled minus the inner one, or both drawn as outlines.
_CIRCLE = _regular(48)
_UNIT_SHAPES = {
    "circle": _CIRCLE,
    "square": _regular(4, phase=math.pi / 4),
    "triangle": _regular(3),
    "star": _star(),
    "cross": _cross(),
    "ring": _CIRCLE,
}
# A circle drawn as an outline would look like a ring: circles are always filled.
_OUTLINE_OK = {"circle": False}

_SHIFT = 4  # fractional bits of the vertex coordinates given to OpenCV
_SCALE = float(1 << _SHIFT)


def _to_px(points: np.ndarray) -> np.ndarray:
    return np.round(points * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _transform(
    unit: np.ndarray, center: Tuple[float, float], radius: float, angle: float, aspect: float
) -> np.ndarray:
    """Scale ``unit`` anisotropically by ``aspect``, rotate by ``angle`` and place it."""
    sx, sy = radius * aspect, radius / aspect
    c, s = math.cos(angle), math.sin(angle)
    x = unit[:, 0] * sx
    y = unit[:, 1] * sy
    return np.stack([c * x - s * y + center[0], s * x + c * y + center[1]], axis=1)


def _shape_mask(
    size: int,
    cls: str,
    center: Tuple[float, float],
    radius: float,
    angle: float,
    aspect: float,
    outline: int,
    ring_inner: float,
) -> np.ndarray:
    """Pixel mask (uint8, 0/1) of one class shape; ``outline`` > 0 draws it with that thickness."""
    mask = np.zeros((size, size), np.uint8)
    pts = _to_px(_transform(_UNIT_SHAPES[cls], center, radius, angle, aspect))
    if outline > 0:
        cv2.polylines(mask, [pts], True, 1, outline, cv2.LINE_8, _SHIFT)
        if cls == "ring":
            inner = _transform(_CIRCLE * ring_inner, center, radius, angle, aspect)
            cv2.polylines(mask, [_to_px(inner)], True, 1, outline, cv2.LINE_8, _SHIFT)
    else:
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, _SHIFT)
        if cls == "ring":
            inner = _transform(_CIRCLE * ring_inner, center, radius, angle, aspect)
            cv2.fillPoly(mask, [_to_px(inner)], 0, cv2.LINE_8, _SHIFT)
    return mask


def _distractor_mask(rng: np.random.Generator, size: int, thin: bool = False) -> np.ndarray:
    """Mask of one unlabeled distractor: an irregular blob, an arc, an irregular polygon or a
    line (``thin``: only an arc or a line). None of them is one of the classes."""
    mask = np.zeros((size, size), np.uint8)
    if thin:
        kind = 1 if rng.random() < 0.5 else 3
    else:
        kind = int(rng.choice(4, p=[0.35, 0.25, 0.25, 0.15]))
    cx, cy = rng.uniform(0, size, 2)
    r = rng.uniform(3, 22)
    if kind == 0:  # lumpy blob: smoothed random radii
        n = 16
        radii = rng.uniform(0.35, 1.25, n)
        radii = (radii + np.roll(radii, 1) + np.roll(radii, -1)) / 3
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        pts = np.stack([cx + r * radii * np.cos(a), cy + r * radii * np.sin(a)], axis=1)
        cv2.fillPoly(mask, [_to_px(pts)], 1, cv2.LINE_8, _SHIFT)
    elif kind == 1:  # open arc of an ellipse
        axes = (max(2, int(r)), max(2, int(r * rng.uniform(0.4, 1.0))))
        start = rng.uniform(0, 360)
        span = rng.uniform(50, 230)
        thick = int(rng.integers(1, 4))
        cv2.ellipse(
            mask, (int(cx), int(cy)), axes, rng.uniform(0, 360), start, start + span, 1, thick
        )
    elif kind == 2:  # irregular polygon with 5-7 vertices (concave, uneven)
        n = int(rng.integers(5, 8))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.25, 1.0, n)
        pts = np.stack([cx + r * radii * np.cos(a), cy + r * radii * np.sin(a)], axis=1)
        if rng.random() < 0.3:
            cv2.polylines(mask, [_to_px(pts)], True, 1, int(rng.integers(1, 3)), cv2.LINE_8, _SHIFT)
        else:
            cv2.fillPoly(mask, [_to_px(pts)], 1, cv2.LINE_8, _SHIFT)
    else:  # thin line segment
        length = rng.uniform(10, size * 0.8)
        a = rng.uniform(0, 2 * math.pi)
        p0 = (int(cx), int(cy))
        p1 = (int(cx + length * math.cos(a)), int(cy + length * math.sin(a)))
        cv2.line(mask, p0, p1, 1, int(rng.integers(1, 3)))
    return mask


@lru_cache(maxsize=4)
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx, yy


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 HxWx3 textured background: gradient + smooth colour noise (+ stripes)."""
    xx, yy = _grid(size)
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    g = (math.cos(theta) * xx + math.sin(theta) * yy) / size
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    img = c0 + (c1 - c0) * g[..., None]

    k = int(rng.integers(3, 14))
    low = rng.standard_normal((k, k, 3)).astype(np.float32)
    img += cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC) * rng.uniform(8, 45)

    if rng.random() < 0.35:
        a = rng.uniform(0, math.pi)
        freq = rng.uniform(0.15, 0.9)
        stripes = np.sin(freq * (math.cos(a) * xx + math.sin(a) * yy) + rng.uniform(0, 6.3))
        img += stripes[..., None] * rng.uniform(-35, 35, 3).astype(np.float32)
    return img


def _object_size(rng: np.random.Generator, size: int, small_share: float) -> float:
    """Extent (enclosing-circle diameter) of one object: a mixture of small and larger objects."""
    hi = min(_MAX_OBJECT_PX, 0.65 * size)
    if rng.random() < small_share:
        return float(rng.uniform(_MIN_OBJECT_PX, min(34.0, hi)))
    lo = min(34.0, hi)
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _pick_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    """A random colour that is not too close to the background it is drawn on."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(6):
        if np.abs(colour - local_mean).sum() >= 90:
            break
        colour = rng.uniform(0, 255, 3)
    return colour.astype(np.float32)


def render_image(
    seed: int, split_index: int, index: int, size: int, difficulty: str = "standard"
) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Draw image ``index`` of a split, deterministically, with the clutter of ``difficulty``.

    Returns:
        the image (HxWx3 uint8, BGR as OpenCV writes it) and its annotations, each a dict with
        ``category_id`` (1-based), ``bbox`` ([x, y, w, h] floats, the tight box of the drawn
        pixels, inside the image) and ``area`` (w * h).
    """
    clutter = DIFFICULTIES[difficulty]
    rng = np.random.default_rng([seed, split_index, index])
    img = _background(rng, size)

    # Background lines, then distractors that the objects may cover.
    for _ in range(int(rng.integers(*clutter.lines))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, p0, p1, colour, int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(*clutter.blobs))):
        m = _distractor_mask(rng, size).astype(bool)
        img[m] = rng.uniform(0, 255, 3).astype(np.float32)

    # owner[y, x]: index of the object that shows at the pixel, -1 none, -2 an occluding distractor
    owner = np.full((size, size), -1, np.int16)
    n_obj = int(rng.integers(*clutter.objects))
    classes = [int(c) for c in rng.integers(0, len(SHAPES_CLASSES), n_obj)]
    # The first images of a split carry every class: their last object (drawn on top, so never
    # occluded by another object) is of class ``index``.
    force = index < len(SHAPES_CLASSES)
    if force:
        classes[-1] = index
    n_large = 0
    drawn: List[Tuple[int, np.ndarray]] = []
    for i, c in enumerate(classes):
        cls = SHAPES_CLASSES[c]
        d = _object_size(rng, size, clutter.small_share)
        forced = force and i == len(classes) - 1
        if forced:  # filled and not tiny: thin distractors on top can never hide 70% of it
            d = max(d, 16.0)
        if d > 60:
            n_large += 1
            if n_large > 2:  # at most two large objects per image
                d = float(rng.uniform(_MIN_OBJECT_PX, 34.0))
        radius = d / 2
        margin = 0.35 * d  # at most about a third of an object falls outside the image
        center = (
            float(rng.uniform(margin, size - margin)),
            float(rng.uniform(margin, size - margin)),
        )
        angle = float(rng.uniform(0, 2 * math.pi))
        aspect = float(math.exp(rng.uniform(-0.15, 0.15)))
        outline_draw = rng.random() < clutter.outline_prob
        thick_frac = float(rng.uniform(0.06, 0.12))
        ring_inner = float(rng.uniform(0.45, 0.6))
        outline = 0
        if outline_draw and d >= 18 and _OUTLINE_OK.get(cls, True) and not forced:
            outline = max(2, int(round(d * thick_frac)))
        mask = _shape_mask(size, cls, center, radius, angle, aspect, outline, ring_inner)
        m = mask.astype(bool)
        x0, y0 = max(0, int(center[0] - radius - 2)), max(0, int(center[1] - radius - 2))
        patch_mean = img[y0 : int(center[1] + radius + 2), x0 : int(center[0] + radius + 2)]
        colour = _pick_colour(rng, patch_mean.reshape(-1, 3).mean(axis=0))
        img[m] = colour
        owner[m] = i
        drawn.append((c, m))

    # A few thin distractors on top (arcs, lines): they may partly occlude objects.
    for _ in range(int(rng.integers(*clutter.thin_on_top))):
        m = _distractor_mask(rng, size, thin=True).astype(bool)
        img[m] = rng.uniform(0, 255, 3).astype(np.float32)
        owner[m] = -2

    # Camera: mild blur and noise.
    if rng.random() < clutter.blur_prob:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.4, 1.0)))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(*clutter.noise)
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)

    visible = np.bincount(owner.ravel() + 2, minlength=len(classes) + 2)[2:]
    annos: List[Dict[str, Any]] = []
    for i, (c, m) in enumerate(drawn):
        n_drawn = int(m.sum())
        if n_drawn < 4 or visible[i] < (1.0 - _MAX_OCCLUDED) * n_drawn:
            continue
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        x0, x1, y0, y1 = int(xs[0]), int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
        w, h = x1 - x0, y1 - y0
        if w < 2 or h < 2:
            continue
        annos.append(
            {
                "category_id": c + 1,
                "bbox": [float(x0), float(y0), float(w), float(h)],
                "area": float(w * h),
            }
        )
    return out, annos


# ---------------------------------------------------------------------------------- generation
def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    )
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _image_file_name(index: int) -> str:
    return f"{index:06d}.jpg"


def _render_and_write(
    job: Tuple[int, int, int, int, str, str]
) -> Tuple[int, List[Dict[str, Any]]]:
    seed, split_index, index, size, difficulty, image_root = job
    img, annos = render_image(seed, split_index, index, size, difficulty)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"could not encode image {index} of split {split_index}")
    _atomic_write_bytes(os.path.join(image_root, _image_file_name(index)), buf.tobytes())
    return index, annos


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _num_workers(num_workers: Optional[int]) -> int:
    if num_workers is None:
        env = os.environ.get("TID_D2_DATA_WORKERS")
        # Drawing is cheap (the default dataset takes seconds in one process): a pool is opt-in.
        num_workers = int(env) if env else 0
    return max(0, int(num_workers))


def _generate_split(
    spec: ShapesSpec, split: str, num_workers: Optional[int], progress: bool
) -> None:
    split_index = _split_index(split)
    n = spec.size(split)
    image_root = spec.image_root(split)
    os.makedirs(image_root, exist_ok=True)
    jobs = [
        (spec.seed, split_index, i, spec.image_size, spec.difficulty, image_root)
        for i in range(n)
    ]
    workers = _num_workers(num_workers)
    bar = tqdm(total=n, desc=f"tid_shapes {split}", unit="img", disable=not progress)
    results: List[List[Dict[str, Any]]] = [[] for _ in range(n)]
    try:
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for index, annos in pool.imap_unordered(_render_and_write, jobs, chunksize=16):
                    results[index] = annos
                    bar.update(1)
        else:
            for job in jobs:
                index, annos = _render_and_write(job)
                results[index] = annos
                bar.update(1)
    finally:
        bar.close()

    images, annotations = [], []
    for index, annos in enumerate(results):
        image_id = index + 1
        images.append(
            {
                "id": image_id,
                "file_name": _image_file_name(index),
                "width": spec.image_size,
                "height": spec.image_size,
            }
        )
        for a in annos:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, **a, "iscrowd": 0}
            )
    present = {a["category_id"] for a in annotations}
    missing = [SHAPES_CLASSES[c - 1] for c in range(1, len(SHAPES_CLASSES) + 1) if c not in present]
    if missing:  # cannot happen: the first images of a split draw every class on top
        raise RuntimeError(f"tid_shapes {split}: classes {missing} missing; this is a bug")
    coco = {
        "info": {
            "description": "tid_shapes: synthetic shapes detection dataset (tid-d2)",
            "version": _FORMAT_VERSION,
            "seed": spec.seed,
            "split": split,
            "image_size": spec.image_size,
            "difficulty": spec.difficulty,
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(SHAPES_CLASSES)],
    }
    data = json.dumps(coco, separators=(",", ":")).encode("utf-8")
    _atomic_write_bytes(spec.json_path(split), data)  # written last: marks the split complete


def generate_shapes(
    spec: Optional[ShapesSpec] = None,
    splits: Sequence[str] = SHAPES_SPLITS,
    num_workers: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, Tuple[str, str]]:
    """Generate the missing splits of a ``tid_shapes`` dataset.

    Args:
        spec: dataset parameters (default: ``ShapesSpec()``).
        splits: the splits to make sure of.
        num_workers: processes drawing images (a ``fork`` pool where available); ``None`` means
            ``$TID_D2_DATA_WORKERS``, else 0; 0 or 1 draws in this process. The output does not
            depend on it.
        progress: show a tqdm progress bar (on stderr) while drawing.

    Returns:
        ``{split: (json_path, image_root)}`` for the requested splits.
    """
    spec = (spec or ShapesSpec()).resolved()
    out: Dict[str, Tuple[str, str]] = {}
    for split in splits:
        json_path = spec.json_path(split)
        if not os.path.isfile(json_path):
            logger.info("Generating tid_shapes split %r in %s", split, spec.dir)
            _generate_split(spec, split, num_workers, progress)
        out[split] = (json_path, spec.image_root(split))
    return out


# -------------------------------------------------------------------------------- registration
# Metadata key holding the (resolved) spec and split of a registered tid_shapes split. Kept in
# detectron2's MetadataCatalog, not in this module, so that it survives a re-import of the module.
_META_KEY = "tid_shapes_spec"


def _spec_record(spec: ShapesSpec, split: str) -> Dict[str, Any]:
    return {
        "seed": spec.seed,
        "sizes": list(spec.sizes),
        "image_size": spec.image_size,
        "difficulty": spec.difficulty,
        "root": spec.root,
        "split": split,
    }


def _registered_record(name: str) -> Optional[Dict[str, Any]]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list() or name not in MetadataCatalog.list():
        return None
    return MetadataCatalog.get(name).get(_META_KEY)


def _load_split(name: str, spec: ShapesSpec, split: str) -> List[Dict[str, Any]]:
    from detectron2.data.datasets import load_coco_json

    json_path, image_root = generate_shapes(spec, [split])[split]
    return load_coco_json(json_path, image_root, name)


def register_tid_shapes(prefix: str = "tid_shapes", spec: Optional[ShapesSpec] = None) -> List[str]:
    """Register ``{prefix}_train``, ``{prefix}_val`` and ``{prefix}_test`` with detectron2.

    Nothing is generated here: a split is generated the first time its dicts are asked for
    (``DatasetCatalog.get``) or by :func:`ensure_generated`. The metadata has ``thing_classes``,
    ``thing_dataset_id_to_contiguous_id``, ``json_file`` (where the split's JSON will be),
    ``image_root`` and ``evaluator_type="coco"``. A ``root=None`` spec reads the environment
    (``$TID_D2_DATASETS`` ...) now, at registration.

    Re-registering a name with the same spec does nothing; a different spec under a name that is
    already registered raises ``ValueError``.

    Returns:
        the three dataset names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    spec = (spec or ShapesSpec()).resolved()
    names = [f"{prefix}_{split}" for split in SHAPES_SPLITS]
    todo = []
    for name, split in zip(names, SHAPES_SPLITS):
        if name not in DatasetCatalog.list():
            todo.append((name, split))
            continue
        old = _registered_record(name)
        if old == _spec_record(spec, split):
            continue
        if old is None:
            raise ValueError(
                f"dataset {name!r} is already registered (not as a tid_shapes split); "
                "register tid_shapes under another prefix"
            )
        raise ValueError(
            f"dataset {name!r} is already registered as tid_shapes with a different spec "
            f"({old}, not {_spec_record(spec, split)}); register the new spec under another prefix"
        )
    for name, split in todo:
        DatasetCatalog.register(name, lambda n=name, s=split: _load_split(n, spec, s))
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
            json_file=spec.json_path(split),
            image_root=spec.image_root(split),
            evaluator_type="coco",
            **{_META_KEY: _spec_record(spec, split)},
        )
    return names


def ensure_generated(dataset_name: str) -> bool:
    """Make sure a registered ``tid_shapes`` split exists on disk (e.g. before a
    ``COCOEvaluator`` reads its ``json_file``).

    Returns:
        True if ``dataset_name`` is a ``tid_shapes`` split (now on disk), False for any other
        dataset (nothing is done).
    """
    record = _registered_record(dataset_name)
    if record is None:
        return False
    record = dict(record)
    split = record.pop("split")
    generate_shapes(ShapesSpec(**record), [split])
    return True


# ------------------------------------------------------------------------------------- preview
def render_preview(
    json_path: str, image_root: str, count: int = 8, cols: int = 4, scale: int = 2
) -> np.ndarray:
    """A grid (BGR uint8) of the first ``count`` images of a split with their GT boxes and class
    names drawn, each image enlarged ``scale`` times."""
    with open(json_path) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    tiles = []
    for im in coco["images"][:count]:
        img = cv2.imread(os.path.join(image_root, im["file_name"]), cv2.IMREAD_COLOR)
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        for a in by_image.get(im["id"], []):
            x, y, w, h = (v * scale for v in a["bbox"])
            p0, p1 = (int(x), int(y)), (int(x + w) - 1, int(y + h) - 1)
            cv2.rectangle(img, p0, p1, (0, 0, 0), 3)
            cv2.rectangle(img, p0, p1, (0, 255, 255), 1)
            label = names[a["category_id"]]
            org = (int(x) + 1, max(10, int(y) - 3))
            cv2.putText(img, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(
                img, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1, cv2.LINE_AA
            )
        tiles.append(
            cv2.copyMakeBorder(img, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        )
    if not tiles:
        raise ValueError(f"{json_path} has no images")
    blank = np.full_like(tiles[0], 255)
    rows = []
    for r in range(0, len(tiles), cols):
        row = tiles[r : r + cols]
        row += [blank] * (cols - len(row))
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)


# ---------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: generate a ``tid_shapes`` dataset, print its paths, optionally a preview."""
    parser = argparse.ArgumentParser(
        prog="python -m tid_d2.data.shapes",
        description="Generate the synthetic tid_shapes detection dataset (COCO format).",
    )
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=3,
        default=[1500, 300, 300],
        metavar=("TRAIN", "VAL", "TEST"),
        help="images per split (default 1500 300 300)",
    )
    parser.add_argument("--image-size", type=int, default=160, help="image side (default 160)")
    parser.add_argument(
        "--difficulty",
        default="standard",
        choices=sorted(DIFFICULTIES),
        help="clutter: standard (default, up to 4 objects) or hard (up to 8, more distractors)",
    )
    parser.add_argument(
        "--root",
        default=None,
        help="parent folder of the dataset folder (default $TID_D2_DATASETS, else "
        "$DETECTRON2_DATASETS, else ./datasets)",
    )
    parser.add_argument("--workers", type=int, default=None, help="drawing processes")
    parser.add_argument(
        "--preview", default=None, metavar="OUT.png", help="write a grid of images with GT boxes"
    )
    parser.add_argument("--preview-split", default="train", choices=SHAPES_SPLITS)
    parser.add_argument("--preview-count", type=int, default=8, help="images in the preview")
    args = parser.parse_args(argv)

    spec = ShapesSpec(
        seed=args.seed,
        sizes=tuple(args.sizes),
        image_size=args.image_size,
        difficulty=args.difficulty,
        root=args.root,
    )
    paths = generate_shapes(spec, num_workers=args.workers)
    print(f"tid_shapes dataset: {spec.dir}")
    for split, (json_path, image_root) in paths.items():
        print(f"  {split:5s}  json: {json_path}  images: {image_root}")
    if args.preview:
        json_path, image_root = paths[args.preview_split]
        grid = render_preview(json_path, image_root, count=args.preview_count)
        folder = os.path.dirname(os.path.abspath(args.preview))
        os.makedirs(folder, exist_ok=True)
        if not cv2.imwrite(args.preview, grid):
            raise SystemExit(f"could not write preview {args.preview}")
        print(f"preview: {args.preview}")
    return 0


if __name__ == "__main__":
    # Run the package's own module so that worker processes and registrations use one copy.
    from tid_d2.data.shapes import main as _main

    sys.exit(_main())
