"""ATSS and GFL: the ATSS assignment on hand-made layouts, the GFL losses and integral decoding
against hand-computed numbers, both detectors' losses on controlled predictions, training
(fp32 and CPU autocast), inference, images without GT, and train_net end to end."""

import importlib.util
import json
import math
import os
import statistics

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

import tid_d2.modeling  # noqa: F401 (registration)
from tid_d2.data import ShapesSpec, register_tid_shapes
from tid_d2.modeling import atss as tid_atss
from tid_d2.modeling import gfl as tid_gfl
from tid_d2.modeling.atss_assigner import ATSSAssignment, atss_assign
from tid_d2.modeling.gfl_losses import (
    distribution_focal_loss,
    integral_distances,
    quality_focal_loss,
)

from .helpers import NUM_CLASSES, random_inputs, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = {
    "ATSS": {"loss_atss_cls", "loss_atss_box", "loss_atss_ctr"},
    "GFL": {"loss_gfl_qfl", "loss_gfl_dfl", "loss_gfl_giou"},
}
LOG2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _one_thread_and_seeded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def dense_cfg(family: str, width: int = 32, norm: str = "GN", num_convs: int = 1):
    """A CPU-tiny ATSS / GFL config: ResNet-18 (from scratch) + FPN p3..p7 of ``width``."""
    cfg = tiny_cfg("RetinaNet", width=width)
    cfg.MODEL.META_ARCHITECTURE = family
    node = getattr(cfg.MODEL, family)
    node.NUM_CLASSES = NUM_CLASSES
    node.NUM_CONVS = num_convs
    node.HEAD_NORM = norm
    return cfg


# ---------------------------------------------------------------- the ATSS assignment
#
# Level 0: five 10 x 10 anchors in a row, centres (5, 5), (15, 5), ..., (45, 5) (anchors 0-4).
# Level 1: two 20 x 20 anchors, centres (10, 10) and (30, 10) (anchors 5, 6): fewer than k = 3,
# so both are candidates of every GT.
LEVEL0 = [[10.0 * i, 0.0, 10.0 * i + 10, 10.0] for i in range(5)]
LEVEL1 = [[0.0, 0.0, 20.0, 20.0], [20.0, 0.0, 40.0, 20.0]]
ANCHORS = torch.tensor(LEVEL0 + LEVEL1)
COUNTS = [5, 2]
GT_A = [0.0, 0.0, 14.0, 10.0]  # centre (7, 5)
GT_B = [0.0, 0.0, 11.0, 11.0]  # centre (5.5, 5.5)
GT_C = [16.0, 12.0, 24.0, 14.0]  # a thin box above the anchors' centres


def assign(gt_boxes, topk=3, anchors=ANCHORS, counts=COUNTS) -> ATSSAssignment:
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    return atss_assign(anchors, counts, gt_boxes, topk=topk)


def mean_plus_std(values):
    return statistics.mean(values) + statistics.stdev(values)  # sample std, as torch / mmdet


def test_assignment_threshold_is_mean_plus_std_of_the_candidates():
    # GT A, centre (7, 5). Level 0 distances 2, 8, 18, 28, 38 -> candidates 0, 1, 2; level 1
    # -> 5, 6. IoUs: anchor 0 = 100 / 140, anchor 1 = 40 / 200, anchor 2 = 0,
    # anchor 5 = 140 / 400, anchor 6 = 0 -> threshold = mean + std = 0.5499.
    candidate_ious = [100 / 140, 40 / 200, 0.0, 140 / 400, 0.0]
    threshold = mean_plus_std(candidate_ious)
    assert threshold == pytest.approx(0.549935, abs=1e-6)
    a = assign([GT_A])
    assert a.gt_iou_thresholds.tolist() == pytest.approx([threshold], abs=1e-6)
    # only anchor 0 reaches the threshold (its centre (5, 5) is inside A); anchor 5 (0.35) not
    assert a.matched_idxs.tolist() == [0, -1, -1, -1, -1, -1, -1]
    expected_ious = [100 / 140, 40 / 200, 0, 0, 0, 140 / 400, 0]
    assert a.ious.tolist() == pytest.approx(expected_ious, abs=1e-6)
    assert a.iou_thresholds.tolist() == pytest.approx([threshold] * 7, abs=1e-6)


