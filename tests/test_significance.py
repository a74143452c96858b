"""Hand-computed expectations for DIEM (significance), LDAM (regions) and SFDM (loss)."""

import pytest
import torch

from tid_d2.modeling.imitation import region_imitation_loss
from tid_d2.modeling.regions import (
    RegionParams,
    gt_mask_regions,
    ldam_regions,
    uniform_regions,
    valid_mask,
)
from tid_d2.modeling.significance import (
    SigParams,
    classification_quality,
    match_to_gt,
    paint_boxes,
    significance,
    tier,
)

P = SigParams(iou_thresholds=(0.4, 0.5))  # RetinaNet's own thresholds, paper tiers


def test_tier_boundaries():
    x = torch.tensor([0.0, 0.4, 0.41, 0.49, 0.5, 0.9])
    # <= lo -> low; lo < x < hi -> mid; >= hi -> high
    assert tier(x, 0.4, 0.5, (0.4, 1.5, 2.0)).tolist() == pytest.approx(
        [0.4, 0.4, 1.5, 1.5, 2.0, 2.0]
    )


def test_match_to_gt_iou_and_class():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    cls = torch.tensor([2, 0])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 with gt0
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with gt0
            [20.0, 20.0, 30.0, 25.0],  # IoU 0.5 with gt1
            [50.0, 50.0, 60.0, 60.0],  # no overlap
        ]
    )
    iou, matched = match_to_gt([boxes], [gt], [cls])
    assert iou[0].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert matched[0].tolist()[:3] == [2, 2, 0]


def test_match_to_gt_no_gt_gives_zero_and_minus_one():
    iou, matched = match_to_gt(
        [torch.rand(5, 4) * 10], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)]
    )
    assert iou[0].tolist() == [0.0] * 5
    assert matched[0].tolist() == [-1] * 5


def test_match_to_gt_blocks_equal_unblocked(monkeypatch):
    import tid_d2.modeling.significance as sig_mod

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 30], 1)
    gxy = torch.rand(57, 2, generator=g) * 100
    gts = torch.cat([gxy, gxy + 5 + torch.rand(57, 2, generator=g) * 30], 1)
    cls = torch.randint(0, 5, (57,), generator=g)
    full = match_to_gt([boxes], [gts], [cls])
    monkeypatch.setattr(sig_mod, "_IOU_BLOCK", 100)  # 1 prediction x 57 GT per block
    blocked = match_to_gt([boxes], [gts], [cls])
    assert torch.equal(full[0][0], blocked[0][0])
    assert torch.equal(full[1][0], blocked[1][0])


def test_match_to_gt_batch_equals_per_image_reference(monkeypatch):
    """The padded batch computation gives, image by image, what torchvision's 2-D box_iou gives
    for that image alone (no match across images), with different prediction and GT counts per
    image, an image without GT, exact IoU ties (first GT wins) and row blocks."""
    import tid_d2.modeling.significance as sig_mod
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(1)

    def rand_boxes(k):
        xy = torch.rand(k, 2, generator=g) * 80
        return torch.cat([xy, xy + 4 + torch.rand(k, 2, generator=g) * 30], 1)

    preds = [rand_boxes(40), rand_boxes(25), rand_boxes(30)]
    gts = [rand_boxes(3), torch.zeros(0, 4), rand_boxes(5)]
    gts[2][1] = gts[2][0]  # two identical GT: the first one wins
    cls = [torch.randint(0, 6, (len(b),), generator=g) for b in gts]
    cls[2][1] = 5 if int(cls[2][0]) != 5 else 4
    whole = match_to_gt(preds, gts, cls)
    monkeypatch.setattr(sig_mod, "_IOU_BLOCK", 64)  # 4 predictions per block
    blocked = match_to_gt(preds, gts, cls)
    for i, (p, gt, c) in enumerate(zip(preds, gts, cls)):
        if len(gt) == 0:
            want_iou, want_cls = torch.zeros(len(p)), torch.full((len(p),), -1)
        else:
            want_iou, j = box_iou(p, gt).max(dim=1)
            want_cls = c[j]
        for got in (whole, blocked):
            assert got[0][i].shape == (len(p),)
            assert torch.allclose(got[0][i], want_iou)
            assert torch.equal(got[1][i], want_cls)
    # the tie is exercised: some predictions' best GT is the identical pair (reference: first)
    assert bool((box_iou(preds[2], gts[2]).max(dim=1).indices == 0).any())


