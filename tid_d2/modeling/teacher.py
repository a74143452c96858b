"""Building the frozen teacher: its own config, strictly loaded weights, eval mode, no gradients."""

import logging
import os
import pickle
from typing import Dict, Tuple

import numpy as np
import torch
from detectron2.modeling import build_model

__all__ = [
    "build_teacher",
    "freeze_teacher",
    "load_weights_strict",
    "read_checkpoint",
    "teacher_cfg_from",
]

logger = logging.getLogger(__name__)


def teacher_cfg_from(cfg):
    """The teacher's config: ``TID.TEACHER.CONFIG_FILE`` + ``TID.TEACHER.OPTS``, on cfg's device."""
    from ..config import get_cfg  # local: config imports detectron2's model zoo

    path = cfg.TID.TEACHER.CONFIG_FILE
    if not path:
        raise ValueError(
            "TID.TEACHER.CONFIG_FILE is empty: set it to the teacher detector's config file "
            "(e.g. configs/shapes/retinanet_mnv2_teacher.yaml)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"TID.TEACHER.CONFIG_FILE '{path}' does not exist. Point it at the config the teacher "
            "was trained with (paths are relative to the working directory)."
        )
    tcfg = get_cfg()
    tcfg.merge_from_file(path)
    tcfg.merge_from_list(list(cfg.TID.TEACHER.OPTS))
    if tcfg.MODEL.META_ARCHITECTURE == "TIDDistiller":
        raise ValueError(
            f"TID.TEACHER.CONFIG_FILE '{path}' is itself a TIDDistiller config; the teacher must "
            "be a plain detector config (RetinaNet, FCOS, GeneralizedRCNN, ...)."
        )
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    # The teacher's weights come from TID.TEACHER.WEIGHTS, not from an ImageNet initialisation.
    tcfg.MODEL.MOBILENET.IMAGENET_INIT = False
    tcfg.MODEL.WEIGHTS = cfg.TID.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


def local_path(path: str) -> str:
    """A local file for ``path``; URLs (``detectron2://``, ``https://``) are downloaded and cached
    by detectron2's PathManager."""
    if "://" in path:
        from detectron2.utils.file_io import PathManager

        return PathManager.get_local_path(path)
    return path


def read_checkpoint(path: str, allow_pickle: bool = False, what: str = "checkpoint") -> Dict:
    """Read a checkpoint file into {name: tensor} without running code from it.

    ``.pth`` files go through ``torch.load(weights_only=True)``. ``.pkl`` files (detectron2 /
    Detectron model-zoo format) are Python pickles that can execute arbitrary code when read:
    they are refused unless ``allow_pickle`` (TID.ALLOW_PICKLE_WEIGHTS) is set.
    """
    if not path:
        raise ValueError(f"no {what} path given")
    path = local_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' does not exist")
    if path.endswith(".pkl"):
        if not allow_pickle:
            raise ValueError(
                f"{what} '{path}' is a pickle (.pkl): reading it can run arbitrary code from the "
                "file. Convert it to a .pth state dict you trust, or set "
                "TID.ALLOW_PICKLE_WEIGHTS True if you trust its source."
            )
        logger.warning("Reading pickle %s '%s': this executes code from the file.", what, path)
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, not a torch file, non-tensor objects
            raise ValueError(
                f"{what} '{path}' could not be read as a PyTorch checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Is the file complete (not truncated "
                "by an interrupted copy or save) and a .pth written by torch.save?"
            ) from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise ValueError(f"{what} '{path}' holds a {type(data).__name__}, not a state dict")
    return {
        k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
        for k, v in data.items()
        if isinstance(v, (torch.Tensor, np.ndarray))
    }


def load_weights_strict(
    model: torch.nn.Module, path: str, allow_pickle: bool = False, what: str = "teacher weights"
) -> None:
    """Load ``path`` into ``model``; every missing, unexpected or mis-shaped key is an error."""
    state = read_checkpoint(path, allow_pickle, what)
    own = model.state_dict()
    # BatchNorm's step counter has no effect on a frozen model: a BN-trained checkpoint may be
    # loaded into FrozenBN layers (and vice versa) as detectron2 itself allows.
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not (k.endswith(counter) and k not in own)}
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(counter))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:

        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({show(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({show(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({show(mismatched)})")
        raise ValueError(
            f"{what} '{path}' do not fit the model built from its config: "
            + "; ".join(parts)
            + ". Is the config the one these weights were trained with (same architecture, "
            "widths and number of classes)?"
        )
    model.load_state_dict(state, strict=False)  # every other key was checked above


def freeze_teacher(
    teacher: torch.nn.Module, weights: str, allow_pickle: bool = False
) -> torch.nn.Module:
    """Load ``weights`` strictly into ``teacher`` (:func:`load_weights_strict`), then put it in
    eval mode without gradients: what every teacher goes through, yacs- or LazyConfig-built."""
    load_weights_strict(teacher, weights, allow_pickle)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_teacher(cfg) -> Tuple[torch.nn.Module, object]:
    """Build, strictly load and freeze the teacher described by ``cfg.TID.TEACHER``.

    Returns:
        (teacher model in eval mode with requires_grad False, its frozen config)
    """
    tcfg = teacher_cfg_from(cfg)
    if not cfg.TID.TEACHER.WEIGHTS:
        raise ValueError(
            "TID.TEACHER.WEIGHTS is empty: train the teacher first (python train_net.py "
            f"--config-file {cfg.TID.TEACHER.CONFIG_FILE}) and set TID.TEACHER.WEIGHTS to its "
            "model_final.pth."
        )
    if "://" not in cfg.TID.TEACHER.WEIGHTS and not os.path.isfile(cfg.TID.TEACHER.WEIGHTS):
        raise FileNotFoundError(
            f"TID.TEACHER.WEIGHTS '{cfg.TID.TEACHER.WEIGHTS}' does not exist. Train the teacher "
            f"with `python train_net.py --config-file {cfg.TID.TEACHER.CONFIG_FILE}` or fix the path."
        )
    teacher = freeze_teacher(
        build_model(tcfg), cfg.TID.TEACHER.WEIGHTS, cfg.TID.ALLOW_PICKLE_WEIGHTS
    )
    logger.info(
        "Teacher loaded strictly from %s (%s)",
        cfg.TID.TEACHER.WEIGHTS,
        tcfg.MODEL.META_ARCHITECTURE,
    )
    return teacher, tcfg