def test_assignment_positives_on_two_levels():
    # GT [4, 0, 24, 12], centre (14, 6): candidates 1, 0, 2 (level 0) and 5, 6 (level 1), IoUs
    # 60/280, 100/240, 40/300, 192/448, 48/592 -> threshold 0.41523. Anchor 1 (100/240 =
    # 0.41667) and anchor 5 (192/448 = 0.42857) pass, just; both centres are inside the GT.
    ious = [60 / 280, 100 / 240, 40 / 300, 192 / 448, 48 / 592]
    a = assign([[4.0, 0.0, 24.0, 12.0]])
    assert a.gt_iou_thresholds.item() == pytest.approx(mean_plus_std(ious), abs=1e-6)
    assert a.gt_iou_thresholds.item() == pytest.approx(0.415233, abs=1e-6)
    assert a.matched_idxs.tolist() == [-1, 0, -1, -1, -1, 0, -1]
    positives = a.matched_idxs >= 0
    assert (a.ious[positives] >= a.iou_thresholds[positives]).all()


def test_assignment_conflicts_and_centres_outside():
    a = assign([GT_A, GT_B, GT_C])
    # Anchor 0 is positive for A (IoU 100/140 = 0.714 >= 0.550) and for B (IoU 100/121 = 0.826
    # >= B's threshold 0.589): it goes to B, the higher IoU, although B comes second.
    iou_a = [100 / 140, 40 / 200, 0.0, 140 / 400, 0.0]  # A's candidates 0, 1, 2, 5, 6
    iou_b = [100 / 121, 10 / 211, 0.0, 121 / 400, 0.0]  # B's candidates 0, 1, 2, 5, 6
    iou_c = [0.0, 0.0, 0.0, 1 / 51, 1 / 51]  # C's candidates 1, 2, 0, 5, 6
    thresholds = [mean_plus_std(iou_a), mean_plus_std(iou_b), mean_plus_std(iou_c)]
    assert thresholds == pytest.approx([0.549935, 0.588825, 0.018583], abs=1e-6)
    assert a.gt_iou_thresholds.tolist() == pytest.approx(thresholds, abs=1e-6)
    assert a.matched_idxs[0].item() == 1
    assert a.ious[0].item() == pytest.approx(100 / 121, abs=1e-6)
    assert a.iou_thresholds[0].item() == pytest.approx(thresholds[1], abs=1e-6)
    # C: its level-1 candidates pass the IoU threshold (8 / (400 + 16 - 8) = 1/51 >= 0.0186),
    # but no candidate centre (y = 5 or 10) lies inside C (y in 12..14): no positive.
    assert a.matched_idxs.tolist() == [1, -1, -1, -1, -1, -1, -1]
    assert a.ious[6].item() == pytest.approx(1 / 51, abs=1e-6)  # background: the best GT, C
    assert a.iou_thresholds[6].item() == pytest.approx(thresholds[2], abs=1e-6)


def test_assignment_centre_must_be_more_than_0_01_inside():
    # anchor 0's centre (5, 5) is 0.02 px inside [4.98, 0, 14, 10]: positive; 0.005 px inside
    # [4.995, 0, 14, 10]: not (mmdetection's min side distance > 0.01), though its IoU passes.
    assert assign([[4.98, 0.0, 14.0, 10.0]]).matched_idxs.tolist() == [0] + [-1] * 6
    a = assign([[4.995, 0.0, 14.0, 10.0]])
    assert a.ious[0] >= a.gt_iou_thresholds[0]
    assert a.matched_idxs.tolist() == [-1] * 7


def test_assignment_without_gt_or_with_empty_levels():
    a = assign(torch.zeros(0, 4))
    assert a.matched_idxs.tolist() == [-1] * 7
    assert a.ious.tolist() == [0.0] * 7
    assert torch.isinf(a.iou_thresholds).all() and a.gt_iou_thresholds.shape == (0,)
    # an empty level in the middle changes nothing
    b = assign([GT_A, GT_B, GT_C], counts=[5, 0, 2])
    assert b.matched_idxs.tolist() == [1, -1, -1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="does not sum"):
        assign([GT_A], counts=[5, 1])
    # one level with a single anchor: one candidate, std 0, positive when the centre is inside
    c = atss_assign(ANCHORS[:1], [1], torch.tensor([GT_A]), topk=9)
    assert c.matched_idxs.tolist() == [0]
    assert c.gt_iou_thresholds.item() == pytest.approx(100 / 140, abs=1e-6)


