"""PKD and FGD (TID.MODE pkd / fgd): hand-computed values on tiny tensors, their weights'
defaults, FGD's modules in checkpoints and exports. Training steps of every family in both modes
are in tests/test_distiller.py::test_every_mode_trains_finite (parametrised over TID_MODES)."""

import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tid_d2  # noqa: F401 (registration)
from tid_d2.config import get_cfg
from tid_d2.engine import TIDCheckpointer
from tid_d2.modeling.distiller import method_loss_weight, student_cfg_from
from tid_d2.modeling.fgd import (
    FGD_DEFAULTS,
    FGDImitation,
    FGDParams,
    GlobalContext,
    fgd_attention,
    fgd_masks,
    fgd_params_for,
)
from tid_d2.modeling.pkd import pearson_normalize, pkd_loss

from .helpers import random_inputs, tid_cfg, write_cfg

# ------------------------------------------------------------------------------------------ PKD


def test_pearson_normalize_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std, as mmrazor's
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std
    assert torch.allclose(pearson_normalize(x, valid).flatten(), expected, atol=1e-5)
    # an invalid (padded) location enters neither the statistics nor the output
    x = torch.tensor([1.0, 2.0, 3.0, 100.0]).view(1, 1, 2, 2)
    valid = torch.tensor([[True, True], [True, False]]).view(1, 2, 2)
    assert torch.allclose(
        pearson_normalize(x, valid).flatten(), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-5
    )


def test_pearson_normalize_is_per_channel_over_the_batch():
    """mmrazor's axes: one mean / std per channel over (N, H, W), not per image."""
    x = torch.zeros(2, 2, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 2.0])  # channel 0: image 0 has 0, image 1 has 2
    x[:, 1, 0, 0] = torch.tensor([10.0, 30.0])
    z = pearson_normalize(x, torch.ones(2, 1, 1, dtype=torch.bool))
    s = 1 / math.sqrt(2)  # (v - mean) / sample std of two values
    assert torch.allclose(z[:, 0].flatten(), torch.tensor([-s, s]), atol=1e-5)
    assert torch.allclose(z[:, 1].flatten(), torch.tensor([-s, s]), atol=1e-5)


def test_pkd_loss_by_hand():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, 4)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    # blind to each channel's scale and offset: 1 - r = 0
    scale = torch.tensor([2.0, 0.5, 7.0]).view(1, 3, 1, 1)
    assert pkd_loss(t * scale + 5.0, t, valid).item() == pytest.approx(0.0, abs=1e-6)
    # anti-correlated: z_s = -z_t, so (2 z)^2 / 2 averaged = 2 mean(z^2) = 2 (n - 1) / n
    n = 2 * 4 * 4
    assert pkd_loss(-t, t, valid).item() == pytest.approx(2 * (n - 1) / n, rel=1e-5)
    # gradient reaches the student only
    s = t.clone().mul(-1).requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    pkd_loss(s, tt, valid).backward()
    assert s.grad.abs().sum() > 0 and tt.grad is None


def test_pkd_default_weight_per_family(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "pkd")
    assert method_loss_weight(cfg) == 10.0  # mmrazor's dense-detector configs
    cfg.TID.STUDENT_META_ARCHITECTURE = "GeneralizedRCNN"
    assert method_loss_weight(cfg) == 6.0  # mmrazor's Faster R-CNN config
    cfg.TID.PKD.LOSS_WEIGHT = 2.5
    assert method_loss_weight(cfg) == 2.5
    cfg.TID.MODE = "tid"
    assert method_loss_weight(cfg) == cfg.TID.LOSS_WEIGHT


# ------------------------------------------------------------------------------------------ FGD


