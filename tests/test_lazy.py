"""TID from LazyConfig (Python) configs: one definition of the defaults for both config systems,
probes on LazyConfig-built detectron2 models, the shapes FCOS run from the Python config step for
step equal to the yaml run, ``tools/lazy_train_net.py`` end to end, the tools on Python configs,
and the COCO / ViTDet configs built."""

import glob
import inspect
import json
import os
import shutil
import sys
import types

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.modeling import build_model
from detectron2.solver import LRMultiplier, build_lr_scheduler, build_optimizer
from detectron2.utils.events import EventStorage
from omegaconf import ListConfig, OmegaConf
from PIL import Image

import tid_d2  # noqa: F401
from tid_d2.config import get_cfg
from tid_d2.data import ShapesSpec, register_tid_shapes
from tid_d2.lazy import (
    build_lazy_distiller,
    distiller_kwargs,
    is_lazy_config,
    load_lazy_config,
    tid_cfg_from_lazy,
    tid_defaults,
)
from tid_d2.modeling import distiller as distiller_module
from tid_d2.modeling.distiller import TIDDistiller
from tid_d2.modeling.probes import build_probe

from .helpers import (
    load_script,
    random_inputs,
    run_script,
    shared_teacher_weights,
    tiny_cfg,
    write_cfg,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = os.path.join(REPO, "configs", "lazy")
PREFIX = "mini_lazy"


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- (a) defaults
def test_lazy_defaults_are_the_yacs_defaults_key_for_key():
    yacs = _flat(get_cfg().TID)
    lazy = _flat(tid_defaults())
    assert {k.lower(): v for k, v in yacs.items()} == lazy
    assert len(lazy) == len(yacs) > 30
    # and back: the defaults given as a lazy dict are the yacs node, value for value
    assert tid_cfg_from_lazy(tid_defaults()).TID == get_cfg().TID
    assert tid_cfg_from_lazy(None).TID == get_cfg().TID


def test_lazy_tid_dict_merges_like_yacs_opts():
    lazy = tid_cfg_from_lazy(
        dict(
            mode="fitnet",
            loss_weight=1,  # an int for a float key is taken as a float
            in_features=("p3", "p4"),
            sig=dict(cls_thresholds=[0.1, 0.6]),
            region=dict(weights=[1.0, 2.0, 0.1], normalize="all_levels"),
            teacher=dict(config_file="t.py", opts=["model.num_classes=6"]),
        )
    )
    yacs = get_cfg()
    yacs.merge_from_list(
        ["TID.MODE", "fitnet", "TID.LOSS_WEIGHT", "1.0", "TID.IN_FEATURES", "['p3', 'p4']"]
        + ["TID.SIG.CLS_THRESHOLDS", "[0.1, 0.6]", "TID.REGION.WEIGHTS", "[1.0, 2.0, 0.1]"]
        + ["TID.REGION.NORMALIZE", "all_levels", "TID.TEACHER.CONFIG_FILE", "t.py"]
        + ["TID.TEACHER.OPTS", "['model.num_classes=6']"]
    )
    assert lazy.TID == yacs.TID
    assert isinstance(lazy.TID.LOSS_WEIGHT, float)


@pytest.mark.parametrize(
    "tid, match",
    [
        (dict(loss_wieght=0.1), r"unknown TID setting 'tid\.loss_wieght'"),
        (dict(sig=dict(iou_threshold=[0.3, 0.6])), r"'tid\.sig\.iou_threshold'.*iou_thresholds"),
        (dict(teacher=dict(weight="x.pth")), r"'tid\.teacher\.weight'.*weights"),
        (dict(LOSS_WEIGHT=0.1), r"'tid\.LOSS_WEIGHT' \(keys are lower-case: 'loss_weight'\)"),
        (dict(loss_weight="big"), r"'tid\.loss_weight' must be a float"),
        (dict(sig=0.5), r"'tid\.sig' must be a dict"),
    ],
)
def test_lazy_tid_dict_rejects_unknown_keys_and_types(tid, match):
    with pytest.raises(ValueError, match=match):
        tid_cfg_from_lazy(tid)


def test_lazy_distiller_kwargs_are_from_configs(monkeypatch):
    """The lazy builder passes TIDDistiller.__init__ every argument, with the values
    from_config gives for the same TID settings (a new TID key cannot be forgotten)."""
    cfg = tid_cfg_from_lazy(
        dict(mode="fgd", warmup_iters=5, region=dict(key_thresh=2.5), fgd=dict(alpha=0.5)),
        student_meta_architecture="FCOS",
        vis_period=7,
    )
    monkeypatch.setattr(distiller_module, "build_model", lambda cfg: "student")
    monkeypatch.setattr(distiller_module, "build_teacher", lambda cfg: ("teacher", "tcfg"))
    from_yacs = TIDDistiller.from_config(cfg)
    models = {"student", "student_cfg", "teacher", "teacher_cfg"}
    assert {k: v for k, v in from_yacs.items() if k not in models} == distiller_kwargs(cfg)
    params = set(inspect.signature(TIDDistiller.__init__).parameters) - {"self"}
    formats = {"student_input_format", "teacher_input_format"}
    assert params == set(distiller_kwargs(cfg)) | models | formats


def test_is_lazy_config_tells_python_and_saved_lazy_yaml_from_yacs(tmp_path):
    assert is_lazy_config(os.path.join(LAZY, "shapes", "tid_fcos.py"))
    assert not is_lazy_config(os.path.join(REPO, "configs", "shapes", "tid_fcos.yaml"))
    saved = str(tmp_path / "saved.yaml")
    LazyConfig.save(load_lazy_config(os.path.join(LAZY, "shapes", "fcos_mnv2_teacher.py")), saved)
    assert is_lazy_config(saved)


# ----------------------------------------------------------------------------- (b) probes
_SHRUNK = """
from detectron2 import model_zoo
from detectron2.layers import ShapeSpec

_base = model_zoo.get_config("COCO-Detection/{arch}_R_50_FPN_1x.py")
model = _base.model
dataloader = _base.dataloader
# ResNet-18 from scratch, FPN of {width}, a 1-conv head, 3 classes
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # a Bottleneck argument
model.backbone.bottom_up.freeze_at = 0
model.backbone.out_channels = {width}
model.backbone.top_block.in_channels = {p6_in}
model.head.input_shape = [ShapeSpec(channels={width})] * 5
model.head.conv_dims = [{width}]
model.num_classes = 3
{extra}
"""


def _shrunk_config(tmp_path, arch: str, width: int) -> str:
    """A LazyConfig file of detectron2's own ``COCO-Detection/<arch>_R_50_FPN_1x.py`` shrunk."""
    path = str(tmp_path / f"{arch}_{width}.py")
    p6_in = 512 if arch == "retinanet" else width  # RetinaNet's P6 from C5, FCOS's from P5
    with open(path, "w") as f:
        extra = 'model.head.norm = ""' if arch == "fcos" else ""  # no GN of 32 groups
        f.write(_SHRUNK.format(arch=arch, width=width, p6_in=p6_in, extra=extra))
    return path


def _lazy_teacher(tmp_path, config_file: str, seed: int = 1) -> str:
    torch.manual_seed(seed)
    teacher = instantiate(load_lazy_config(config_file).model)
    path = str(tmp_path / (os.path.basename(config_file) + ".pth"))
    torch.save({"model": teacher.state_dict()}, path)
    return path


def _one_step(model, size=64, seed=0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    with EventStorage(0) as storage:
        losses = model(random_inputs(2, size, 2, seed=seed))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return losses, storage


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_probes_on_lazyconfig_built_detectron2_models(tmp_path, arch):
    teacher_file = _shrunk_config(tmp_path, arch, width=32)
    student = load_lazy_config(_shrunk_config(tmp_path, arch, width=16)).model
    node = L(build_lazy_distiller)(
        student=student,
        tid=dict(
            teacher=dict(config_file=teacher_file, weights=_lazy_teacher(tmp_path, teacher_file))
        ),
    )
    torch.manual_seed(0)
    model = instantiate(node)
    assert model.student_cfg is None and model.teacher_cfg is None
    assert model.student_probe.model_cfg is None
    assert model.tid_adapters is not None and model.in_features == ["p3", "p4", "p5", "p6", "p7"]
    expected = (0.4, 0.5)  # RetinaNet: its Matcher's [0.4, 0.5]; FCOS: TID's anchor-free pair
    assert model.student_probe.default_iou_thresholds() == expected
    losses, storage = _one_step(model)
    assert all(torch.isfinite(v) for v in losses.values())
    assert {f"loss_tid_p{i}" for i in range(3, 8)} <= set(losses)
    assert all(losses[f"loss_tid_p{i}"].item() > 0 for i in range(3, 8))
    assert "tid/key_share" in storage.latest()


def test_lazy_student_with_a_yacs_teacher(tmp_path):
    """tid.teacher.config_file may be a yacs .yaml: built by build_teacher, KEY VALUE opts."""
    tcfg = tiny_cfg("RetinaNet", width=32)
    teacher_yaml = write_cfg(tcfg, str(tmp_path / "teacher.yaml"))
    weights = shared_teacher_weights(tcfg, seed=1)
    student = load_lazy_config(_shrunk_config(tmp_path, "retinanet", width=16)).model
    node = L(build_lazy_distiller)(
        student=student,
        tid=dict(
            mode="cls_only",
            teacher=dict(config_file=teacher_yaml, weights=weights, opts=["SEED", "3"]),
        ),
    )
    model = instantiate(node)
    assert model.teacher_cfg.SEED == 3 and model.teacher_cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert not model.teacher.training and not any(
        p.requires_grad for p in model.teacher.parameters()
    )
    losses, _ = _one_step(model)
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_tid_p3" in losses


@pytest.mark.parametrize("family", ["RetinaNet", "GeneralizedRCNN"])
def test_probe_reads_the_yacs_thresholds_from_the_modules(family):
    """Without a yacs config a probe reads each matcher's IoU thresholds from the model: the same
    significance as from the config (RetinaNet anchors, the RPN and the ROI heads)."""
    cfg = tiny_cfg(family)
    torch.manual_seed(0)
    model = build_model(cfg)
    from_cfg, from_modules = build_probe(model, cfg, cfg), build_probe(model, None, cfg)
    model.train()
    inputs = random_inputs(2, 64, 3, seed=0)
    with EventStorage(0):
        model(inputs)
    gt = [x["instances"] for x in inputs]
    sizes = [(64, 64)] * 2
    a, b = from_cfg.significance(gt, sizes), from_modules.significance(gt, sizes)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if family == "GeneralizedRCNN":
        from tid_d2.modeling.probes import _matcher_thresholds

        assert _matcher_thresholds(model.proposal_generator.anchor_matcher) == [0.3, 0.7]
        assert _matcher_thresholds(model.roi_heads.proposal_matcher) == [0.5]


def test_unknown_lazy_key_in_a_config_is_an_error_naming_it():
    cfg = load_lazy_config(os.path.join(LAZY, "shapes", "tid_fcos.py"), ["model.tid.kappa=3"])
    with pytest.raises(ValueError, match=r"unknown TID setting 'tid\.kappa'"):
        instantiate(cfg.model)


# ----------------------------------------------------------------------------- (c) yaml == py
def _yaml_and_lazy_tid_fcos(tmp_path, monkeypatch):
    """The shipped shapes FCOS TID pair built from the yaml and from the Python configs, with the
    same teacher weights (saved from the yaml teacher) and the same schedule length overrides."""
    monkeypatch.chdir(REPO)  # the configs name their teachers relative to the repository
    tyaml = get_cfg()
    tyaml.merge_from_file("configs/shapes/fcos_mnv2_teacher.yaml")
    tyaml.MODEL.MOBILENET.IMAGENET_INIT = False
    torch.manual_seed(1)
    weights = str(tmp_path / "teacher.pth")
    torch.save({"model": build_model(tyaml).state_dict()}, weights)
    ycfg = get_cfg()
    ycfg.merge_from_file("configs/shapes/tid_fcos.yaml")
    ycfg.merge_from_list(["TID.TEACHER.WEIGHTS", weights])
    ycfg.merge_from_list(["SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "1"])
    lcfg = load_lazy_config(
        "configs/lazy/shapes/tid_fcos.py",
        [f"model.tid.teacher.weights={weights}", "train.max_iter=10"]
        + ["lr_multiplier.warmup_length=0.1"],
    )
    return ycfg, lcfg


def test_shapes_fcos_from_the_python_config_matches_the_yaml_run_step_for_step(
    tmp_path, monkeypatch
):
    ycfg, lcfg = _yaml_and_lazy_tid_fcos(tmp_path, monkeypatch)
    torch.manual_seed(0)
    ymodel = build_model(ycfg)
    torch.manual_seed(0)
    lmodel = instantiate(lcfg.model)
    # same seed -> the same student and adapters, key for key and bit for bit
    ystate, lstate = ymodel.state_dict(), lmodel.state_dict()
    assert ystate.keys() == lstate.keys() and len(ystate) > 100
    assert all(torch.equal(ystate[k], lstate[k]) for k in ystate)
    assert type(lmodel.student) is type(ymodel.student)
    assert (lmodel.student_input_format, lmodel.teacher_input_format) == ("BGR", "RGB")
    assert lmodel.in_features == ymodel.in_features and lmodel.loss_weight == 0.001
    assert lmodel.vis_period == ymodel.vis_period == 200
    # what train_net.py and tools/lazy_train_net.py build from each config
    yopt = build_optimizer(ycfg, ymodel)
    lcfg.optimizer.params.model = lmodel
    lopt = instantiate(lcfg.optimizer)
    ysched = build_lr_scheduler(ycfg, yopt)
    lsched = LRMultiplier(lopt, instantiate(lcfg.lr_multiplier), lcfg.train.max_iter)
    assert type(lopt).__name__ == type(yopt).__name__ == "SGDWithGradientClip"
    hyper = ("lr", "momentum", "weight_decay", "nesterov", "dampening", "foreach")
    assert [{k: g[k] for k in hyper} | {"n": len(g["params"])} for g in yopt.param_groups] == [
        {k: g[k] for k in hyper} | {"n": len(g["params"])} for g in lopt.param_groups
    ]
    for step in range(3):
        results = []
        for model, opt, sched in ((ymodel, yopt, ysched), (lmodel, lopt, lsched)):
            model.train()
            with EventStorage(step) as storage, torch.jit.optimized_execution(False):
                losses = model(random_inputs(2, 160, 3, seed=step))
                opt.zero_grad()
                sum(losses.values()).backward()
                opt.step()
                sched.step()
            results.append(({k: v.item() for k, v in losses.items()}, storage.latest()))
        (ylosses, ylog), (llosses, llog) = results
        assert ylosses.keys() == llosses.keys() and "loss_tid_p3" in ylosses
        for k in ylosses:
            assert ylosses[k] == pytest.approx(llosses[k], rel=1e-6, abs=1e-9), (step, k)
        assert {k: v[0] for k, v in ylog.items()} == pytest.approx(
            {k: v[0] for k, v in llog.items()}
        )
        assert yopt.param_groups[0]["lr"] == pytest.approx(lopt.param_groups[0]["lr"])
    assert yopt.param_groups[0]["lr"] > 0.005  # the steps did train (warm-up done)
    ystate, lstate = ymodel.state_dict(), lmodel.state_dict()
    assert all(torch.allclose(ystate[k], lstate[k], rtol=1e-5, atol=1e-7) for k in ystate)


def _mapper_facts(mapper):
    def aug(a):  # the augmentation's settings (a LazyConfig holds lists where yacs has tuples)
        return type(a).__name__, {
            k: list(v) if isinstance(v, (tuple, list, ListConfig)) else v
            for k, v in vars(a).items()
        }

    return (
        [aug(a) for a in mapper.augmentations.augs],
        mapper.image_format,
        mapper.is_train,
        mapper.use_instance_mask,
        mapper.use_keypoint,
        mapper.recompute_boxes,
        mapper.proposal_topk,
    )


@pytest.mark.parametrize(
    "yaml_file, py_file",
    [("fcos_mnv2_teacher.yaml", "fcos_mnv2_teacher.py"), ("tid_fcos.yaml", "tid_fcos.py")],
)
def test_shapes_python_configs_have_the_yaml_data_and_schedule(yaml_file, py_file):
    ycfg = get_cfg()
    ycfg.merge_from_file(os.path.join(REPO, "configs", "shapes", yaml_file))
    lcfg = load_lazy_config(os.path.join(LAZY, "shapes", py_file))
    dl, train = lcfg.dataloader, lcfg.train
    for is_train, node in ((True, dl.train.mapper), (False, dl.test.mapper)):
        assert _mapper_facts(DatasetMapper(ycfg, is_train)) == _mapper_facts(instantiate(node))
    assert [dl.train.dataset.names] == list(ycfg.DATASETS.TRAIN)
    assert [dl.test.dataset.names] == list(ycfg.DATASETS.TEST)
    assert dl.evaluator.dataset_name == ycfg.DATASETS.TEST[0]
    assert dl.train.total_batch_size == ycfg.SOLVER.IMS_PER_BATCH
    assert dl.train.num_workers == dl.test.num_workers == ycfg.DATALOADER.NUM_WORKERS
    assert (train.max_iter, train.checkpointer.period, train.eval_period, train.seed) == (
        ycfg.SOLVER.MAX_ITER,
        ycfg.SOLVER.CHECKPOINT_PERIOD,
        ycfg.TEST.EVAL_PERIOD,
        ycfg.SEED,
    )
    assert train.device == ycfg.MODEL.DEVICE
    # the learning rate of every iteration
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ycfg.SOLVER.BASE_LR)
    lopt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lcfg.optimizer.lr)
    ysched = build_lr_scheduler(ycfg, opt)
    lsched = LRMultiplier(lopt, instantiate(lcfg.lr_multiplier), train.max_iter)
    lrs = []
    for _ in range(train.max_iter):
        lrs.append((opt.param_groups[0]["lr"], lopt.param_groups[0]["lr"]))
        ysched.step()
        lsched.step()
    assert [a for a, _ in lrs] == pytest.approx([b for _, b in lrs])


# ----------------------------------------------------------------------------- (d) training
lazy_train_net = load_script("lazy_train_net", os.path.join(REPO, "tools", "lazy_train_net.py"))

TINY = [
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
    "dataloader.train.mapper.augmentations.0.max_size=96",
    "dataloader.test.mapper.augmentations.0.short_edge_length=96",
    "dataloader.test.mapper.augmentations.0.max_size=96",
    f"dataloader.train.dataset.names={PREFIX}_train",
    f"dataloader.test.dataset.names={PREFIX}_test",
    "train.max_iter=3",
    "train.log_period=1",
    "lr_multiplier.warmup_length=0.34",
]


def run_lazy_train_net(argv):
    return run_script(lazy_train_net, argv)


@pytest.fixture(scope="module")
def lazy_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy_runs")
    register_tid_shapes(
        PREFIX, ShapesSpec(seed=0, sizes=(12, 6, 6), image_size=96, root=str(root / "data"))
    )
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        teacher = str(root / "teacher")
        teacher_res = run_lazy_train_net(
            ["--config-file", f"{LAZY}/shapes/fcos_mnv2_teacher.py", f"train.output_dir={teacher}"]
            + TINY
        )
        tid = str(root / "tid")
        tid_opts = TINY + [
            f"model.tid.teacher.weights={teacher}/model_final.pth",
            "model.tid.teacher.eval_before_train=True",
            "model.vis_period=2",
            "train.eval_period=2",
        ]
        tid_res = run_lazy_train_net(
            ["--config-file", f"{LAZY}/shapes/tid_fcos.py", f"train.output_dir={tid}"] + tid_opts
        )
        yield {
            "root": root,
            "teacher": teacher,
            "tid": tid,
            "tid_opts": tid_opts,
            "teacher_res": teacher_res,
            "tid_res": tid_res,
        }
    finally:
        os.chdir(cwd)


def _metrics(folder):
    return [json.loads(x) for x in open(os.path.join(folder, "metrics.json"))]


def test_lazy_train_net_trains_teacher_and_tid_student_with_evaluation(lazy_runs):
    assert set(lazy_runs["teacher_res"]["bbox"]) >= {"AP", "AP50"}
    assert set(lazy_runs["tid_res"]["bbox"]) >= {"AP", "AP50"}
    records = _metrics(lazy_runs["tid"])
    keys = set().union(*records)
    assert {f"loss_tid_p{i}" for i in range(3, 8)} <= keys
    assert {"tid/key_share", "tid/weak_share", "tid/rest_share", "tid/lambda", "lr"} <= keys
    assert f"teacher/{PREFIX}_test/AP" in keys  # evaluated before distilling
    # periodic evaluation (after the 2nd of 3 iterations) and the final one (logged at max_iter)
    assert [r["iteration"] for r in records if "bbox/AP" in r] == [1, 3]
    ckpt = torch.load(os.path.join(lazy_runs["tid"], "model_final.pth"), weights_only=True)
    assert not any(k.startswith("teacher") for k in ckpt["model"])
    assert any(k.startswith("tid_adapters.") for k in ckpt["model"])
    assert "module_python_state" in ckpt["trainer"]  # FCOS's loss normaliser, for resume
    assert os.path.isfile(os.path.join(lazy_runs["tid"], "config.yaml"))
    assert glob.glob(os.path.join(lazy_runs["tid"], "events.out.tfevents.*"))


def test_lazy_train_net_eval_only_and_resume(lazy_runs, monkeypatch):
    monkeypatch.chdir(REPO)
    ckpt = os.path.join(lazy_runs["tid"], "model_final.pth")
    res = run_lazy_train_net(
        ["--config-file", f"{LAZY}/shapes/tid_fcos.py", "--eval-only"]
        + lazy_runs["tid_opts"]
        + [f"train.init_checkpoint={ckpt}", f"train.output_dir={lazy_runs['root'] / 'eval'}"]
    )
    assert set(res["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # the same numbers as the run's own final evaluation of that checkpoint
    assert res["bbox"]["AP50"] == pytest.approx(lazy_runs["tid_res"]["bbox"]["AP50"], nan_ok=True)
    resumed = str(lazy_runs["root"] / "resumed")
    shutil.copytree(lazy_runs["tid"], resumed)  # the other tests read the run as it was
    run_lazy_train_net(
        ["--config-file", f"{LAZY}/shapes/tid_fcos.py", "--resume"]
        + lazy_runs["tid_opts"]
        + [f"train.output_dir={resumed}", "train.max_iter=4"]
    )
    train_iters = [r["iteration"] for r in _metrics(resumed) if "loss_tid_p3" in r]
    assert train_iters[-1] == 3 and train_iters.count(3) == 1  # continued at iteration 3


# ----------------------------------------------------------------------------- (e) tools
def test_export_student_from_a_lazy_tid_checkpoint(lazy_runs, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    export = load_script("export_student", os.path.join(REPO, "tools", "export_student.py"))
    out = str(lazy_runs["root"] / "exported")
    rc = export.main(
        [
            "--config-file",
            f"{LAZY}/shapes/tid_fcos.py",
            "--weights",
            os.path.join(lazy_runs["tid"], "model_final.pth"),
            "--output",
            out,
        ]
        + lazy_runs["tid_opts"]
        + ["model.student.test_score_thresh=0.0"]  # detections to compare, even untrained
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and " 0 detections" not in printed
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert set(state) == {"model"}
    assert not any(k.startswith(("tid_", "teacher", "student.")) for k in state["model"])
    text = open(os.path.join(out, "config.yaml")).read()
    assert "tid" not in text.replace("tid_d2", "").replace("tid_shapes", "").replace(PREFIX, "")
    cfg = LazyConfig.load(os.path.join(out, "config.yaml"))
    model = instantiate(cfg.model)
    assert type(model).__name__ == "FCOS"
    assert model.state_dict().keys() == state["model"].keys()
    # a plain detector config is not a TID config
    rc = export.main(
        ["--config-file", f"{LAZY}/shapes/fcos_mnv2_teacher.py", "--weights", "x.pth"]
        + ["--output", out]
    )
    assert rc == 2 and "not a TID config" in capsys.readouterr().err


def test_check_teacher_and_visualize_significance_on_a_lazy_config(lazy_runs, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    tool = load_script("check_teacher", os.path.join(REPO, "tools", "check_teacher.py"))
    rc = tool.main(
        ["--config-file", f"{LAZY}/shapes/tid_fcos.py", "--output", str(lazy_runs["root"] / "ck")]
        + lazy_runs["tid_opts"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "loaded strictly" in out and f"teacher on {PREFIX}_test: AP" in out
    rc = tool.main(
        ["--config-file", f"{LAZY}/shapes/tid_fcos.py"]
        + lazy_runs["tid_opts"]
        + ["model.tid.teacher.weights=/nonexistent/teacher.pth"]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err

    vis = load_script(
        "visualize_significance", os.path.join(REPO, "tools", "visualize_significance.py")
    )
    folder = str(lazy_runs["root"] / "vis")
    rc = vis.main(
        ["--config-file", f"{LAZY}/shapes/tid_fcos.py"]
        + ["--weights", os.path.join(lazy_runs["tid"], "model_final.pth")]
        + ["--dataset", f"{PREFIX}_val", "--num-images", "1", "--levels", "p3", "--output", folder]
        + lazy_runs["tid_opts"]
    )
    assert rc == 0
    pngs = glob.glob(os.path.join(folder, "*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size[0] > 400


# ----------------------------------------------------------------------------- COCO configs
@pytest.fixture
def timm_or_stand_in(monkeypatch):
    """detectron2's ViT imports ``timm.models.layers`` (DropPath, Mlp). Without timm installed,
    a stand-in with timm's parameter names (fc1, fc2) lets the ViTDet config be built."""
    try:
        import timm.models.layers  # noqa: F401

        return
    except ImportError:
        pass
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU, **_):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden_features or in_features)
            self.act = act_layer()
            self.fc2 = nn.Linear(hidden_features or in_features, in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    layers = types.ModuleType("timm.models.layers")
    layers.Mlp = Mlp
    layers.DropPath = lambda p=0.0: nn.Identity()
    for name, mod in (
        ("timm", types.ModuleType("timm")),
        ("timm.models", types.ModuleType("timm.models")),
        ("timm.models.layers", layers),
    ):
        monkeypatch.setitem(sys.modules, name, mod)


# ViT-B shrunk for the build (ViT depth 2, width 64, a small box head); the student is full size
_VIT_TINY = [
    "model.backbone.net.embed_dim=64",
    "model.backbone.net.depth=2",
    "model.backbone.net.num_heads=2",
    "model.backbone.net.window_block_indexes=[0]",
    "model.roi_heads.box_head.conv_dims=[32]",
    "model.roi_heads.box_head.fc_dims=[64]",
]


@pytest.mark.parametrize(
    "config, teacher_opts, levels, formats",
    [
        ("tid_retinanet_R101_R50_1x.py", [], ["p3", "p4", "p5", "p6", "p7"], ("BGR", "BGR")),
        ("tid_vitdet_b_R50.py", _VIT_TINY, ["p2", "p3", "p4", "p5", "p6"], ("BGR", "RGB")),
    ],
)
def test_coco_lazy_configs_build(
    tmp_path, monkeypatch, timm_or_stand_in, config, teacher_opts, levels, formats
):
    monkeypatch.chdir(REPO)
    cfg = load_lazy_config(os.path.join(LAZY, "coco", config))
    tfile = cfg.model.tid.teacher.config_file
    assert os.path.isfile(tfile) and cfg.model.tid.allow_pickle_weights
    weights = str(tmp_path / "teacher.pth")
    torch.manual_seed(0)
    torch.save(
        {"model": instantiate(load_lazy_config(tfile, teacher_opts).model).state_dict()}, weights
    )
    cfg = load_lazy_config(
        os.path.join(LAZY, "coco", config),
        [
            f"model.tid.teacher.weights={weights}",
            "model.tid.teacher.opts=" + json.dumps(teacher_opts),
        ],
    )
    model = instantiate(cfg.model)
    assert isinstance(model, TIDDistiller) and model.in_features == levels
    assert (model.student_input_format, model.teacher_input_format) == formats
    assert model.student_probe.num_classes() == model.teacher_probe.num_classes() == 80
    assert model.student_probe.model_cfg is None and model.teacher_probe.model_cfg is None
    # the teacher's own config is a complete LazyConfig (its schedule and data), as is the TID one
    for c in (cfg, load_lazy_config(tfile)):
        assert {"dataloader", "optimizer", "lr_multiplier", "train"} <= set(c)
    assert OmegaConf.select(cfg, "train.init_checkpoint", default=None) is not None
