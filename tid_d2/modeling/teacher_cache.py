"""The frozen teacher's outputs kept per training image, so that an image seen again skips the
teacher's forward (``TID.TEACHER.CACHE_MB``).

The teacher is frozen and in eval mode, so its outputs for an image depend on nothing but that
image as the distiller feeds it (pixels after the data augmentation, padded size). With
augmentations that repeat (tid_shapes: a fixed resize and a horizontal flip, so two versions of
each image) an epoch after the first finds almost every image in the cache: the teacher's forward
is most of a distillation step's extra cost on a CPU (a TID-family run of the plateau FCOS pair
takes 1.8x the student alone's time). Random augmentations that never repeat only fill the cache
(and cost a hash per image): leave it off there.

An entry is keyed by a hash of the image's bytes, shape, dtype and the batch's padded size, and
holds what the teacher's probe needs from its forward for that one image (FPN features, head
outputs; :meth:`~.probes.DetectorProbe.cached_outputs`), sliced out of the batch. Images missing
from the cache run through the teacher as a smaller batch of the same padded size; per-image
outputs of an eval-mode detector do not depend on the rest of the batch, so a step with the cache
computes what it would without it, up to the float rounding of batched kernels. Least recently
used entries go first when the cache is full. Dense teachers only: a Faster R-CNN teacher scores
the student's ROI boxes, which change every step.
"""

import hashlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.structures import ImageList

__all__ = ["TeacherOutputCache", "run_teacher_cached", "split_batch", "stack_batch"]


def split_batch(tree, n: int) -> List:
    """A nested structure (dict / list / tuple of tensors whose dim 0 is the batch, N = ``n``)
    -> ``n`` structures of the same shape, one per image, each tensor (…) without the batch dim
    cloned out of the batch (so a cached image does not keep the whole batch alive)."""
    if isinstance(tree, torch.Tensor):
        if tree.dim() == 0 or tree.shape[0] != n:
            raise ValueError(f"cannot split a tensor of shape {tuple(tree.shape)} into {n} images")
        return [t.clone() for t in tree.unbind(0)]
    if isinstance(tree, dict):
        parts = {k: split_batch(v, n) for k, v in tree.items()}
        return [{k: parts[k][i] for k in tree} for i in range(n)]
    if isinstance(tree, (list, tuple)):
        parts = [split_batch(v, n) for v in tree]
        return [type(tree)(p[i] for p in parts) for i in range(n)]
    raise TypeError(f"teacher outputs of type {type(tree).__name__} cannot be cached per image")


def stack_batch(trees: Sequence):
    """Inverse of :func:`split_batch`: per-image structures -> one batched structure."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(trees))
    if isinstance(first, dict):
        return {k: stack_batch([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(stack_batch([t[j] for t in trees]) for j in range(len(first)))
    raise TypeError(f"cannot stack teacher outputs of type {type(first).__name__}")


def _nbytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.element_size() * tree.numel()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    return sum(_nbytes(v) for v in tree)


class TeacherOutputCache:
    """Least-recently-used store of per-image teacher outputs, bounded by ``max_mb`` megabytes
    (2**20 bytes) of tensor data. ``hits`` / ``misses`` count images over its lifetime."""

    def __init__(self, max_mb: float):
        if not max_mb > 0:
            raise ValueError(f"TID.TEACHER.CACHE_MB must be > 0 to build a cache, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: "OrderedDict[bytes, object]" = OrderedDict()
        self._sizes: Dict[bytes, int] = {}

    @staticmethod
    def key(image: torch.Tensor, padded_hw: Sequence[int]) -> bytes:
        """Hash of one input image (its (C, H, W) tensor as the data loader gave it) and the
        padded size of its batch."""
        h = hashlib.blake2b(digest_size=20)
        h.update(repr((tuple(image.shape), str(image.dtype), tuple(padded_hw))).encode())
        h.update(image.detach().contiguous().cpu().numpy().tobytes())
        return h.digest()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes):
        """The entry of ``key`` (now the most recently used) or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, entry) -> None:
        """Store ``entry``, evicting the least recently used ones to stay within the bound; an
        entry larger than the whole bound is not stored."""
        size = _nbytes(entry)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.nbytes -= self._sizes.pop(key)
            del self._entries[key]
        while self._entries and self.nbytes + size > self.max_bytes:
            old, _ = self._entries.popitem(last=False)
            self.nbytes -= self._sizes.pop(old)
        self._entries[key] = entry
        self._sizes[key] = size
        self.nbytes += size


@torch.no_grad()
def run_teacher_cached(
    probe, cache: TeacherOutputCache, images: ImageList, keys: List[bytes]
) -> float:
    """The teacher probe's :meth:`run` for a batch, through ``cache``: the images whose ``keys``
    are cached are not run; the others run as one smaller batch (same padded size) and are
    stored. Afterwards ``probe.captured`` holds the whole batch as :meth:`run` would leave it.

    Args:
        probe: a :class:`~.probes.DetectorProbe` with ``cacheable`` True.
        images: the teacher's ImageList of the batch, (N, 3, H_pad, W_pad).
        keys: N keys (:meth:`TeacherOutputCache.key`).
    Returns:
        the fraction of the batch's images found in the cache.
    """
    entries: List[Optional[object]] = [cache.get(k) for k in keys]
    missing = [i for i, e in enumerate(entries) if e is None]
    if missing:
        sub = ImageList(images.tensor[missing], [images.image_sizes[i] for i in missing])
        probe.run(sub)
        fresh = split_batch(probe.cached_outputs(), len(missing))
        probe.clear()
        for i, entry in zip(missing, fresh):
            entries[i] = entry
            cache.put(keys[i], entry)
    probe.restore_outputs(stack_batch(entries), tuple(images.tensor.shape))
    return 1.0 - len(missing) / len(keys)
