"""Shared test helpers: tiny detectron2 configs built without weights, random inputs."""

import atexit
import importlib.util
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from tid_d2.config import get_cfg

NUM_CLASSES = 3


def tiny_shapes_env(root, **extra) -> Dict[str, str]:
    """The environment for a subprocess that generates and trains on tiny tid_shapes data under
    ``root`` (12 / 6 / 6 images of 96 px for train / val / test), plus ``extra`` variables."""
    return dict(
        os.environ,
        TID_D2_DATASETS=str(root),
        TID_D2_SHAPES_SIZES="12,6,6",
        TID_D2_SHAPES_IMAGE_SIZE="96",
        **extra,
    )


def tiny_cfg(family: str = "RetinaNet", width: int = 16, depth: int = 18, retinanet_norm: str = ""):
    """A CPU-tiny detector config: ResNet-18 (BN, from scratch) + FPN of ``width`` channels;
    ``retinanet_norm``: MODEL.RETINANET.NORM ("GN" needs ``width`` >= 32)."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = width
    cfg.INPUT.FORMAT = "BGR"
    if family in ("RetinaNet", "FCOS", "ATSS", "GFL"):
        cfg.MODEL.META_ARCHITECTURE = family
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
        cfg.MODEL.RETINANET.NUM_CONVS = 1
        cfg.MODEL.RETINANET.NORM = retinanet_norm
        cfg.MODEL.FCOS.NUM_CLASSES = NUM_CLASSES
        cfg.MODEL.FCOS.NUM_CONVS = 1
        cfg.MODEL.FCOS.HEAD_NORM = ""
        for node in (cfg.MODEL.ATSS, cfg.MODEL.GFL):
            node.NUM_CLASSES = NUM_CLASSES
            node.NUM_CONVS = 1
            node.HEAD_NORM = ""  # GroupNorm(32, C) needs C >= 32
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [
            [8, 11, 16],
            [16, 23, 32],
            [32, 45, 64],
            [64, 90, 128],
            [128, 181, 256],
        ]
    elif family == "GeneralizedRCNN":
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
        cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    else:
        raise ValueError(family)
    return cfg


def random_inputs(
    n: int = 2, size: int = 64, boxes_per_image: int = 2, seed: int = 0
) -> List[dict]:
    """detectron2 training inputs: uint8 images and random GT boxes (``boxes_per_image`` may be 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        xy = torch.rand(boxes_per_image, 2, generator=g) * size * 0.6
        wh = 8 + torch.rand(boxes_per_image, 2, generator=g) * size * 0.35
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1))
        inst.gt_classes = torch.randint(0, NUM_CLASSES, (boxes_per_image,), generator=g)
        out.append({"image": img, "instances": inst, "height": size, "width": size})
    return out


def save_weights(cfg, path: str, seed: int = 0) -> str:
    """Build a model from ``cfg`` with a fixed seed and save its state dict as a .pth."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, path)
    return path


# teacher config + seed -> (its weights saved once per test process, the RNG state right after)
_TEACHERS: Dict[str, Tuple[str, torch.Tensor]] = {}


def shared_teacher_weights(cfg, seed: int) -> str:
    """:func:`save_weights` of ``cfg`` saved once per test process (a tiny teacher's ResNet-18 is
    44 MB; every TID test used to write its own copy). A cached call leaves torch's RNG in the
    state a fresh :func:`save_weights` would, so what a test builds next is initialised the same
    whatever ran before it. Callers must not modify the file."""
    key = f"{seed}\n{cfg.dump()}"
    if key not in _TEACHERS:
        folder = tempfile.mkdtemp(prefix="tid_test_teacher_")
        atexit.register(shutil.rmtree, folder, True)
        path = save_weights(cfg, os.path.join(folder, "teacher.pth"), seed=seed)
        _TEACHERS[key] = (path, torch.get_rng_state())
    path, rng_state = _TEACHERS[key]
    torch.set_rng_state(rng_state)
    return path


def write_cfg(cfg, path: str) -> str:
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def tid_cfg(
    tmpdir: str,
    family: str = "RetinaNet",
    mode: str = "tid",
    teacher_width: int = 32,
    student_width: int = 16,
    teacher_family: str = None,
    retinanet_norm: str = "",
):
    """A TIDDistiller config: tiny student of ``family``; the tiny teacher's config is written
    under ``tmpdir``, its weights are shared by every test (:func:`shared_teacher_weights`)."""
    tcfg = tiny_cfg(teacher_family or family, width=teacher_width, retinanet_norm=retinanet_norm)
    tpath = write_cfg(tcfg, os.path.join(tmpdir, "teacher.yaml"))
    wpath = shared_teacher_weights(tcfg, seed=1)
    cfg = tiny_cfg(family, width=student_width, retinanet_norm=retinanet_norm)
    cfg.TID.STUDENT_META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.META_ARCHITECTURE = "TIDDistiller"
    cfg.TID.MODE = mode
    cfg.TID.TEACHER.CONFIG_FILE = tpath
    cfg.TID.TEACHER.WEIGHTS = wpath
    return cfg


def load_script(name: str, path: str):
    """The script at ``path`` (``train_net.py``, a ``tools/`` script) imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(script, argv: List[str]):
    """``script.main`` on the command line ``argv`` parsed by ``script.get_parser()``, in this
    process (``train_net.py``, ``tools/lazy_train_net.py``); returns what ``main`` returns."""
    args = script.get_parser().parse_args(argv)
    return script.main(args)