def test_classification_quality_sigmoid_and_softmax():
    probs = torch.tensor([[0.9, 0.05, 0.3], [0.1, 0.2, 0.6]])
    cls = torch.tensor([0, 2])
    fg = torch.tensor([True, False])
    q = classification_quality(probs, cls, fg, "sigmoid")
    # fg: prob of the GT class; bg: 1 - max foreground prob
    assert q.tolist() == pytest.approx([0.9, 1 - 0.6])
    soft = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.3, 0.6]])  # 2 classes + background column
    q = classification_quality(soft, torch.tensor([1, 0]), fg, "softmax")
    assert q.tolist() == pytest.approx([0.1, 0.6])


@pytest.mark.parametrize(
    "iou, p_cls, expected",
    [
        (0.8, 0.9, 2.0 * 2.0),  # high loc, high cls -> 4.0
        (0.8, 0.3, 1.5 * 2.0),  # high loc, mid cls
        (0.8, 0.1, 0.4 * 2.0),  # high loc, low cls
        (0.45, 0.9, 2.0 * 1.5),  # mid loc, high cls
        (0.45, 0.2, 0.4 * 1.5),  # mid loc, cls at s_neg -> low
        (0.2, 0.05, 2.0 * 0.4),  # background; q = 1 - 0.05 = 0.95 -> high
        (0.2, 0.6, 1.5 * 0.4),  # background, fg prob 0.6 -> q = 0.4 (mid)
        (0.2, 0.85, 0.4 * 0.4),  # background, confident false positive -> q = 0.15 (low)
    ],
)
def test_significance_tiers(iou, p_cls, expected):
    probs = torch.tensor([[p_cls, 0.0]])  # class 0 is the GT class, class 1 at 0
    sig = significance(torch.tensor([iou]), probs, torch.tensor([0]), P, "sigmoid")
    assert sig.item() == pytest.approx(expected)


def test_significance_background_mid_tier():
    # background with max fg prob 0.55 -> q = 0.45 (mid) -> 1.5 * 0.4
    sig = significance(
        torch.tensor([0.1]), torch.tensor([[0.55, 0.1]]), torch.tensor([0]), P, "sigmoid"
    )
    assert sig.item() == pytest.approx(0.6)


def test_significance_ablated_scores():
    probs = torch.tensor([[0.9]])
    cls_only = SigParams(iou_thresholds=(0.4, 0.5), use_reg=False, ablated_score=2.0)
    reg_only = SigParams(iou_thresholds=(0.4, 0.5), use_cls=False, ablated_score=2.0)
    # IoU 0.45 (mid, 1.5) and q = 0.9 (high, 2.0)
    assert (
        significance(torch.tensor([0.45]), probs, torch.tensor([0]), cls_only, "sigmoid").item()
        == 4.0
    )
    assert (
        significance(torch.tensor([0.45]), probs, torch.tensor([0]), reg_only, "sigmoid").item()
        == 3.0
    )


def test_significance_is_fp32_from_half_inputs():
    probs = torch.tensor([[0.9, 0.1]], dtype=torch.float16)
    sig = significance(
        torch.tensor([0.8], dtype=torch.bfloat16), probs, torch.tensor([0]), P, "sigmoid"
    )
    assert sig.dtype == torch.float32 and sig.item() == 4.0


def test_sig_params_reject_out_of_range():
    with pytest.raises(ValueError, match="0 <= low <= high <= 1"):
        SigParams(iou_thresholds=(0.4, 1.5))
    with pytest.raises(ValueError, match="0 <= low <= high <= 1"):
        SigParams(iou_thresholds=(0.4, 0.5), cls_thresholds=(0.6, 0.5))


def test_paint_boxes_footprint_and_max():
    # 4x4 map, stride 8 (32 px image). Box A covers cells x in {0,1}, y in {0}; box B one cell.
    boxes = torch.tensor([[0.0, 0.0, 12.0, 6.0], [9.0, 1.0, 10.0, 2.0], [20.0, 20.0, 30.0, 30.0]])
    vals = torch.tensor([1.5, 4.0, 0.6])
    out = paint_boxes(boxes, vals, torch.tensor([0, 0, 1]), (2, 4, 4), 8)
    expected0 = torch.zeros(4, 4)
    expected0[0, 0] = 1.5
    expected0[0, 1] = 4.0  # max of 1.5 and 4.0; B is smaller than a cell but still paints it
    expected1 = torch.zeros(4, 4)
    expected1[2:4, 2:4] = 0.6
    assert torch.equal(out[0], expected0)
    assert torch.equal(out[1], expected1)
    # chunking over boxes gives the same map
    assert torch.equal(
        paint_boxes(boxes, vals, torch.tensor([0, 0, 1]), (2, 4, 4), 8, max_elements=16), out
    )