def test_fgd_scale_mask_of_two_overlapping_boxes():
    """8 x 8 cells of stride 4. Box A (0, 0, 8, 8) px covers cells floor(0)..ceil(2) = 0..2 on
    each axis (FGD counts both ends): 3 x 3 cells, 1/9 each. Box B (4, 4, 6, 6) covers
    floor(1)..ceil(1.5) = 1..2: 2 x 2 cells, 1/4, which wins where they overlap. Background:
    64 - 9 = 55 cells, 1/55 each. The second image has no box: all 64 cells background."""
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 6.0, 6.0]])
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    fg, bg = fgd_masks(boxes, torch.tensor([0, 0]), valid, stride=4)
    expected = torch.zeros(8, 8)
    expected[0:3, 0:3] = 1 / 9
    expected[1:3, 1:3] = 1 / 4
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 55)
    assert bg[0].sum().item() == pytest.approx(1.0)
    assert fg[1].sum() == 0 and torch.allclose(bg[1], torch.full((8, 8), 1 / 64))


def test_fgd_masks_stay_inside_the_image():
    boxes = torch.tensor([[20.0, 0.0, 40.0, 8.0]])  # reaches past a 6-cell-wide image
    valid = torch.zeros(1, 4, 8, dtype=torch.bool)
    valid[:, :, :6] = True
    fg, bg = fgd_masks(boxes, torch.tensor([0]), valid, stride=4)
    assert fg[:, :, 6:].sum() == 0 and bg[:, :, 6:].sum() == 0
    # cells x 5..10, y 0..2 -> 6 x 3 cells: 1/18 on the 1 x 3 that lie inside
    assert torch.allclose(fg[0, 0:3, 5], torch.full((3,), 1 / 18))
    assert bg.sum().item() == pytest.approx(1.0)
    empty_fg, empty_bg = fgd_masks(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), valid, 4)
    assert empty_fg.sum() == 0 and empty_bg.sum().item() == pytest.approx(1.0)


def test_fgd_attention_by_hand():
    x = torch.tensor([[[[1.0, 3.0]], [[-1.0, 1.0]]]])  # (1, C=2, H=1, W=2)
    spatial, channel = fgd_attention(x, temperature=0.5)
    # spatial: mean_c |x| = (1, 2) -> / 0.5 = (2, 4) -> H W softmax
    e2, e4 = math.exp(2), math.exp(4)
    assert torch.allclose(spatial.flatten(), 2 * torch.tensor([e2, e4]) / (e2 + e4), atol=1e-5)
    # channel: mean_hw |x| = (2, 1) -> (4, 2) -> C softmax
    assert torch.allclose(channel.flatten(), 2 * torch.tensor([e4, e2]) / (e2 + e4), atol=1e-5)
    assert spatial.shape == (1, 1, 2) and channel.shape == (1, 2)


def test_global_context_shapes_and_identity_start():
    gc = GlobalContext(8)
    x = torch.randn(2, 8, 5, 3)
    assert torch.equal(gc(x), x)  # the transform's last conv starts at zero
    assert gc.transform[0].out_channels == 4 and gc.pool.out_channels == 1
    with torch.no_grad():
        gc.transform[-1].bias.fill_(1.0)
    assert torch.allclose(gc(x), x + 1.0)  # the context is added at every location


def test_fgd_terms_by_hand():
    """Teacher all ones: uniform attention (spatial and channel 1 everywhere), so each term is
    its plain weighted error. The student differs by 1 at cell (0, 0) in both channels."""
    p = FGDParams(temperature=0.5, alpha=2.0, beta=3.0, gamma=5.0, lambda_=7.0)
    fgd = FGDImitation({"p3": 2}, p)
    t = torch.ones(1, 2, 4, 4)
    s = t.clone()
    s[0, :, 0, 0] += 1.0
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # cells 0..1 x 0..1: 1/4 each
    fg, bg = fgd_masks(boxes, torch.tensor([0]), torch.ones(1, 4, 4, dtype=torch.bool), 1)
    terms = fgd.terms("p3", s, t, fg, bg)
    assert terms["fg"].item() == pytest.approx(2.0 * (1.0 * 2) * 0.25)  # alpha * err * 1/4
    assert terms["bg"].item() == pytest.approx(0.0)  # the error is inside the box
    # student attention: spatial 16 softmax(2 * (2, 1 x 15)), channel 2 softmax(equal) = 1
    e4, e2 = math.exp(4), math.exp(2)
    a0, a = 16 * e4 / (e4 + 15 * e2), 16 * e2 / (e4 + 15 * e2)
    at = abs(a0 - 1) + 15 * abs(a - 1)
    assert terms["attention"].item() == pytest.approx(5.0 * at, rel=1e-5)
    # GcBlocks start as identities: global term = lambda * sum (s - t)^2 = 7 * 2
    assert terms["global"].item() == pytest.approx(7.0 * 2, rel=1e-5)
    none = fgd.terms("p3", t, t, fg, bg)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in none.values())


