"""train_net.py and the tools on a tiny tid_shapes dataset: real configs, real checkpoints,
COCOEvaluator. One teacher and one TID student are trained for a few iterations per session."""

import glob
import json
import os
import sys

import pytest
import torch
from PIL import Image

import tid_d2  # noqa: F401
from tid_d2.data import ShapesSpec, register_tid_shapes

from .helpers import load_script, run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "mini_shapes"
# Small, fast versions of the shipped configs (same files, command-line overrides only).
TINY = [
    "MODEL.FPN.OUT_CHANNELS",
    "16",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "3",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.BASE_LR",
    "0.001",
    "SOLVER.CHECKPOINT_PERIOD",
    "1000",
    "DATALOADER.NUM_WORKERS",
    "0",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "DATASETS.TRAIN",
    f"('{PREFIX}_train',)",
    "DATASETS.TEST",
    f"('{PREFIX}_test',)",
]


train_net = load_script("train_net", os.path.join(REPO, "train_net.py"))


def run_train_net(argv):
    return run_script(train_net, argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    register_tid_shapes(
        PREFIX, ShapesSpec(seed=0, sizes=(16, 8, 8), image_size=96, root=str(root / "data"))
    )
    teacher_dir = str(root / "teacher")
    run_train_net(
        [
            "--config-file",
            f"{REPO}/configs/shapes/retinanet_mnv2_teacher.yaml",
            "OUTPUT_DIR",
            teacher_dir,
        ]
        + TINY
    )
    tid_dir = str(root / "tid")
    tid_opts = TINY + [
        "TID.TEACHER.WEIGHTS",
        f"{teacher_dir}/model_final.pth",
        "TID.TEACHER.OPTS",
        json.dumps(["MODEL.FPN.OUT_CHANNELS", "16", "MODEL.RETINANET.NUM_CONVS", "1"]),
        "TID.TEACHER.EVAL_BEFORE_TRAIN",
        "True",
        "VIS_PERIOD",
        "2",
        "OUTPUT_DIR",
        tid_dir,
    ]
    run_train_net(["--config-file", f"{REPO}/configs/shapes/tid_retinanet.yaml"] + tid_opts)
    return {"root": root, "teacher": teacher_dir, "tid": tid_dir, "tid_opts": tid_opts}


def test_training_writes_checkpoint_metrics_and_teacher_ap(runs):
    assert os.path.isfile(os.path.join(runs["tid"], "model_final.pth"))
    records = [json.loads(x) for x in open(os.path.join(runs["tid"], "metrics.json"))]
    keys = set().union(*records)
    assert {"loss_tid_p3", "tid/key_share", "tid/weak_share", "tid/rest_share"} <= keys
    assert "teacher/" + f"{PREFIX}_test/AP" in keys  # the teacher was evaluated before training
    assert "bbox/AP" in keys  # the student at the end
    ckpt = torch.load(os.path.join(runs["tid"], "model_final.pth"), weights_only=True)
    assert not any(k.startswith("teacher") for k in ckpt["model"])


def test_eval_only_returns_bbox_ap(runs):
    res = run_train_net(
        ["--config-file", f"{REPO}/configs/shapes/tid_retinanet.yaml", "--eval-only"]
        + runs["tid_opts"]
        + [
            "MODEL.WEIGHTS",
            os.path.join(runs["tid"], "model_final.pth"),
            "OUTPUT_DIR",
            str(runs["root"] / "eval"),
        ]
    )
    assert set(res["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_dataset_flag_registers_coco_json(runs):
    from tid_d2.data import ensure_generated

    ensure_generated(f"{PREFIX}_val")
    data = ShapesSpec(seed=0, sizes=(16, 8, 8), image_size=96, root=str(runs["root"] / "data"))
    spec = f"my_val:{data.json_path('val')}:{data.image_root('val')}"
    res = run_train_net(
        [
            "--config-file",
            f"{REPO}/configs/shapes/retinanet_r18_student.yaml",
            "--eval-only",
            "--dataset",
            spec,
        ]
        + TINY
        + ["DATASETS.TEST", "('my_val',)", "OUTPUT_DIR", str(runs["root"] / "eval_mine")]
    )
    assert "AP" in res["bbox"]


def test_dataset_flag_errors_before_training(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        run_train_net(
            [
                "--config-file",
                f"{REPO}/configs/shapes/retinanet_r18_student.yaml",
                "--dataset",
                f"x:{bad}:{tmp_path}",
            ]
        )


def test_export_student_round_trip(runs, capsys):
    export = load_script("export_student", os.path.join(REPO, "tools", "export_student.py"))
    out = str(runs["root"] / "exported")
    cfg_opts = runs["tid_opts"]
    assert (
        export.main(
            [
                "--config-file",
                f"{REPO}/configs/shapes/tid_retinanet.yaml",
                "--weights",
                os.path.join(runs["tid"], "model_final.pth"),
                "--output",
                out,
            ]
            + cfg_opts
        )
        == 0
    )
    assert "verified" in capsys.readouterr().out
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert not any(k.startswith(("tid_adapters", "teacher")) for k in state["model"])
    assert set(state) == {"model"}
    text = open(os.path.join(out, "config.yaml")).read()
    assert "TID" not in text and "TIDDistiller" not in text
    # the exported config loads into plain detectron2 (ResNet RetinaNet student)
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(out, "config.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"


def test_export_student_bad_inputs(runs, capsys):
    export = load_script("export_student", os.path.join(REPO, "tools", "export_student.py"))
    out = str(runs["root"] / "bad_export")
    # a plain detector config is not a TID config
    assert (
        export.main(
            [
                "--config-file",
                f"{REPO}/configs/shapes/retinanet_r18_student.yaml",
                "--weights",
                os.path.join(runs["tid"], "model_final.pth"),
                "--output",
                out,
            ]
        )
        == 2
    )
    assert "not a TID config" in capsys.readouterr().err
    # the teacher's checkpoint is of another architecture than the student
    assert (
        export.main(
            [
                "--config-file",
                f"{REPO}/configs/shapes/tid_retinanet.yaml",
                "--weights",
                os.path.join(runs["teacher"], "model_final.pth"),
                "--output",
                out,
            ]
            + runs["tid_opts"]
        )
        == 2
    )
    assert "missing keys" in capsys.readouterr().err


def test_check_teacher(runs, capsys):
    tool = load_script("check_teacher", os.path.join(REPO, "tools", "check_teacher.py"))
    rc = tool.main(
        [
            "--config-file",
            f"{REPO}/configs/shapes/tid_retinanet.yaml",
            "--output",
            str(runs["root"] / "check"),
        ]
        + runs["tid_opts"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "loaded strictly" in out and f"teacher on {PREFIX}_test: AP" in out
    rc = tool.main(
        ["--config-file", f"{REPO}/configs/shapes/tid_retinanet.yaml"]
        + runs["tid_opts"]
        + ["TID.TEACHER.WEIGHTS", "/nonexistent/teacher.pth"]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_visualize_significance_writes_pngs(runs):
    tool = load_script(
        "visualize_significance", os.path.join(REPO, "tools", "visualize_significance.py")
    )
    out = str(runs["root"] / "vis")
    rc = tool.main(
        [
            "--config-file",
            f"{REPO}/configs/shapes/tid_retinanet.yaml",
            "--weights",
            os.path.join(runs["tid"], "model_final.pth"),
            "--dataset",
            f"{PREFIX}_val",
            "--num-images",
            "2",
            "--levels",
            "p3",
            "p4",
            "--output",
            out,
        ]
        + runs["tid_opts"]
    )
    assert rc == 0
    pngs = sorted(glob.glob(os.path.join(out, "*.png")))
    assert len(pngs) == 2
    for p in pngs:
        w, h = Image.open(p).size
        assert w > 400 and h > 250 and os.path.getsize(p) > 10_000


def test_plot_training_overlays_runs(runs):
    tool = load_script("plot_training", os.path.join(REPO, "tools", "plot_training.py"))
    out = str(runs["root"] / "curves.png")
    assert (
        tool.main([runs["tid"], runs["teacher"], "--labels", "tid", "teacher", "--output", out])
        == 0
    )
    assert Image.open(out).size == (990, 630)
    assert tool.main([str(runs["root"] / "nothing"), "--output", out]) == 2


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
)
def test_every_shipped_config_loads(path):
    from tid_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(path)
    if os.path.basename(path).startswith("Base-"):
        return
    assert cfg.MODEL.META_ARCHITECTURE in (
        "RetinaNet",
        "FCOS",
        "ATSS",
        "GFL",
        "GeneralizedRCNN",
        "TIDDistiller",
    )
    if cfg.MODEL.META_ARCHITECTURE == "TIDDistiller":
        from tid_d2.modeling.distiller import validate_tid_cfg

        validate_tid_cfg(cfg)
        assert cfg.TID.TEACHER.CONFIG_FILE and cfg.TID.TEACHER.WEIGHTS
        teacher = os.path.join(REPO, cfg.TID.TEACHER.CONFIG_FILE)
        assert os.path.isfile(teacher), teacher
        tcfg = get_cfg()
        tcfg.merge_from_file(teacher)  # a plain detector config, not another distiller
        assert tcfg.MODEL.META_ARCHITECTURE != "TIDDistiller", teacher


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in sorted(glob.glob(os.path.join(REPO, "configs", "shapes", "*_*.yaml")))
        if "tid_" not in os.path.basename(p)
    ],
)
def test_shapes_detector_configs_build(path):
    from detectron2.modeling import build_model

    from tid_d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(path)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_cached_teacher_is_reused_only_for_the_same_data_and_schedule(tmp_path, monkeypatch):
    from tid_d2.runs import cached_teacher, mark_teacher

    monkeypatch.delenv("TID_D2_SHAPES_DIFFICULTY", raising=False)
    assert cached_teacher(str(tmp_path), 1000) is None  # nothing there
    (tmp_path / "model_final.pth").write_bytes(b"x")
    assert cached_teacher(str(tmp_path), 1000) is None  # weights of unknown provenance
    mark_teacher(str(tmp_path), 1000)
    assert cached_teacher(str(tmp_path), 1000) == str(tmp_path / "model_final.pth")
    assert cached_teacher(str(tmp_path), 500) is None  # another schedule
    monkeypatch.setenv("TID_D2_SHAPES_DIFFICULTY", "hard")
    assert cached_teacher(str(tmp_path), 1000) is None  # other data


def test_a_run_is_finished_only_with_an_evaluation_at_its_last_iteration(tmp_path):
    """A run with periodic evaluations that stopped half-way is not taken for a finished one
    (``--reuse`` in the benchmark scripts would otherwise report its mid-run AP)."""
    import json

    from tid_d2.runs import ap_curve, has_final_ap

    def metrics(*iterations):
        with open(tmp_path / "metrics.json", "w") as f:
            f.write(json.dumps({"iteration": 5, "total_loss": 1.0}) + "\n")
            for it in iterations:
                f.write(json.dumps({"iteration": it, "tid_shapes_val/bbox/AP": 1.0}) + "\n")

    assert not has_final_ap(str(tmp_path), "tid_shapes_val")  # no metrics.json
    metrics(999)
    assert has_final_ap(str(tmp_path), "tid_shapes_val")  # no config.yaml: any evaluation
    (tmp_path / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 3000\n")
    assert not has_final_ap(str(tmp_path), "tid_shapes_val")  # stopped after iteration 1000
    assert not has_final_ap(str(tmp_path), "tid_shapes_test")  # other dataset
    metrics(999, 1999, 2999)
    assert has_final_ap(str(tmp_path), "tid_shapes_val")
    metrics(999, 1999, 3000)  # the evaluation after training is logged at MAX_ITER itself
    assert has_final_ap(str(tmp_path), "tid_shapes_val")
    assert [it for it, _ in ap_curve(str(tmp_path), "tid_shapes_val")] == [1000, 2000, 3000]
    # a finished run of another schedule is not the run asked for
    assert has_final_ap(str(tmp_path), "tid_shapes_val", iters=3000)
    assert not has_final_ap(str(tmp_path), "tid_shapes_val", iters=1000)


def test_reuse_state_requires_the_same_settings_and_tells_finished_from_resumable(tmp_path):
    """``--reuse`` takes a folder's run only if its saved config is the one asked for now (a
    folder holding a run with another loss weight is neither reported nor trained over: an error
    names the keys), and resumes a stopped run from its checkpoint instead of starting it again."""
    import json

    import yaml

    from tid_d2.config import get_cfg
    from tid_d2.runs import reuse_state

    config = os.path.join(REPO, "configs", "shapes", "tid_retinanet.yaml")
    opts = ["SOLVER.MAX_ITER", "20", "TID.LOSS_WEIGHT", "0.01"]
    out = str(tmp_path)
    assert reuse_state(out, config, opts, "tid_shapes_val") == "new"  # nothing there
    saved = get_cfg()
    saved.merge_from_file(config)
    saved.merge_from_list(opts + ["OUTPUT_DIR", "/elsewhere"])  # OUTPUT_DIR does not count
    (tmp_path / "config.yaml").write_text(saved.dump())
    assert reuse_state(out, config, opts, "tid_shapes_val") == "new"  # no checkpoint, no AP
    other = ["SOLVER.MAX_ITER", "20", "TID.LOSS_WEIGHT", "0.1"]
    assert reuse_state(out, config, other, "tid_shapes_val") == "new"  # nothing to lose there
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    assert reuse_state(out, config, opts, "tid_shapes_val") == "resumable"
    with open(tmp_path / "metrics.json", "w") as f:
        f.write(json.dumps({"iteration": 19, "tid_shapes_val/bbox/AP": 1.0}) + "\n")
    assert reuse_state(out, config, opts, "tid_shapes_val") == "finished"
    with pytest.raises(RuntimeError, match=r"finished run with other settings \(SOLVER.MAX_ITER"):
        reuse_state(out, config, opts, "tid_shapes_val", iters=40)
    with pytest.raises(RuntimeError, match=r"\(TID.LOSS_WEIGHT differ.*delete that folder"):
        reuse_state(out, config, other, "tid_shapes_val")
    # the same teacher file named relative to the repository (train_net.py's working directory)
    # or absolutely is the same setting; another file is not
    teacher = ["TID.TEACHER.WEIGHTS", "output/t/model_final.pth"]
    saved.merge_from_list(teacher)
    (tmp_path / "config.yaml").write_text(saved.dump())
    absolute = ["TID.TEACHER.WEIGHTS", os.path.join(REPO, "output", "t", "model_final.pth")]
    assert reuse_state(out, config, opts + absolute, "tid_shapes_val") == "finished"
    assert reuse_state(out, config, opts + teacher, "tid_shapes_val") == "finished"
    elsewhere = ["TID.TEACHER.WEIGHTS", "output/u/model_final.pth"]
    with pytest.raises(RuntimeError, match=r"\(TID.TEACHER.WEIGHTS differ"):
        reuse_state(out, config, opts + elsewhere, "tid_shapes_val")
    # ... and so is the same file reached through a symlinked folder (another checkout whose
    # output/ links to this one's)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    saved.merge_from_list(["TID.TEACHER.WEIGHTS", str(tmp_path / "link" / "t.pth")])
    (tmp_path / "config.yaml").write_text(saved.dump())
    linked = ["TID.TEACHER.WEIGHTS", str(tmp_path / "real" / "t.pth")]
    assert reuse_state(out, config, opts + linked, "tid_shapes_val") == "finished"
    saved.merge_from_list(teacher)
    (tmp_path / "config.yaml").write_text(saved.dump())
    # a run saved before a key existed ran with that key's default: the same setting as the
    # default now, not as another value
    dumped = yaml.safe_load(saved.dump())
    del dumped["TID"]["ADAPTER_INIT"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dumped))
    assert reuse_state(out, config, opts + teacher, "tid_shapes_val") == "finished"
    # the teacher cache changes the speed of a run, not its result: the same run either way
    cache = ["TID.TEACHER.CACHE_MB", "512"]
    assert reuse_state(out, config, opts + teacher + cache, "tid_shapes_val") == "finished"
    orth = ["TID.ADAPTER_INIT", "orthogonal"]
    with pytest.raises(RuntimeError, match=r"\(TID.ADAPTER_INIT differ"):
        reuse_state(out, config, opts + teacher + orth, "tid_shapes_val")
    os.remove(tmp_path / "metrics.json")  # stopped after a checkpoint: still not trained over
    with pytest.raises(RuntimeError, match="checkpointed run with other settings"):
        reuse_state(out, config, opts + teacher + orth, "tid_shapes_val")


def test_reuse_state_ignores_the_hyperparameters_of_other_methods(tmp_path):
    """One invocation passes TID.PKD.* and TID.FGD.* to every run it makes: a finished run of
    another mode (the student alone, TID) never reads them and is still the same run, while a pkd
    run with another TID.PKD.LOSS_WEIGHT is another run (and TID.FGD.* stays inert for it)."""
    import json

    from tid_d2.config import get_cfg
    from tid_d2.runs import reuse_state

    config = os.path.join(REPO, "configs", "shapes", "tid_fcos.yaml")
    method_opts = ["TID.PKD.LOSS_WEIGHT", "0.05", "TID.FGD.LOSS_WEIGHT", "0.005"]

    def saved_run(folder, opts):
        folder.mkdir()
        cfg = get_cfg()
        cfg.merge_from_file(config)
        cfg.merge_from_list(opts)
        (folder / "config.yaml").write_text(cfg.dump())
        (folder / "metrics.json").write_text(  # evaluated at its last iteration: finished
            json.dumps({"iteration": cfg.SOLVER.MAX_ITER - 1, "tid_shapes_val/bbox/AP": 1.0})
            + "\n"
        )
        return str(folder)

    for mode in ("none", "tid"):
        out = saved_run(tmp_path / mode, ["TID.MODE", mode])
        assert reuse_state(out, config, ["TID.MODE", mode, *method_opts], "tid_shapes_val") == (
            "finished"
        )
        with pytest.raises(RuntimeError, match=r"\(TID.LOSS_WEIGHT differ"):
            reuse_state(out, config, ["TID.MODE", mode, "TID.LOSS_WEIGHT", "0.5"], "tid_shapes_val")
    pkd = saved_run(tmp_path / "pkd", ["TID.MODE", "pkd", "TID.PKD.LOSS_WEIGHT", "0.05"])
    assert reuse_state(pkd, config, ["TID.MODE", "pkd", *method_opts], "tid_shapes_val") == (
        "finished"
    )
    with pytest.raises(RuntimeError, match=r"\(TID.PKD.LOSS_WEIGHT differ"):
        reuse_state(pkd, config, ["TID.MODE", "pkd", "TID.PKD.LOSS_WEIGHT", "1.0"], "tid_shapes_val")
    # another mode asked for in the same folder is another run, whatever the method keys say
    with pytest.raises(RuntimeError, match=r"TID.MODE.* differ"):
        reuse_state(pkd, config, ["TID.MODE", "fgd", *method_opts], "tid_shapes_val")


def test_train_net_resumes_or_sets_an_old_runs_metrics_aside(tmp_path, monkeypatch):
    """A fresh run in a used folder must not append to the old run's metrics.json (the readers
    would mix both runs); a resumed run keeps it and passes --resume."""
    import subprocess

    from tid_d2 import runs

    calls = []

    class FakeProc:
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)
            self.stdout, self.returncode = iter(()), 0

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    (tmp_path / "metrics.json").write_text('{"iteration": 1}\n')
    runs.train_net("cfg.yaml", str(tmp_path), ["SEED", "1"], resume=True)
    assert "--resume" in calls[-1] and (tmp_path / "metrics.json").is_file()
    runs.train_net("cfg.yaml", str(tmp_path), ["SEED", "1"])
    assert "--resume" not in calls[-1] and not (tmp_path / "metrics.json").exists()
    (backup,) = tmp_path.glob("metrics.json.*.bak")
    assert backup.read_text() == '{"iteration": 1}\n'


def test_plot_training_series_of_a_resumed_run_keep_one_point_per_iteration():
    """A resumed run logs the iterations after its checkpoint again: one point per iteration
    (the later record), in iteration order, so the curve does not double back."""
    tool = load_script("plot_training", os.path.join(REPO, "tools", "plot_training.py"))
    records = [
        {"iteration": 19, "loss_cls": 1.0},
        {"iteration": 39, "loss_cls": 0.9},
        {"iteration": 19, "loss_cls": 0.95},  # resumed from the checkpoint before iteration 20
        {"iteration": 39, "loss_cls": 0.8},
        {"iteration": 59, "loss_cls": 0.7, "lr": 0.1},
    ]
    series = tool._series(records, lambda k: k.startswith("loss"))
    assert series == {"loss_cls": [(20, 0.95), (40, 0.8), (60, 0.7)]}


def test_extract_weights_keeps_a_prefix_that_a_plain_model_loads(tmp_path):
    """tools/extract_weights.py: the teacher's head alone, loadable with MODEL.WEIGHTS into a
    model of the same head width (the rest keeps its initialisation); no match is an error."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from extract_weights import extract

    from .helpers import save_weights, tiny_cfg

    cfg = tiny_cfg("RetinaNet", width=16)
    full = save_weights(cfg, str(tmp_path / "t.pth"), seed=1)
    head = str(tmp_path / "head.pth")
    assert extract(full, ["head."], head) == len(torch.load(head, weights_only=True)["model"])
    torch.manual_seed(2)
    model = build_model(cfg)
    before = model.backbone.fpn_output3.weight.detach().clone()
    DetectionCheckpointer(model).load(head)
    teacher = torch.load(full, weights_only=True)["model"]
    assert torch.equal(model.head.cls_score.weight, teacher["head.cls_score.weight"])
    assert torch.equal(model.backbone.fpn_output3.weight, before)
    with pytest.raises(ValueError, match="no key"):
        extract(full, ["roi_heads."], str(tmp_path / "x.pth"))
