"""TID for ATSS and GFL: Score_r with ATSS's adaptive per-GT threshold (hand-computed), GFL's
integral box decoding inside the probe, and distillation of both families end to end."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import tid_d2  # noqa: F401 (registration)
from tid_d2.modeling.atss import assign_batch
from tid_d2.modeling.probes import _matched_thresholds, build_probe
from tid_d2.modeling.significance import SigParams, significance

from .helpers import random_inputs, tid_cfg, tiny_cfg


def test_matched_thresholds_by_hand():
    # image 0: GT thresholds (0.5, 0.25); image 1: no GT
    idx = torch.tensor([[0, 1, 1], [-1, -1, -1]])
    t_neg, t_pos = _matched_thresholds(idx, [torch.tensor([0.5, 0.25]), torch.zeros(0)], 0.8)
    assert torch.allclose(t_pos, torch.tensor([[0.5, 0.25, 0.25], [1.0, 1.0, 1.0]]))
    assert torch.allclose(t_neg, 0.8 * t_pos)


def test_score_r_follows_the_matched_gts_adaptive_threshold():
    """Three predictions matched to a GT whose ATSS threshold is 0.5 (t_neg 0.4) and three to a
    GT with threshold 0.25 (t_neg 0.2): the same IoU lands in different tiers. Score_c is
    ablated (2.0) so Sig = 2 x Score_r."""
    iou = torch.tensor([0.55, 0.45, 0.35, 0.30, 0.22, 0.15])
    t_pos = torch.tensor([0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    params = SigParams(iou_thresholds=(0.4, 0.5), use_cls=False)
    probs = torch.full((6, 3), 0.5)
    cls = torch.zeros(6, dtype=torch.long)
    sig = significance(iou, probs, cls, params, "sigmoid", (0.8 * t_pos, t_pos))
    assert sig.tolist() == pytest.approx([4.0, 3.0, 0.8, 4.0, 3.0, 0.8])
    # the fixed rule (0.4, 0.5) on the same IoUs
    fixed = significance(iou, probs, cls, params, "sigmoid")
    assert fixed.tolist() == pytest.approx([4.0, 3.0, 0.8, 0.8, 0.8, 0.8])


def _gt(boxes):
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    return inst


@pytest.mark.parametrize("family", ["ATSS", "GFL"])
def test_probe_uses_the_assignments_thresholds(tmp_path, family):
    """The adaptive t_pos of a location is the ATSS threshold of the GT its box overlaps most,
    computed from the detector's own anchors; with TID.SIG.IOU_RULE fixed there is none."""
    cfg = tid_cfg(str(tmp_path), family, "tid")
    model = build_model(cfg)
    probe = model.student_probe
    model.train()
    inputs = random_inputs(2, 64, 2, seed=1)
    with EventStorage(0):
        model.student(inputs)
    gt = [x["instances"] for x in inputs]
    thresholds = probe.adaptive_thresholds(gt)
    expected = assign_batch(probe.captured["anchors"], gt, model.student.topk)
    for got, want in zip(thresholds, expected):
        assert torch.equal(got, want.gt_iou_thresholds) and len(got) == 2
    sig = probe.significance(gt, [(64, 64)] * 2)
    assert set(sig) == set(probe.head_levels)
    tiers = {round(a * b, 4) for a in (0.4, 1.5, 2.0) for b in (0.4, 1.5, 2.0)}
    for level, m in sig.items():
        assert m.shape == probe.features[level].shape[:1] + probe.features[level].shape[2:]
        assert {round(v, 4) for v in m.unique().tolist()} <= tiers
    cfg.defrost()
    cfg.TID.SIG.IOU_RULE = "fixed"
    fixed = build_probe(model.student, model.student_cfg, cfg)
    assert fixed.adaptive_thresholds(gt) is None
    fixed.remove()
    model._clear()


def test_gfl_probe_decodes_the_integral_of_the_distributions(tmp_path):
    """A GFL head whose distributions put all mass on bin 2 of every side predicts, at every
    location, the box centre +- 2 strides; a GT equal to one such box has IoU 1 with it."""
    cfg = tiny_cfg("GFL")
    model = build_model(cfg)
    head = model.head
    n_bins = model.reg_max + 1
    with torch.no_grad():
        head.bbox_pred.weight.zero_()
        bias = torch.full((4, n_bins), -30.0)
        bias[:, 2] = 30.0
        head.bbox_pred.bias.copy_(bias.flatten())
        head.cls_score.weight.zero_()
        head.cls_score.bias.fill_(5.0)  # every class at sigmoid(5) = 0.993
    tcfg = tid_cfg(str(tmp_path), "GFL", "tid")
    probe = build_probe(model, cfg, tcfg)
    model.eval()
    images = model.preprocess_image(random_inputs(1, 64, 1))
    probe.run(images)
    level = probe.head_levels[0]
    stride = model.strides[0]
    distances = probe._box_outputs(probe.captured["head"])[0]
    assert torch.allclose(distances, torch.full_like(distances, 2.0 * stride), atol=1e-4)
    # the location at row 3, column 4 of the finest level (anchor offset 0: centre (4 s, 3 s))
    anchors = probe.captured["anchors"][0].tensor
    h, w = probe.features[level].shape[2:]
    centre = (anchors[3 * w + 4, :2] + anchors[3 * w + 4, 2:]) / 2
    box = torch.cat([centre - 2 * stride, centre + 2 * stride]).tolist()
    sig = probe.significance([_gt([box])], [(64, 64)])[level][0]
    # IoU 1 >= any t_pos: Score_r 2.0; q = 0.993 >= s_pos 0.5: Score_c 2.0
    assert sig[3, 4].item() == pytest.approx(4.0)
    # the corner location's box (-2 s, -2 s, 2 s, 2 s) misses the GT: background, Score_r 0.4,
    # q = 1 - 0.993 < s_neg: Score_c 0.4
    assert sig[0, 0].item() == pytest.approx(0.16)
    probe.remove()


@pytest.mark.parametrize("family", ["ATSS", "GFL"])
@pytest.mark.parametrize("mode", ["tid", "fgd"])
def test_atss_gfl_students_distil(tmp_path, family, mode):
    torch.manual_seed(0)
    model = build_model(tid_cfg(str(tmp_path), family, mode))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    with EventStorage(0) as storage:
        for i in range(2):
            losses = model(random_inputs(2, 64, 2, seed=i))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            storage.iter += 1
        latest = storage.latest()
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert any(k.startswith("loss_tid_") for k in losses)
    if mode == "tid":
        assert "tid/key_share" in latest and "tid/sig_teacher_mean" in latest