def test_fgd_published_defaults_and_overrides():
    cfg = get_cfg()
    assert fgd_params_for(cfg.TID.FGD, "RetinaNet") == FGD_DEFAULTS["RetinaNet"]
    fcos = fgd_params_for(cfg.TID.FGD, "FCOS")
    assert (fcos.temperature, fcos.alpha, fcos.lambda_) == (0.8, 0.0016, 0.000008)
    assert fgd_params_for(cfg.TID.FGD, "GeneralizedRCNN").alpha == 0.00005
    cfg.TID.FGD.ALPHA = 0.01
    assert fgd_params_for(cfg.TID.FGD, "FCOS").alpha == 0.01
    cfg.TID.FGD.TEMPERATURE = 0.0
    with pytest.raises(ValueError, match="TEMPERATURE"):
        fgd_params_for(cfg.TID.FGD, "FCOS")


def test_fgd_modules_train_checkpoint_restore_and_stay_out_of_exports(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "fgd", teacher_width=32, student_width=16)
    cfg.TID.FGD.LOSS_WEIGHT = 100.0
    model = build_model(cfg)
    gc_keys = [k for k in model.state_dict() if k.startswith("tid_loss.")]
    assert {k.split(".")[1] for k in gc_keys} == {"gc_student", "gc_teacher"}
    assert {k.split(".")[2] for k in gc_keys} == set(model.in_features)
    gc_params = list(model.tid_loss.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().clone() for p in gc_params]
    model.train()
    with EventStorage(0) as storage:
        for i in range(2):
            losses = model(random_inputs(2, 64, seed=i))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            storage.iter += 1
        latest = storage.latest()
    assert {"fgd/fg", "fgd/bg", "fgd/attention", "fgd/global", "tid/fg_share"} <= set(latest)
    assert any(not torch.equal(a, b) for a, b in zip(before, gc_params))  # trained

    TIDCheckpointer(model, str(tmp_path)).save("ckpt")
    fresh = build_model(cfg)
    TIDCheckpointer(fresh, str(tmp_path)).load(os.path.join(tmp_path, "ckpt.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # a plain student loads the TID checkpoint, GcBlocks and adapters left out
    plain = build_model(student_cfg_from(cfg))
    TIDCheckpointer(plain, str(tmp_path)).load(os.path.join(tmp_path, "ckpt.pth"))
    assert not any(k.startswith("tid_") for k in plain.state_dict())

    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "export_student", os.path.join(repo, "tools", "export_student.py")
    )
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    import cv2
    import numpy as np

    image = str(tmp_path / "image.png")
    cv2.imwrite(image, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = str(tmp_path / "exported")
    cfg_file = write_cfg(cfg, str(tmp_path / "tid.yaml"))
    export.export(cfg_file, str(tmp_path / "ckpt.pth"), out, image=image)
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["model"]
    assert state.keys() == plain.state_dict().keys()


def test_own_loss_modes_reject_feature_norm(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "pkd")
    cfg.TID.FEATURE_NORM = "channel"
    with pytest.raises(ValueError, match="TID.FEATURE_NORM"):
        build_model(cfg)
