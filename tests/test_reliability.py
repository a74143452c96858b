"""Distributed training on the CPU, exact resume, crash-safe checkpoints, hostile inputs."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

import tid_d2  # noqa: F401
from tid_d2.config import get_cfg
from tid_d2.data import ShapesSpec, ensure_generated, register_tid_shapes
from tid_d2.engine import TIDCheckpointer, Trainer, create_ddp_model
from tid_d2.runs import ap_curve

from .helpers import random_inputs, save_weights, tid_cfg, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- DDP (gloo, CPU)
def _ddp_cfg(tmpdir):
    cfg = tid_cfg(tmpdir, "RetinaNet", "tid")
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # batch-independent student: 2x1 must equal 1x2
    return cfg


def _ddp_worker(tmpdir, steps):
    from detectron2.utils import comm

    torch.set_num_threads(1)
    cfg = _ddp_cfg(tmpdir)
    model = build_model(cfg)
    model.load_state_dict(torch.load(os.path.join(tmpdir, "init.pth"), weights_only=True)["model"])
    model = create_ddp_model(model)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert model.device_ids is None  # CPU modules reject device_ids
    assert model.module.teacher is not None and not any(
        "teacher" in n for n, _ in model.named_parameters()
    )
    batch = random_inputs(2, 64, seed=11)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    records = []
    with EventStorage(0) as storage:
        for _ in range(steps):
            losses = model([batch[comm.get_rank()]])
            records.append({k: v.item() for k, v in losses.items()})
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            storage.iter += 1
    with open(os.path.join(tmpdir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(records, f)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    tmpdir = str(tmp_path)
    cfg = _ddp_cfg(tmpdir)
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, os.path.join(tmpdir, "init.pth"))
    model.train()
    with EventStorage(0):
        single = {k: v.item() for k, v in model(random_inputs(2, 64, seed=11)).items()}
    port = 20000 + random.randint(0, 20000)
    launch(_ddp_worker, 2, dist_url=f"tcp://127.0.0.1:{port}", args=(tmpdir, 3))
    ranks = [json.load(open(os.path.join(tmpdir, f"rank{r}.json"))) for r in range(2)]
    tid_keys = [k for k in single if k.startswith("loss_tid_")]
    assert tid_keys
    for (
        k
    ) in tid_keys:  # DDP averages gradients: the mean of the ranks' losses is the 1-process loss
        mean = (ranks[0][0][k] + ranks[1][0][k]) / 2
        assert mean == pytest.approx(single[k], rel=1e-4), k
    for r in ranks:  # several steps ran, all finite
        assert len(r) == 3 and all(
            all(v == v and abs(v) < 1e6 for v in step.values()) for step in r
        )


# ----------------------------------------------------------------------------- resume / crash
MINI = "rel_shapes"
TRAIN_OPTS = [
    "MODEL.FPN.OUT_CHANNELS",
    "16",
    "MODEL.RETINANET.NUM_CONVS",
    "1",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.BASE_LR",
    "0.001",
    "DATALOADER.NUM_WORKERS",
    "0",
    "INPUT.RANDOM_FLIP",
    "none",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "DATASETS.TRAIN",
    f"('{MINI}_train',)",
    "DATASETS.TEST",
    "()",
    "SEED",
    "3",
]


def _trainer(out, max_iter, period, config="retinanet_r18_student.yaml", extra=()):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "shapes", config))
    cfg.merge_from_list(
        TRAIN_OPTS
        + [
            "SOLVER.MAX_ITER",
            str(max_iter),
            "SOLVER.CHECKPOINT_PERIOD",
            str(period),
            "OUTPUT_DIR",
            out,
        ]
        + list(extra)
    )
    cfg.freeze()

    seed_all_rng(cfg.SEED)
    torch.manual_seed(cfg.SEED)
    return Trainer(cfg)


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_data")
    register_tid_shapes(MINI, ShapesSpec(seed=1, sizes=(12, 6, 6), image_size=96, root=str(root)))
    for split in ("train", "val", "test"):  # on disk now: subprocess tests read the files directly
        ensure_generated(f"{MINI}_{split}")
    return root


def _train_net_cmd(mini_data):
    """train_net.py with the RetinaNet student config on the mini dataset (a subprocess reads it
    from disk by --dataset)."""
    spec = ShapesSpec(seed=1, sizes=(12, 6, 6), image_size=96, root=str(mini_data))
    ds = f"{MINI}_train:{spec.json_path('train')}:{spec.image_root('train')}"
    return [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        os.path.join(REPO, "configs", "shapes", "retinanet_r18_student.yaml"),
        "--dataset",
        ds,
    ]


@pytest.mark.slow
def test_exact_resume_in_a_new_process(tmp_path, mini_data):
    """A run resumed by a new process from its iteration-3 checkpoint ends with the weights of the
    uninterrupted run, bit for bit: same images in the same order, same optimizer, scheduler and
    loss-normaliser state, and the same arithmetic in the resumed process's first steps (fvcore's
    scripted focal loss computes a process's first call differently unless run unoptimised)."""
    cmd = _train_net_cmd(mini_data)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(out, *flags):
        opts = TRAIN_OPTS + ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
        done = subprocess.run(
            cmd + list(flags) + opts + ["OUTPUT_DIR", out], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(str(full))
    os.makedirs(resumed)  # the state a run stopped after 3 iterations leaves behind
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    run(str(resumed), "--resume")
    assert "Starting training from iteration 3" in (resumed / "log.txt").read_text()
    a = torch.load(full / "model_final.pth", weights_only=True)
    b = torch.load(resumed / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 5
    for k in a["model"]:  # deterministic CPU run: bit-identical weights
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_periodic_evaluation_does_not_change_training(tmp_path, mini_data):
    """Faster R-CNN samples its RPN anchors and ROI proposals from torch's global generator, and
    an evaluation draws from it (its data loader's seed): evaluating every 2 iterations must still
    give the weights of a run that is never evaluated, or a benchmark's result would depend on
    which of its runs record a validation curve."""
    models = []
    for period in (2, 0):
        trainer = _trainer(
            str(tmp_path / f"period{period}"),
            4,
            100,
            config="rcnn_r18_student.yaml",
            extra=[
                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
                "16",
                "DATASETS.TEST",
                f"('{MINI}_val',)",
                "TEST.EVAL_PERIOD",
                str(period),
            ],
        )
        trainer.resume_or_load(resume=False)
        trainer.train()
        models.append(trainer.model.state_dict())
    assert (
        len(ap_curve(str(tmp_path / "period2"), f"{MINI}_val")) == 2
    )  # at iteration 2, at the end
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]), k