def _reference_atss(anchors, counts, gt_boxes, topk):
    """A per-GT loop written from the paper / mmdetection's description (test only)."""
    iou = pairwise_iou(Boxes(gt_boxes), Boxes(anchors))
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = torch.full((len(anchors),), -1.0)
    matched = torch.full((len(anchors),), -1, dtype=torch.long)
    for g, box in enumerate(gt_boxes):
        gc = (box[:2] + box[2:]) / 2
        candidates, start = [], 0
        for count in counts:
            d = ((centers[start : start + count] - gc) ** 2).sum(1).sqrt()
            candidates += (d.argsort()[: min(topk, count)] + start).tolist()
            start += count
        values = [iou[g, i].item() for i in candidates]
        threshold = mean_plus_std(values)
        for i in candidates:
            x, y = centers[i].tolist()
            inside = min(x - box[0], y - box[1], box[2] - x, box[3] - y) > 0.01
            if inside and iou[g, i] >= threshold - 1e-6 and iou[g, i] > best[i]:
                best[i], matched[i] = iou[g, i], g
    return matched


def test_assignment_matches_a_per_gt_reference_on_real_anchors():
    model = build_model(dense_cfg("ATSS", width=32))
    features = [torch.zeros(1, 1, s, s) for s in (12, 6, 3, 2, 1)]  # a 96 px image
    anchors = model.anchor_generator(features)
    counts = [len(a) for a in anchors]
    anchors = Boxes.cat(anchors).tensor
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(6, 2, generator=g) * 70
    gt = torch.cat([xy, xy + 4 + torch.rand(6, 2, generator=g) * 60], dim=1)
    a = atss_assign(anchors, counts, gt, topk=9)
    assert (a.matched_idxs >= 0).sum() >= 6
    assert torch.equal(a.matched_idxs, _reference_atss(anchors, counts, gt, topk=9))


# ---------------------------------------------------------------- GFL losses, integral


def test_quality_focal_loss_hand_values():
    # x = 0 -> sigmoid 0.5: target 0 or 1 -> BCE log 2, factor 0.5^2; target 0.5 -> factor 0
    # x = log 3 -> sigmoid 0.75, target 0.25: BCE = -(0.25 log 0.75 + 0.75 log 0.25), factor 0.25
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0]])
    targets = torch.tensor([[0.0, 1.0, 0.5], [0.25, 0.0, 0.0]])
    bce = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    expected = [[LOG2 / 4, LOG2 / 4, 0.0], [bce * 0.25, LOG2 / 4, LOG2 / 4]]
    loss = quality_focal_loss(logits, targets, beta=2.0)
    assert loss.shape == (2, 3)
    assert loss.flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-6)
    # beta = 1: the factor is |y - sigma|
    assert quality_focal_loss(logits[:1, :1], targets[:1, :1], 1.0).item() == pytest.approx(
        LOG2 / 2, abs=1e-6
    )


def test_distribution_focal_loss_hand_values():
    # 5 bins. Uniform logits: CE = log 5 for any bin, whatever the split of the target.
    uniform = torch.zeros(1, 5)
    assert distribution_focal_loss(uniform, torch.tensor([1.3])).item() == pytest.approx(
        math.log(5.0), abs=1e-6
    )
    # logits (0, log 2, 0, 0, 0): p = (1, 2, 1, 1, 1) / 6. Target 1.25 -> 0.75 on bin 1 and 0.25
    # on bin 2: 0.75 * -log(1/3) + 0.25 * -log(1/6). Target 2 -> all on bin 2: -log(1/6).
    # Target 4 (= n, the last bin) -> -log(1/6).
    logits = torch.tensor([[0.0, math.log(2.0), 0.0, 0.0, 0.0]]).repeat(3, 1)
    loss = distribution_focal_loss(logits, torch.tensor([1.25, 2.0, 4.0]))
    expected = [0.75 * math.log(3.0) + 0.25 * math.log(6.0), math.log(6.0), math.log(6.0)]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_integral_distances():
    # reg_max 2: probabilities (1, 2, 1)/4 -> 1.0; (1, 1, 2)/4 -> 1.25; uniform -> 1.0;
    # one dominant bin -> that bin
    sides = [[1.0, 2.0, 1.0], [1.0, 1.0, 2.0], [1.0, 1.0, 1.0], [1e-9, 1e-9, 1.0]]
    logits = torch.tensor(sides).log().reshape(1, 12)
    d = integral_distances(logits, reg_max=2)
    assert d.shape == (1, 4)
    assert d[0].tolist() == pytest.approx([1.0, 1.25, 1.0, 2.0], abs=1e-6)
    # leading dims are kept: (N, R, 4 * 17) -> (N, R, 4), uniform -> 8
    d = integral_distances(torch.zeros(2, 3, 68), 16)
    assert d.shape == (2, 3, 4)
    assert d.flatten().tolist() == pytest.approx([8.0] * 24, abs=1e-5)


