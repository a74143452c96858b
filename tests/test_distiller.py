"""TIDDistiller end to end on tiny models built without weights (CPU, a few steps each)."""

import os

import pytest
import torch
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tid_d2  # noqa: F401 (registration)
from tid_d2.engine import TIDCheckpointer
from tid_d2.modeling.distiller import TID_MODES, student_cfg_from
from tid_d2.modeling.probes import build_probe

from .helpers import random_inputs, save_weights, tid_cfg, tiny_cfg, write_cfg

FAMILIES = ["RetinaNet", "FCOS", "GeneralizedRCNN"]


def _train_steps(model, steps=2, n=2, size=64, boxes=2, seed=0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses = None
    with EventStorage(0) as storage:
        for i in range(steps):
            losses = model(random_inputs(n, size, boxes, seed=seed + i))
            total = sum(losses.values())
            opt.zero_grad()
            total.backward()
            opt.step()
            storage.iter += 1
    return losses, storage


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", TID_MODES)
def test_every_mode_trains_finite(tmp_path, family, mode):
    torch.manual_seed(0)
    model = build_model(tid_cfg(str(tmp_path), family, mode))
    losses, storage = _train_steps(model)
    assert all(torch.isfinite(v) for v in losses.values())
    tid_keys = [k for k in losses if k.startswith("loss_tid_")]
    if mode == "none":
        assert not tid_keys and model.teacher is None
    else:
        assert tid_keys, losses.keys()
        assert all(v.item() > 0 for k, v in losses.items() if k in tid_keys)
        latest = storage.latest()
        assert "tid/lambda" in latest
        if mode in ("tid", "cls_only", "reg_only", "no_ldam"):
            for key in (
                "tid/key_share",
                "tid/rest_share",
                "tid/sig_teacher_mean",
                "tid/sig_student_mean",
            ):
                assert key in latest, key


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_under_mixed_precision(tmp_path, family):
    """What SOLVER.AMP.ENABLED does on a GPU (autocast to fp16 around the forward), here with
    CPU autocast: every loss finite, the TID losses in fp32, gradients reach the student. FCOS
    failed here before its losses ran in fp32 (fvcore's giou_loss mixes half and float)."""
    torch.manual_seed(0)
    model = build_model(tid_cfg(str(tmp_path), family, "tid"))
    model.train()
    with EventStorage(0):
        with torch.autocast("cpu", dtype=torch.float16):
            losses = model(random_inputs(2, 64, 2))
        sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()), losses
    tid = {k: v for k, v in losses.items() if k.startswith("loss_tid_")}
    assert tid and all(v.dtype == torch.float32 for v in tid.values())
    grads = [p.grad for p in model.student.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_lambda_trains_the_student_exactly_like_mode_none(tmp_path, family):
    """With lambda 0 the teacher forward, hooks, significance and regions change nothing in the
    student's own training: the same detection losses and weights, to float rounding (gradients
    summed in another order), after the same steps from the same weights; so a TID-vs-alone
    difference is the imitation gradient, not a side effect of distilling."""
    models = {}
    for mode in ("none", "tid"):
        cfg = tid_cfg(str(tmp_path), family, mode)
        cfg.TID.LOSS_WEIGHT = 0.0
        models[mode] = build_model(cfg)
    models["tid"].student.load_state_dict(models["none"].student.state_dict())
    runs = {}
    for mode, model in models.items():
        opt = torch.optim.SGD(model.student.parameters(), lr=1e-2, momentum=0.9)
        model.train()
        per_step = []
        with EventStorage(0) as storage:
            for i in range(3):
                torch.manual_seed(100 + i)  # the ROI heads sample proposals at random
                losses = model(random_inputs(2, 64, 2, seed=i))
                opt.zero_grad()
                sum(losses.values()).backward()
                opt.step()
                per_step.append({k: v.item() for k, v in losses.items() if "tid" not in k})
                storage.iter += 1
        runs[mode] = per_step
    for alone, tid in zip(runs["none"], runs["tid"]):
        assert alone.keys() == tid.keys()
        assert all(tid[k] == pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in alone.items())
    tid_state = models["tid"].student.state_dict()
    for k, v in models["none"].student.state_dict().items():
        assert torch.allclose(v.float(), tid_state[k].float(), rtol=1e-4, atol=1e-5), k


def test_teacher_frozen_bit_identical_and_outside_state(tmp_path):
    model = build_model(tid_cfg(str(tmp_path), "RetinaNet", "tid"))
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    _train_steps(model, steps=3)
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats too: eval mode
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    teacher_params = {id(p) for p in model.teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    assert not any(k.startswith("teacher") for k in model.state_dict())


def test_adapters_in_optimizer_and_get_gradients(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid", teacher_width=32, student_width=16)
    cfg.SOLVER.BASE_LR = 1e-4
    model = build_model(cfg)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapter_params = list(model.tid_adapters.parameters())
    assert len(adapter_params) == 2 * len(model.in_features)  # weight + bias per level
    assert all(id(p) in in_opt for p in adapter_params)
    model.train()
    with EventStorage(0):
        losses = model(random_inputs(2, 64))
        sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)
    # every trainable parameter gets a gradient (DDP needs no find_unused_parameters)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fixed_adapters_stay_out_of_the_optimizer_and_pass_gradients_on(tmp_path):
    """TID.ADAPTER_TRAIN False: phi_l keeps its start (not in the optimizer, no gradient, bit
    identical after a step) but L_tid still reaches the student through it; its weights are
    saved, so a resumed run uses the same projection."""
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid", teacher_width=32, student_width=16)
    cfg.TID.ADAPTER_INIT, cfg.TID.ADAPTER_TRAIN = "orthogonal", False
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapter_params = list(model.tid_adapters.parameters())
    assert adapter_params and not any(id(p) in in_opt or p.requires_grad for p in adapter_params)
    before = [p.detach().clone() for p in adapter_params]
    model.train()
    with EventStorage(0):
        losses = model(random_inputs(2, 64))
    tid = sum(v for k, v in losses.items() if k.startswith("loss_tid_"))
    fpn_out = model.student.backbone.fpn_output3.weight
    (grad,) = torch.autograd.grad(tid, fpn_out)
    assert grad.abs().sum() > 0  # the student still learns from L_tid
    _train_steps(model, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.tid_adapters.parameters()))
    state = model.state_dict()
    assert all(f"tid_adapters.adapters.{lv}.weight" in state for lv in model.in_features)


def test_adapter_lr_scale_multiplies_only_the_adapters_learning_rate(tmp_path):
    """TID.ADAPTER_LR_SCALE: the adapters' parameter groups get BASE_LR x scale (biases x
    BIAS_LR_FACTOR as well), every other group BASE_LR; the scheduler keeps the ratio; a
    non-positive scale is refused by name."""
    from tid_d2.engine import Trainer
    from tid_d2.modeling.distiller import validate_tid_cfg

    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid", teacher_width=32, student_width=16)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BIAS_LR_FACTOR, cfg.TID.ADAPTER_LR_SCALE = 0.01, 2.0, 50.0
    model = build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    adapter_weights = {id(m.weight) for m in model.tid_adapters.adapters.values()}
    adapter_biases = {id(m.bias) for m in model.tid_adapters.adapters.values()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.add(id(p))
            if id(p) in adapter_weights:
                assert group["lr"] == pytest.approx(0.5)
            elif id(p) in adapter_biases:
                assert group["lr"] == pytest.approx(1.0)
            else:
                assert group["lr"] in (pytest.approx(0.01), pytest.approx(0.02))
    assert adapter_weights | adapter_biases <= seen
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    student_w = id(model.student.backbone.fpn_output3.weight)
    some_adapter = next(iter(adapter_weights))
    assert lrs[some_adapter] / lrs[student_w] == pytest.approx(50.0)
    cfg.TID.ADAPTER_LR_SCALE = 0.0
    with pytest.raises(ValueError, match="TID.ADAPTER_LR_SCALE must be > 0"):
        validate_tid_cfg(cfg)


def test_equal_widths_use_identity_adapters_unless_conv(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid", teacher_width=16, student_width=16)
    assert len(build_model(cfg).tid_adapters.adapters) == 0
    cfg.TID.ADAPTER = "conv"
    assert len(build_model(cfg).tid_adapters.adapters) == 5


def test_orthogonal_adapter_init_keeps_every_direction(tmp_path):
    """TID.ADAPTER_INIT orthogonal: every singular value of phi_l is 1 (narrower, wider or equal
    teacher), and the distiller passes the key through; kaiming (default) is not orthogonal."""
    from tid_d2.modeling.imitation import FeatureAdapters

    torch.manual_seed(0)
    s_ch, t_ch = {"a": 8, "b": 16, "c": 12}, {"a": 16, "b": 8, "c": 12}
    for init, want_orthogonal in (("orthogonal", True), ("kaiming", False)):
        adapters = FeatureAdapters(s_ch, t_ch, mode="conv", init=init).adapters
        for level, conv in adapters.items():
            sv = torch.linalg.svdvals(conv.weight.flatten(1))
            assert len(sv) == min(s_ch[level], t_ch[level])
            assert torch.allclose(sv, torch.ones_like(sv), atol=1e-5) == want_orthogonal, level
            assert not conv.bias.any()
    with pytest.raises(ValueError, match="TID.ADAPTER_INIT"):
        FeatureAdapters(s_ch, t_ch, init="xavier")
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid", teacher_width=32, student_width=16)
    cfg.TID.ADAPTER_INIT = "orthogonal"
    w = build_model(cfg).tid_adapters.adapters["p3"].weight.flatten(1)  # (32, 16)
    assert torch.allclose(w.T @ w, torch.eye(16), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_into_plain_student_with_identical_predictions(tmp_path, family):
    cfg = tid_cfg(str(tmp_path), family, "tid")
    model = build_model(cfg)
    _train_steps(model, steps=1)
    TIDCheckpointer(model, str(tmp_path)).save("ckpt")
    raw = torch.load(os.path.join(tmp_path, "ckpt.pth"), weights_only=True)  # weights-only loadable

    plain = build_model(student_cfg_from(cfg))
    incompatible = plain.load_state_dict(
        {k: v for k, v in raw["model"].items() if not k.startswith("tid_adapters.")}, strict=True
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert set(raw["model"]) - set(plain.state_dict()) == {
        k for k in raw["model"] if k.startswith("tid_adapters.")
    }
    model.eval()
    plain.eval()
    inputs = random_inputs(2, 64, seed=7)
    with torch.no_grad():
        a, b = model(inputs), plain(inputs)
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_resume_roundtrip_restores_student_and_adapters(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    model = build_model(cfg)
    _train_steps(model, steps=1)
    TIDCheckpointer(model, str(tmp_path)).save("ckpt")
    fresh = build_model(cfg)
    TIDCheckpointer(fresh, str(tmp_path)).load(os.path.join(tmp_path, "ckpt.pth"))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize("normalize", ["level", "all_levels", "locations"])
def test_repeated_batch_gives_same_tid_loss(tmp_path, normalize):
    torch.manual_seed(0)
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.REGION.NORMALIZE = normalize
    model = build_model(cfg)
    model.train()
    batch = random_inputs(2, 64, seed=3)
    with EventStorage(0), torch.no_grad():
        one = model(batch)
        two = model(batch + batch)
    for k in one:
        if k.startswith("loss_tid_"):
            assert two[k].item() == pytest.approx(one[k].item(), rel=1e-4), k
    if normalize == "all_levels":  # pooled counts: a level's term is no longer its own mean
        model.region_normalize = "level"
        with EventStorage(0), torch.no_grad():
            per_level = model(batch)
        tid = [k for k in one if k.startswith("loss_tid_")]
        assert sum(one[k].item() for k in tid) < sum(per_level[k].item() for k in tid)
    if normalize == "locations":  # key/weak locations (a small share) no longer weigh 1 / |r|
        model.region_normalize = "level"
        with EventStorage(0), torch.no_grad():
            per_level = model(batch)
        for k in one:
            if k.startswith("loss_tid_"):
                assert one[k].item() <= per_level[k].item() * (1 + 1e-6), k


@pytest.mark.parametrize("family", FAMILIES)
def test_student_with_the_teachers_weights_has_zero_loss_and_equal_significance(tmp_path, family):
    """Self-distillation identity: a student built from the teacher's config and loaded with its
    weights sees the same images as the teacher (format, normalisation, padding), so its features,
    significance and regions equal the teacher's and L_tid is exactly 0."""
    cfg = tid_cfg(str(tmp_path), family, "tid", teacher_width=16, student_width=16)
    cfg.TID.REGION.WEIGHTS = [1.0, 1.0, 1.0]  # every location counts in the loss
    model = build_model(cfg)
    state = torch.load(cfg.TID.TEACHER.WEIGHTS, weights_only=True)["model"]
    model.load_state_dict(state)  # plain student keys load into the distiller
    model.train()
    for m in model.student.modules():  # the teacher runs BN on running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    batch = random_inputs(2, 64, boxes_per_image=3, seed=5)
    with EventStorage(0), torch.no_grad():
        losses = model(batch)
        maps = model.inspect(batch)
    tid = [k for k in losses if k.startswith("loss_tid_")]
    assert tid and all(losses[k].item() == 0.0 for k in tid), {k: losses[k].item() for k in tid}
    for level in model.in_features:
        assert torch.equal(maps["sig_teacher"][level], maps["sig_student"][level]), level
        names = [name for name, _, _ in maps["regions"][level]]
        assert "weak" in names and not maps["regions"][level][names.index("weak")][1].any()


def test_heterogeneous_teacher_student(tmp_path):
    """ResNet teacher (BGR, FPN 32) -> MobileNetV2 student (RGB, FPN 16)."""
    tcfg = tiny_cfg("RetinaNet", width=32)
    tpath = write_cfg(tcfg, str(tmp_path / "teacher.yaml"))
    wpath = save_weights(tcfg, str(tmp_path / "teacher.pth"))
    cfg = tiny_cfg("RetinaNet", width=16)
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_mobilenetv2_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["mb3", "mb4", "mb5"]
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.TID.STUDENT_META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.META_ARCHITECTURE = "TIDDistiller"
    cfg.TID.TEACHER.CONFIG_FILE = tpath
    cfg.TID.TEACHER.WEIGHTS = wpath
    model = build_model(cfg)
    assert model._teacher_flip
    conv = model.tid_adapters.adapters["p3"]
    assert (conv.in_channels, conv.out_channels) == (16, 32)
    losses, _ = _train_steps(model, steps=1)
    assert all(torch.isfinite(v) for v in losses.values())


def test_retinanet_heads_with_group_norm(tmp_path):
    """The RetinaNet plateau configs put GroupNorm in the head (MODEL.RETINANET.NORM "GN"): a GN
    student loaded with its GN teacher's weights has L_tid exactly 0 (the significance reads the
    normalised heads), and a GN student of its own initialisation trains finite."""
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid", 32, 32, retinanet_norm="GN")
    cfg.TID.REGION.WEIGHTS = [1.0, 1.0, 1.0]
    model = build_model(cfg)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.student.head.modules())
    model.load_state_dict(torch.load(cfg.TID.TEACHER.WEIGHTS, weights_only=True)["model"])
    model.train()
    for m in model.student.modules():  # the teacher runs BN on running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    with EventStorage(0), torch.no_grad():
        same = model(random_inputs(2, 64, boxes_per_image=3, seed=5))
    tid = [k for k in same if k.startswith("loss_tid_")]
    assert tid and all(same[k].item() == 0.0 for k in tid), {k: same[k].item() for k in tid}
    torch.manual_seed(0)
    losses, _ = _train_steps(build_model(cfg), steps=2)
    assert all(torch.isfinite(v) for v in losses.values())
    assert sum(losses[k] for k in tid).item() > 0


def test_teacher_sees_its_own_format_and_normalisation(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    model = build_model(cfg)
    model._teacher_flip = True
    x = random_inputs(1, 32)
    imgs = model._teacher_images(x, (64, 64))
    t = model.teacher
    expected = (x[0]["image"].float().flip(0) - t.pixel_mean) / t.pixel_std
    assert torch.allclose(imgs.tensor[0, :, :32, :32], expected)
    assert imgs.tensor[0, :, 32:, :].abs().sum() == 0  # padding is zero, like detectron2's
    assert imgs.image_sizes == [(32, 32)]


def test_teacher_and_student_families_may_differ(tmp_path):
    """A Faster R-CNN teacher can distil into a RetinaNet student: each is scored by its own probe."""
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid", teacher_family="GeneralizedRCNN")
    cfg.TID.IN_FEATURES = ["p3", "p4", "p5", "p6"]  # the R-CNN teacher has no p7
    model = build_model(cfg)
    losses, _ = _train_steps(model, steps=1)
    assert sorted(k for k in losses if "tid" in k) == [f"loss_tid_p{i}" for i in (3, 4, 5, 6)]


def test_empty_gt_images_train(tmp_path):
    for family in FAMILIES:
        model = build_model(tid_cfg(str(tmp_path), family, "tid"))
        losses, _ = _train_steps(model, steps=1, boxes=0)
        assert all(torch.isfinite(v) for v in losses.values()), family


def test_crowded_image_trains(tmp_path):
    model = build_model(tid_cfg(str(tmp_path), "RetinaNet", "tid"))
    losses, _ = _train_steps(model, steps=1, n=1, boxes=1000)
    assert all(torch.isfinite(v) for v in losses.values())


def test_nan_student_feature_names_level(tmp_path):
    model = build_model(tid_cfg(str(tmp_path), "RetinaNet", "tid"))
    with torch.no_grad():
        model.student.backbone.fpn_output4.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.named_parameters()}
    model.train()
    with EventStorage(0), pytest.raises(FloatingPointError, match="'p4'"):
        model(random_inputs(2, 64))
    after = dict(model.named_parameters())
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def test_vis_period_puts_pictures(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.VIS_PERIOD = 1
    model = build_model(cfg)
    model.train()
    with EventStorage(0) as storage:
        model(random_inputs(2, 64))
    assert len(storage._vis_data) == 1
    name, img, _ = storage._vis_data[0]
    assert name == "tid/significance_p3"
    assert img.shape[0] == 3 and img.shape[1] == 64 + 14 and img.shape[2] == 4 * 64
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_warmup_ramps_lambda(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "fitnet")
    cfg.TID.WARMUP_ITERS = 4
    cfg.TID.LOSS_WEIGHT = 2.0
    model = build_model(cfg)
    assert [model.lambda_now(i) for i in (0, 1, 3, 10)] == [0.5, 1.0, 2.0, 2.0]


def test_adapter_warmup_keeps_tid_gradient_out_of_the_student(tmp_path):
    """During TID.ADAPTER_WARMUP_ITERS the imitation loss trains the adapters only."""
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "fitnet", teacher_width=32, student_width=16)
    cfg.TID.ADAPTER_WARMUP_ITERS = 2
    model = build_model(cfg)
    model.train()
    student_params = [p for p in model.student.backbone.parameters() if p.requires_grad]
    for it, reaches_student in ((1, False), (2, True)):
        model.zero_grad(set_to_none=True)
        with EventStorage(it):
            losses = model(random_inputs(2, 64))
        tid = sum(v for k, v in losses.items() if k.startswith("loss_tid"))
        tid.backward()
        assert all(p.grad is not None for p in model.tid_adapters.parameters())
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_params)
        assert got == reaches_student, it


# ----------------------------------------------------------------------------- mismatches
def test_class_count_mismatch(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.TEACHER.OPTS = ["MODEL.RETINANET.NUM_CLASSES", "5"]
    tcfg = tiny_cfg("RetinaNet", width=32)
    tcfg.MODEL.RETINANET.NUM_CLASSES = 5
    cfg.TID.TEACHER.WEIGHTS = save_weights(tcfg, str(tmp_path / "t5.pth"))
    with pytest.raises(ValueError, match="different numbers of classes"):
        build_model(cfg)


def test_missing_level(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.IN_FEATURES = ["p2"]
    with pytest.raises(ValueError, match="'p2' is not an output of the student's backbone"):
        build_model(cfg)


def test_level_not_read_by_teacher_head(tmp_path):
    cfg = tid_cfg(str(tmp_path), "GeneralizedRCNN", "tid", teacher_family="RetinaNet")
    with pytest.raises(ValueError, match="not an output of the teacher's backbone"):
        build_model(cfg)  # the RetinaNet teacher has no p2


def test_stride_mismatch(tmp_path, monkeypatch):
    import tid_d2.modeling.distiller as distiller_mod

    real = distiller_mod.build_teacher

    def patched(cfg):
        teacher, tcfg = real(cfg)
        teacher.backbone._out_feature_strides["p4"] = 32
        return teacher, tcfg

    monkeypatch.setattr(distiller_mod, "build_teacher", patched)
    with pytest.raises(ValueError, match="'p4' has stride 16 in the student but 32 in the teacher"):
        build_model(tid_cfg(str(tmp_path), "RetinaNet", "tid"))


def test_unsupported_detector_family():
    class NotADetector(torch.nn.Module):
        backbone = torch.nn.Identity()

    with pytest.raises(ValueError, match="no significance probe for detector NotADetector"):
        build_probe(NotADetector(), None, None)


def test_bad_tid_settings(tmp_path):
    cases = [
        ("TID.MODE", "fancy", "unknown TID.MODE"),
        ("TID.SIG.CLS_THRESHOLDS", [0.2, 1.5], r"CLS_THRESHOLDS must be 2 number"),
        ("TID.SIG.IOU_THRESHOLDS", [0.6, 0.5], "low <= high"),
        ("TID.REGION.WEIGHTS", [1.0, -0.5, 0.05], "non-negative"),
        ("TID.REGION.WEAK_RULE", "relative", "WEAK_RULE"),
        ("TID.REGION.NORMALIZE", "image", "TID.REGION.NORMALIZE"),
    ]
    for key, value, message in cases:
        cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
        with pytest.raises(ValueError, match=message):
            build_model(cfg)


# ----------------------------------------------------------------------------- teacher loading
def test_missing_teacher_weights_and_config(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.TEACHER.WEIGHTS = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth' does not exist"):
        build_model(cfg)
    cfg.TID.TEACHER.WEIGHTS = ""
    with pytest.raises(ValueError, match="TID.TEACHER.WEIGHTS is empty"):
        build_model(cfg)
    cfg.TID.TEACHER.CONFIG_FILE = str(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml' does not exist"):
        build_model(cfg)


def test_teacher_weights_of_another_architecture(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.TEACHER.WEIGHTS = save_weights(
        tiny_cfg("GeneralizedRCNN", 32), str(tmp_path / "rcnn.pth")
    )
    with pytest.raises(ValueError, match="missing keys .*unexpected keys"):
        build_model(cfg)


def test_truncated_teacher_checkpoint(tmp_path):
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    data = open(cfg.TID.TEACHER.WEIGHTS, "rb").read()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    cfg.TID.TEACHER.WEIGHTS = str(bad)
    with pytest.raises(ValueError, match="truncated"):
        build_model(cfg)


def test_pickle_weights_refused_unless_allowed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.TEACHER.WEIGHTS = str(path)
    with pytest.raises(ValueError, match="pickle .*TID.ALLOW_PICKLE_WEIGHTS"):
        build_model(cfg)
    assert not marker.exists()
    # the same for a student checkpoint through the checkpointer
    plain = build_model(tiny_cfg("RetinaNet"))
    with pytest.raises(ValueError, match="ALLOW_PICKLE_WEIGHTS"):
        TIDCheckpointer(plain, str(tmp_path)).load(str(path))
    assert not marker.exists()
    # a crafted .pth is refused by the weights-only loader
    evil_pth = tmp_path / "evil.pth"
    torch.save({"model": {"x": Evil()}}, evil_pth)
    marker.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="could not be read"):
        TIDCheckpointer(plain, str(tmp_path)).load(str(evil_pth))
    assert not marker.exists()