@pytest.mark.slow
def test_kill_during_training_leaves_valid_checkpoint(tmp_path, mini_data):
    """SIGKILL a training process at random points (it checkpoints every iteration); every time
    last_checkpoint must name a complete checkpoint, and --resume must finish the run."""
    out = str(tmp_path / "run")
    cmd = _train_net_cmd(mini_data)
    opts = [o for o in TRAIN_OPTS] + [
        "SOLVER.MAX_ITER",
        "40",
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
        "OUTPUT_DIR",
        out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen(
            cmd + (["--resume"] if attempt else []) + opts,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while not os.path.isfile(os.path.join(out, "last_checkpoint")) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.3, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = open(os.path.join(out, "last_checkpoint")).read().strip()
        ckpt = torch.load(os.path.join(out, last), weights_only=True)
        assert "model" in ckpt and "iteration" in ckpt
    done = subprocess.run(cmd + ["--resume"] + opts, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_final.pth"
    assert torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["iteration"] == 39
    for name in os.listdir(out):  # 40 checkpoints of 87 MB: pytest keeps its last 3 temp dirs
        if name.endswith(".pth"):
            os.remove(os.path.join(out, name))


# ----------------------------------------------------------------------------- hostile inputs
def test_zero_area_and_out_of_image_boxes(tmp_path, mini_data):
    """Through detectron2's mapper (as in training) degenerate boxes are clipped or dropped and every
    loss is finite; fed directly, TID's own terms stay finite (detectron2's box loss of a zero-area
    GT box is not, which is why the mapper filters them)."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.structures import BoxMode

    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    model = build_model(cfg)
    d = dict(DatasetCatalog.get(f"{MINI}_train")[0])
    d["annotations"] = [
        {
            "bbox": [10.0, 10.0, 0.0, 0.0],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0,
        },  # zero area
        {
            "bbox": [120.0, 120.0, 20.0, 20.0],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 1,
        },  # outside
        {
            "bbox": [-20.0, -5.0, 50.0, 85.0],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 2,
        },  # partly
    ]
    mapped = DatasetMapper(cfg, is_train=True)(d)
    assert len(mapped["instances"]) == 1  # only the partly-outside box survives, clipped
    assert mapped["instances"].gt_boxes.tensor.min() >= 0
    model.train()
    with EventStorage(0):
        losses = model([mapped, mapped])
    assert all(torch.isfinite(v) for v in losses.values())

    raw = random_inputs(2, 64, boxes_per_image=3)
    raw[0]["instances"].gt_boxes.tensor[:] = torch.tensor(
        [[10.0, 10.0, 10.0, 10.0], [70.0, 70.0, 90.0, 90.0], [-20.0, -5.0, 30.0, 80.0]]
    )
    with EventStorage(0):
        losses = model(raw)
    assert all(torch.isfinite(v) for k, v in losses.items() if k.startswith("loss_tid"))


def test_pickle_weights_opt_in_loads(tmp_path):
    import pickle

    tcfg = tiny_cfg("RetinaNet", width=32)
    pth = save_weights(tcfg, str(tmp_path / "t.pth"))
    state = {k: v.numpy() for k, v in torch.load(pth, weights_only=True)["model"].items()}
    with open(tmp_path / "t.pkl", "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    cfg.TID.TEACHER.WEIGHTS = str(tmp_path / "t.pkl")
    cfg.TID.ALLOW_PICKLE_WEIGHTS = True
    model = build_model(cfg)
    ref = torch.load(pth, weights_only=True)["model"]
    assert all(torch.equal(model.teacher.state_dict()[k], ref[k]) for k in ref)


def test_checkpoints_written_by_trainer_are_weights_only(tmp_path, mini_data):
    trainer = _trainer(str(tmp_path / "w"), 2, 1)
    trainer.resume_or_load(resume=False)
    trainer.train()
    for path in [p for p in os.listdir(tmp_path / "w") if p.endswith(".pth")]:
        data = torch.load(tmp_path / "w" / path, weights_only=True)
        assert {"model", "trainer", "iteration"} <= set(data)
        assert "optimizer" in data["trainer"]["_trainer"]


def test_missing_input_files_give_clear_errors(tmp_path):
    from tid_d2.data import register_coco_datasets

    with pytest.raises(ValueError, match="does not exist"):
        register_coco_datasets([f"gone:{tmp_path}/none.json:{tmp_path}"])
    cfg = tid_cfg(str(tmp_path), "RetinaNet", "tid")
    model = build_model(cfg)
    with pytest.raises(FileNotFoundError):
        TIDCheckpointer(model, str(tmp_path)).load(str(tmp_path / "absent.pth"))