# ---------------------------------------------------------------- losses on set predictions


def _one_level_anchors(centers, side=64.0):
    return [Boxes(torch.tensor([[x - side / 2, y - side / 2, x + side / 2, y + side / 2]
                                for x, y in centers]))]  # fmt: skip


def _instances(boxes, classes, size=(128, 128)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def _assignment(matched):
    matched = torch.tensor(matched)
    zeros = torch.zeros(len(matched))
    return ATSSAssignment(matched, zeros, zeros, zeros)


def test_atss_losses_hand_values():
    model = build_model(dense_cfg("ATSS"))
    # three anchors (side 64) at (32, 32), (96, 32), (32, 96); anchors 0 and 1 positive.
    anchors = _one_level_anchors([(32, 32), (96, 32), (32, 96)])
    # GT 0 = anchor 0: zero deltas decode to it exactly (GIoU loss 0, centerness 1).
    # GT 1 = [64, 0, 192, 64]: anchor 1's centre (96, 32) has l = 32, r = 96, t = b = 32 ->
    # centerness sqrt(1/3); the decoded anchor [64, 0, 128, 64] has IoU 1/2 = GIoU with it.
    gt = _instances([[0, 0, 64, 64], [64, 0, 192, 64]], [2, 0])
    r, k = 3, NUM_CLASSES
    with EventStorage():
        losses = model.losses(
            anchors,
            [torch.zeros(1, r, k)],
            [torch.zeros(1, r, 4)],
            [torch.zeros(1, r, 1)],
            [_assignment([0, 1, -1])],
            [gt],
        )
    # focal at x = 0: a target 1 costs 0.25 * 0.5^2 * log 2, a target 0 costs 0.75 * 0.5^2 * log 2;
    # 2 positive entries, r * k - 2 negative ones, over 2 positives
    focal = (2 * 0.25 * 0.25 * LOG2 + (r * k - 2) * 0.75 * 0.25 * LOG2) / 2
    ctr = math.sqrt(1 / 3)
    box = 2.0 * (0.0 * 1.0 + 0.5 * ctr) / (1.0 + ctr)
    bce = (-math.log(0.5) * 1.0 + -(ctr * math.log(0.5) + (1 - ctr) * math.log(0.5))) / 2
    assert losses["loss_atss_cls"].item() == pytest.approx(focal, rel=1e-5)
    assert losses["loss_atss_box"].item() == pytest.approx(box, rel=1e-5)
    assert losses["loss_atss_ctr"].item() == pytest.approx(bce, rel=1e-5)


def test_gfl_losses_hand_values():
    model = build_model(dense_cfg("GFL"))
    assert model.reg_max == 16 and model.strides[0] == 8
    # zero logits: quality sigmoid 0.5 everywhere; each side's distribution uniform over 0..16
    # -> expected 8 bins = 64 px on p3. GT 0 = [c - 64, c + 64]^2 around anchor 0's centre: the
    # decoded box is the GT (IoU 1, GIoU loss 0), the DFL targets are 8 bins exactly.
    anchors = _one_level_anchors([(100, 100), (200, 100)])
    gt = _instances([[36, 36, 164, 164]], [1], size=(256, 256))
    r, k = 2, NUM_CLASSES
    with EventStorage():
        losses = model.losses(
            anchors,
            [torch.zeros(1, r, k)],
            [torch.zeros(1, r, 68)],
            [_assignment([0, -1])],
            [gt],
        )
    # QFL: target 1 at (0, class 1), 0 elsewhere; every entry BCE log 2 times 0.5^2; 1 positive
    assert losses["loss_gfl_qfl"].item() == pytest.approx(r * k * LOG2 / 4, rel=1e-5)
    assert losses["loss_gfl_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # DFL: uniform logits -> log 17 per side; weight = the quality 0.5, normaliser max(0.5, 1)
    assert losses["loss_gfl_dfl"].item() == pytest.approx(0.25 * 0.5 * math.log(17), rel=1e-5)

    # GT 1 = [136, 36, 328, 164] for anchor 1 (centre (200, 100)): the prediction (the same
    # 128 px square [136, 36, 264, 164]) has IoU 128/192 = 2/3 = GIoU; distances (64, 64, 128,
    # 64) px = (8, 8, 16 -> 15.9 clamped, 8) bins.
    gt = _instances([[36, 36, 164, 164], [136, 36, 328, 164]], [1, 2], size=(256, 256))
    with EventStorage():
        losses = model.losses(
            anchors,
            [torch.zeros(1, r, k)],
            [torch.zeros(1, r, 68)],
            [_assignment([0, 1])],
            [gt],
        )
    qfl = ((r * k - 1) * 0.25 * LOG2 + LOG2 * (2 / 3 - 0.5) ** 2) / 2
    assert losses["loss_gfl_qfl"].item() == pytest.approx(qfl, rel=1e-5)
    # weights 0.5 + 0.5 = 1: GIoU 2 * (0 + 0.5 * 1/3); DFL the uniform CE whatever the target
    assert losses["loss_gfl_giou"].item() == pytest.approx(2.0 * 0.5 / 3, rel=1e-5)
    assert losses["loss_gfl_dfl"].item() == pytest.approx(0.25 * math.log(17), rel=1e-5)


def test_atss_centerness_targets():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])  # centre (5, 5)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
    ctr = tid_atss.centerness_targets(anchors, gt)
    assert ctr.tolist() == pytest.approx([1.0, math.sqrt(5 / 15)], abs=1e-6)


