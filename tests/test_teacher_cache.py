"""TID.TEACHER.CACHE_MB: the teacher's outputs kept per training image (tiny models, CPU)."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tid_d2  # noqa: F401 (registration)
from tid_d2.modeling.teacher_cache import TeacherOutputCache, split_batch, stack_batch

from .helpers import random_inputs, tid_cfg


def _pair(tmp_path, family, mode="tid", cache_mb=64):
    """The same distiller (same seed) without and with the cache; teacher calls are counted."""
    cfg = tid_cfg(str(tmp_path), family, mode)
    torch.manual_seed(0)
    plain = build_model(cfg)
    cfg.TID.TEACHER.CACHE_MB = cache_mb
    torch.manual_seed(0)
    cached = build_model(cfg)
    batches = []
    cached.teacher.backbone.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    plain.train()
    cached.train()
    return plain, cached, batches


@pytest.mark.parametrize("family,mode", [("RetinaNet", "tid"), ("FCOS", "tid"), ("GFL", "fgd")])
def test_cached_teacher_gives_the_same_losses_and_runs_only_on_new_images(tmp_path, family, mode):
    plain, cached, teacher_batches = _pair(tmp_path, family, mode)
    first = random_inputs(2, 64, seed=3)
    second = random_inputs(3, 64, seed=3)  # the first batch's two images and a new one
    with EventStorage(0) as storage, torch.no_grad():
        for batch in (first, second, second):
            want, got = plain(batch), cached(batch)
            assert want.keys() == got.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)
        hits = storage.latest()["tid/teacher_cache_hits"][0]
    # the teacher ran on 2 images, then on the 1 new one, then not at all
    assert teacher_batches == [2, 1]
    assert hits == 1.0
    assert len(cached.teacher_cache) == 3
    assert cached.teacher_cache.hits == 2 + 3 and cached.teacher_cache.misses == 2 + 1


def test_a_flipped_image_or_another_padding_is_another_entry():
    img = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(3, 2, 4)
    key = TeacherOutputCache.key
    assert key(img, (32, 32)) == key(img.clone(), (32, 32))
    assert key(img.flip(-1), (32, 32)) != key(img, (32, 32))
    assert key(img, (32, 64)) != key(img, (32, 32))
    assert key(img.float(), (32, 32)) != key(img, (32, 32))  # same values, another dtype


def test_least_recently_used_entries_go_first_within_the_bound():
    cache = TeacherOutputCache(max_mb=3 * 400 / 2**20)  # room for 3 entries of 400 bytes
    entry = lambda: {"f": torch.zeros(100)}  # noqa: E731 (100 fp32 = 400 bytes)
    for k in (b"a", b"b", b"c"):
        cache.put(k, entry())
    assert cache.nbytes == 1200 and len(cache) == 3
    assert cache.get(b"a") is not None  # "a" is now the most recently used
    cache.put(b"d", entry())  # evicts "b", the least recently used
    assert cache.get(b"b") is None
    assert all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    cache.put(b"big", {"f": torch.zeros(1000)})  # larger than the whole cache: not stored
    assert cache.get(b"big") is None and len(cache) == 3 and cache.nbytes == 1200


def test_split_and_stack_are_inverse_on_nested_outputs():
    n = 3
    tree = {
        "features": {"p3": torch.randn(n, 2, 4, 4), "p4": torch.randn(n, 2, 2, 2)},
        "head": ([torch.randn(n, 5, 4, 4)], [torch.randn(n, 4, 4, 4)]),
    }
    parts = split_batch(tree, n)
    assert len(parts) == n and parts[1]["head"][0][0].shape == (5, 4, 4)
    back = stack_batch(parts)
    assert torch.equal(back["features"]["p3"], tree["features"]["p3"])
    assert isinstance(back["head"], tuple) and torch.equal(back["head"][1][0], tree["head"][1][0])
    with pytest.raises(ValueError, match="cannot split"):
        split_batch({"x": torch.zeros(2, 1)}, n)


def test_cache_refused_for_a_faster_rcnn_teacher_and_negative_sizes(tmp_path):
    cfg = tid_cfg(str(tmp_path), "GeneralizedRCNN", "tid")
    cfg.TID.TEACHER.CACHE_MB = 64
    with pytest.raises(ValueError, match="ROI head scores the student's boxes.*CACHE_MB 0"):
        build_model(cfg)
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.TEACHER.CACHE_MB = -1
    with pytest.raises(ValueError, match="CACHE_MB must be >= 0"):
        build_model(cfg)