def test_valid_mask_excludes_padding():
    m = valid_mask([(16, 32), (32, 8)], (4, 4), 8)
    assert m[0].sum() == 2 * 4 and m[0][:2].all() and not m[0][2:].any()
    assert m[1].sum() == 4 * 1 and m[1][:, 0].all()


def test_ldam_regions_difference_and_ratio():
    sig_t = torch.tensor([[[4.0, 3.0, 2.0, 0.8]]])
    sig_s = torch.tensor([[[4.0, 1.5, 0.6, 0.16]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    regs = {n: m for n, m, _ in ldam_regions(sig_t, sig_s, valid, RegionParams())}
    assert regs["key"][0, 0].tolist() == [True, True, False, False]  # Sig^T >= 3
    assert regs["weak"][0, 0].tolist() == [False, True, True, False]  # diff >= 1 (0.64 is not)
    assert regs["rest"][0, 0].tolist() == [False, False, False, True]
    ratio = RegionParams(weak_rule="ratio", weak_ratio=2.0)
    regs = {n: m for n, m, _ in ldam_regions(sig_t, sig_s, valid, ratio)}
    assert regs["weak"][0, 0].tolist() == [False, True, True, True]  # 0.8 / 0.16 = 5 >= 2
    no_ldam = ldam_regions(sig_t, sig_s, valid, RegionParams(), use_weak=False)
    assert [n for n, _, _ in no_ldam] == ["key", "rest"]
    assert no_ldam[1][1][0, 0].tolist() == [False, False, True, True]


def test_region_params_validation():
    with pytest.raises(ValueError, match="non-negative"):
        RegionParams(weights=(1.0, -1.0, 0.05))
    with pytest.raises(ValueError, match="WEAK_RULE"):
        RegionParams(weak_rule="relative")


def test_region_loss_hand_computed():
    # 1 image, 1 channel, 2x2 locations; squared errors 1, 4, 9, 16
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.zeros_like(s)
    key = torch.tensor([[[True, False], [False, False]]])
    rest = ~key
    loss = region_imitation_loss(s, t, [("key", key, 1.0), ("rest", rest, 0.05)])
    assert loss.item() == pytest.approx(1.0 / 1 + 0.05 * (4 + 9 + 16) / 3)
    # C_T normalisation: two identical channels give the same loss
    loss2 = region_imitation_loss(
        s.repeat(1, 2, 1, 1), t.repeat(1, 2, 1, 1), [("key", key, 1.0), ("rest", rest, 0.05)]
    )
    assert loss2.item() == pytest.approx(loss.item())
    # empty region contributes nothing
    empty = torch.zeros_like(key)
    assert region_imitation_loss(s, t, [("weak", empty, 1.0)]).item() == 0.0


def test_region_counts_per_level_or_pooled_over_levels():
    """NORMALIZE level: each level's key term is its own mean; all_levels: one mean over the key
    locations of every level (hand-computed: squared errors 1 and 9 on a 2x2 level, 4 on 1x1)."""
    from tid_d2.modeling.imitation import region_counts

    s_a = torch.tensor([[[[1.0, 0.0], [3.0, 0.0]]]])  # key at (0,0) and (1,0): errors 1, 9
    key_a = torch.tensor([[[True, False], [True, False]]])
    s_b = torch.tensor([[[[2.0]]]])  # key: error 4
    key_b = torch.tensor([[[True]]])
    levels = [[("key", key_a, 1.0)], [("key", key_b, 1.0)]]
    for rule, expected in (("level", (1 + 9) / 2 + 4 / 1), ("all_levels", (1 + 9 + 4) / 3)):
        count_a, count_b = region_counts(levels, rule)
        assert [count_a.tolist(), count_b.tolist()] == (
            [[3.0], [3.0]] if rule == "all_levels" else [[2.0], [1.0]]
        )
        loss = region_imitation_loss(
            s_a, torch.zeros_like(s_a), levels[0], count_a
        ) + region_imitation_loss(s_b, torch.zeros_like(s_b), levels[1], count_b)
        assert loss.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="TID.REGION.NORMALIZE"):
        region_counts(levels, "per_image")


def test_region_counts_per_location_use_the_levels_location_count():
    """NORMALIZE locations: every region of a level is divided by the level's location count (the
    union of its masks), so a location weighs alpha_r whatever its region's size (hand-computed:
    key errors 1, 9 and rest error 4 on a 2x2 level with one invalid location; 1x1 level: key 4)."""
    from tid_d2.modeling.imitation import region_counts

    s_a = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    key_a = torch.tensor([[[True, False], [True, False]]])
    rest_a = torch.tensor([[[False, True], [False, False]]])  # (1, 1) invalid: in no region
    s_b = torch.tensor([[[[2.0]]]])
    key_b = torch.tensor([[[True]]])
    levels = [[("key", key_a, 1.0), ("rest", rest_a, 0.5)], [("key", key_b, 1.0)]]
    count_a, count_b = region_counts(levels, "locations")
    assert [count_a.tolist(), count_b.tolist()] == [[3.0, 3.0], [1.0]]
    loss_a = region_imitation_loss(s_a, torch.zeros_like(s_a), levels[0], count_a)
    loss_b = region_imitation_loss(s_b, torch.zeros_like(s_b), levels[1], count_b)
    assert loss_a.item() == pytest.approx((1 + 9 + 0.5 * 4) / 3)
    assert loss_b.item() == pytest.approx(4.0)


def test_region_loss_invariant_to_repeating_the_batch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    sig_t, sig_s = torch.rand(2, 5, 5, generator=g) * 4, torch.rand(2, 5, 5, generator=g) * 4
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    one = region_imitation_loss(s, t, ldam_regions(sig_t, sig_s, valid, RegionParams()))
    two = region_imitation_loss(
        torch.cat([s, s]),
        torch.cat([t, t]),
        ldam_regions(
            torch.cat([sig_t, sig_t]),
            torch.cat([sig_s, sig_s]),
            torch.cat([valid, valid]),
            RegionParams(),
        ),
    )
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_uniform_and_gt_mask_regions():
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    assert uniform_regions(valid)[0][2] == 1.0
    inside = torch.tensor([[[True, False], [False, False]]])
    regs = gt_mask_regions(inside, valid, RegionParams())
    assert regs[0][1].sum() == 1 and regs[1][1].sum() == 3 and regs[1][2] == 0.05


def test_mixed_precision_loss_matches_fp32():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    regs = uniform_regions(valid)
    ref = region_imitation_loss(s, t, regs)
    for dtype in (torch.float16, torch.bfloat16):
        out = region_imitation_loss(s.to(dtype), t.to(dtype), regs)
        assert out.dtype == torch.float32
        ref_cast = region_imitation_loss(s.to(dtype).float(), t.to(dtype).float(), regs)
        assert out.item() == pytest.approx(ref_cast.item(), rel=1e-6)
        assert out.item() == pytest.approx(ref.item(), rel=2e-2)


def test_feature_normalisation():
    from tid_d2.modeling.imitation import normalize_features

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, generator=g) * 7 + 3
    y = normalize_features(x, "channel")
    assert torch.allclose(y.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(y.std(dim=(2, 3)), torch.ones(2, 3), atol=1e-4)
    assert normalize_features(x, "none") is x
    # scale- and shift-invariant: a student that is an affine copy of the teacher has zero loss
    assert torch.allclose(normalize_features(5 * x - 2, "channel"), y, atol=1e-4)
    with pytest.raises(ValueError, match="FEATURE_NORM"):
        normalize_features(x, "batch")
    # a 1x1 level (P7 of a small image): zeros, not NaN, and no degrees-of-freedom warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = normalize_features(torch.randn(2, 3, 1, 1, generator=g), "channel")
    assert torch.equal(one, torch.zeros(2, 3, 1, 1))


def test_batched_box_iou_fallback_matches_torchvision():
    """Older torchvision's 2-D-only box_iou is vectorised over images with torch.vmap: it gives
    what the batched call gives (and the per-image 2-D calls)."""
    import tid_d2.modeling.significance as sig_mod
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(3)
    xy = torch.rand(3, 7, 2, generator=g) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(3, 7, 2, generator=g) * 20], -1)
    xy = torch.rand(3, 4, 2, generator=g) * 50
    b = torch.cat([xy, xy + 1 + torch.rand(3, 4, 2, generator=g) * 20], -1)
    want = torch.stack([box_iou(x, y) for x, y in zip(a, b)])
    assert torch.allclose(torch.vmap(box_iou)(a, b), want)
    assert torch.allclose(sig_mod._box_iou_nmg(a, b), want)