# ---------------------------------------------------------------- building, training, inference


def test_registered_and_built_from_config():
    assert META_ARCH_REGISTRY.get("ATSS") is tid_atss.ATSS
    assert META_ARCH_REGISTRY.get("GFL") is tid_gfl.GFL
    cfg = dense_cfg("ATSS", num_convs=2)
    cfg.TEST.DETECTIONS_PER_IMAGE = 17
    model = build_model(cfg)
    assert type(model) is tid_atss.ATSS and isinstance(model.head, tid_atss.ATSSHead)
    assert model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    assert len(model.head.cls_subnet) == 6  # 2 x (conv, GN, ReLU)
    assert len(model.head.scales) == 5
    assert model.max_detections_per_image == 17 and model.topk == 9
    assert isinstance(model.box2box_transform, Box2BoxTransform)
    assert model.box2box_transform.weights == (10.0, 10.0, 5.0, 5.0)
    # one square anchor of side 8 x stride per location, centred on (x, y) * stride
    anchors = model.anchor_generator([torch.zeros(1, 1, 2, 2)] * 5)
    assert anchors[0].tensor[:2].tolist() == [[-32, -32, 32, 32], [-24, -32, 40, 32]]
    assert anchors[4].tensor[0].tolist() == [-512, -512, 512, 512]
    bias = model.head.cls_score.bias[0].item()
    assert bias == pytest.approx(-math.log(99), abs=1e-5)  # prior probability 0.01

    gfl = build_model(dense_cfg("GFL"))
    assert type(gfl) is tid_gfl.GFL and isinstance(gfl.head, tid_gfl.GFLHead)
    assert gfl.head.bbox_pred.out_channels == 4 * 17
    assert not hasattr(gfl.head, "centerness")
    with pytest.raises(ValueError, match="not outputs of the backbone"):
        cfg = dense_cfg("GFL")
        cfg.MODEL.GFL.IN_FEATURES = ["p2", "p3"]
        build_model(cfg)


def _train_step(model, inputs, autocast_dtype=None):
    model.train()
    with EventStorage():
        if autocast_dtype is None:
            losses = model(inputs)
        else:
            with torch.autocast("cpu", dtype=autocast_dtype):
                losses = model(inputs)
        sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("family", ["ATSS", "GFL"])
def test_trains_and_infers(family):
    model = build_model(dense_cfg(family))
    inputs = random_inputs(2, 64, 3, seed=1)
    losses = _train_step(model, inputs)
    assert set(losses) == LOSSES[family]
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
        assert value.item() > 0, name
    for module in (model.head.cls_score, model.head.bbox_pred, model.backbone):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.head.scales[0].scale.grad is not None

    # inference: with no score threshold every image gets DETECTIONS_PER_IMAGE detections
    model.eval()
    model.test_score_thresh = 0.0
    model.max_detections_per_image = 7
    images = [{"image": x["image"], "height": 32, "width": 48} for x in inputs]
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out in outputs:
        inst = out["instances"]
        assert inst.image_size == (32, 48) and len(inst) == 7
        assert {"pred_boxes", "scores", "pred_classes"} == set(inst.get_fields())
        boxes = inst.pred_boxes.tensor
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 32).all() and (boxes >= 0).all()
        assert ((inst.scores > 0) & (inst.scores <= 1)).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < NUM_CLASSES)).all()
    # at the default threshold 0.05 the untrained head (prior 0.01) detects nothing
    model.test_score_thresh = 0.05
    with torch.no_grad():
        assert all(len(o["instances"]) == 0 for o in model(images))


@pytest.mark.parametrize("family", ["ATSS", "GFL"])
def test_images_without_gt(family):
    model = build_model(dense_cfg(family, norm=""))
    inputs = random_inputs(2, 64, 2, seed=2)
    inputs[1]["instances"] = inputs[1]["instances"][:0]  # one image without GT
    losses = _train_step(model, inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    empty = random_inputs(2, 64, 0, seed=2)  # a batch without any GT: only the class loss
    losses = _train_step(model, empty)
    assert set(losses) == LOSSES[family]
    for name, value in losses.items():
        assert torch.isfinite(value), name
        assert (value.item() > 0) == (name in ("loss_atss_cls", "loss_gfl_qfl")), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["ATSS", "GFL"])
def test_trains_under_mixed_precision(family, dtype):
    """What SOLVER.AMP.ENABLED does on a GPU, here with CPU autocast: losses in fp32, finite,
    gradients reach the backbone."""
    model = build_model(dense_cfg(family))
    losses = _train_step(model, random_inputs(2, 64, 2, seed=3), autocast_dtype=dtype)
    assert set(losses) == LOSSES[family]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    grads = [p.grad for p in model.backbone.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- train_net end to end

PREFIX = "atss_gfl_shapes"
TINY = [
    "MODEL.ATSS.NUM_CONVS", "1",
    "MODEL.GFL.NUM_CONVS", "1",
    # 3 iterations leave the scores near the 0.01 prior: keep every detection for the evaluator
    "MODEL.ATSS.SCORE_THRESH_TEST", "0.0",
    "MODEL.GFL.SCORE_THRESH_TEST", "0.0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "3",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.BASE_LR", "0.001",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "96",
    "DATASETS.TRAIN", f"('{PREFIX}_train',)",
    "DATASETS.TEST", f"('{PREFIX}_test',)",
]  # fmt: skip; the configs' FPN 64 stays: GN's 32 groups need > 1 value each on a 1 x 1 p7


@pytest.fixture(scope="module")
def train_net(tmp_path_factory):
    root = tmp_path_factory.mktemp("atss_gfl_data")
    register_tid_shapes(PREFIX, ShapesSpec(seed=0, sizes=(6, 6, 6), image_size=96, root=str(root)))
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["atss", "gfl"])
def test_train_net_end_to_end(train_net, tmp_path, family):
    out = str(tmp_path / family)
    argv = ["--config-file", f"{REPO}/configs/shapes/{family}_r18_student.yaml"]
    args = train_net.get_parser().parse_args(argv + TINY + ["OUTPUT_DIR", out])
    train_net.main(args)  # trains, then COCOEvaluator on DATASETS.TEST
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    keys = set().union(*records)
    assert LOSSES[family.upper()] <= keys
    assert {f"bbox/{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")} <= keys
    results = os.path.join(out, "inference", f"{PREFIX}_test", "coco_instances_results.json")
    assert len(json.load(open(results))) > 0  # the evaluator got detections
    assert all(math.isfinite(r["total_loss"]) for r in records if "total_loss" in r)
