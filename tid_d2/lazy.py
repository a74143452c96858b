"""TID for detectron2's LazyConfig (Python) configs.

A Python config names the student as any ``LazyCall`` detectron2 model node and the TID settings
as one ``tid`` dict with the keys of the yacs ``TID`` node, lower-case::

    from detectron2 import model_zoo
    from detectron2.config import LazyCall as L
    from tid_d2.lazy import build_lazy_distiller

    model = L(build_lazy_distiller)(
        student=model_zoo.get_config("common/models/retinanet.py").model,
        tid=dict(
            mode="tid",
            loss_weight=0.001,
            teacher=dict(config_file="teacher.py", weights="teacher.pth", opts=[]),
            sig=dict(cls_thresholds=[0.2, 0.5]),
        ),
        student_input_format="${..dataloader.train.mapper.image_format}",
    )

The defaults have one definition, :func:`tid_d2.config.add_tid_config`: :func:`tid_defaults` is
its ``TID`` node as a lower-case dict, and :func:`tid_cfg_from_lazy` merges a user's ``tid`` dict
back over it into a yacs node (an unknown key is an error that names it), so the distiller, its
probes and the validation read the same ``cfg.TID`` in both systems.

The teacher (``tid.teacher.config_file``) is a LazyConfig file (``.py``, or a ``.yaml`` written by
``LazyConfig.save``) whose ``model`` is instantiated, with ``tid.teacher.opts`` as LazyConfig
overrides (``["model.num_classes=6"]``), or a yacs ``.yaml`` built by
:func:`~tid_d2.modeling.teacher.build_teacher`, with yacs ``KEY VALUE`` opts. Either way its
weights are loaded strictly, it is frozen and kept in eval mode.

What a yacs config would give the distiller comes from the modules instead: the probes read the
IoU thresholds from the models' matchers, the input formats are arguments
(``student_input_format``; a LazyConfig teacher's is its ``dataloader.train.mapper.image_format``).
"""

import copy
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from .modeling.distiller import TIDDistiller, distiller_kwargs, validate_tid_cfg
from .modeling.teacher import build_teacher, freeze_teacher

__all__ = [
    "tid_defaults",
    "tid_cfg_from_lazy",
    "distiller_kwargs",
    "build_lazy_distiller",
    "build_teacher_from_tid",
    "is_lazy_config",
    "is_lazy_tid_config",
    "load_lazy_config",
    "lazy_input_format",
    "clipped_optimizer",
    "dataset_names",
]

logger = logging.getLogger(__name__)

_LAZY_DISTILLER = "tid_d2.lazy.build_lazy_distiller"


# ------------------------------------------------------------------------------- TID settings
def _lower(node: CfgNode) -> Dict[str, Any]:
    return {
        k.lower(): _lower(v) if isinstance(v, CfgNode) else copy.deepcopy(v)
        for k, v in node.items()
    }


def tid_defaults() -> Dict[str, Any]:
    """The ``TID`` node of :func:`tid_d2.config.add_tid_config` as a nested dict with lower-case
    keys: the defaults of a LazyConfig's ``tid`` dict."""
    from .config import get_cfg

    return _lower(get_cfg().TID)


def _coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` in the type of the yacs default (int -> float, list <-> tuple), else an error."""
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, int) and isinstance(value, int):
        return value
    raise ValueError(
        f"'{name}' must be a {type(default).__name__} (its default is {default!r}), got "
        f"{type(value).__name__} {value!r}"
    )


def _merge_lazy(user: Mapping, node: CfgNode, path: str) -> None:
    """Merge the lower-case dict ``user`` into the yacs ``node`` (in place), key by key."""
    for key, value in user.items():
        name = f"{path}.{key}"
        if not isinstance(key, str) or key != key.lower() or key.upper() not in node:
            known = ", ".join(sorted(k.lower() for k in node))
            hint = f" (keys are lower-case: '{key.lower()}')" if isinstance(key, str) else ""
            raise ValueError(
                f"unknown TID setting '{name}'{hint}: the yacs TID node has no such key. "
                f"Known keys of '{path}': {known}"
            )
        default = node[key.upper()]
        if isinstance(default, CfgNode):
            if not isinstance(value, Mapping):
                raise ValueError(f"'{name}' must be a dict (of its keys), got {value!r}")
            _merge_lazy(value, default, name)
        else:
            node[key.upper()] = _coerce(name, value, default)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def tid_cfg_from_lazy(
    tid: Optional[Mapping] = None,
    *,
    student_meta_architecture: Optional[str] = None,
    device: str = "cpu",
    vis_period: int = 0,
) -> CfgNode:
    """A frozen tid-d2 yacs config whose ``TID`` node is the defaults with ``tid`` merged over.

    Args:
        tid: the lazy ``tid`` dict (lower-case keys of the ``TID`` node, nested for ``teacher``,
            ``sig``, ``region``, ``pkd``, ``fgd``), a DictConfig or a plain dict. Unknown keys,
            upper-case keys and values of another type than the default are errors.
        student_meta_architecture: ``TID.STUDENT_META_ARCHITECTURE`` when ``tid`` does not set
            it (the lazy builder passes the student's class).
        device: ``MODEL.DEVICE`` (a yacs teacher is built there).
        vis_period: ``VIS_PERIOD`` (significance pictures every this many iterations).
    """
    from .config import get_cfg

    cfg = get_cfg()
    tid = _plain(tid) or {}
    if not isinstance(tid, Mapping):
        raise ValueError(f"'tid' must be a dict of TID settings, got {tid!r}")
    _merge_lazy(tid, cfg.TID, "tid")
    if student_meta_architecture and "student_meta_architecture" not in tid:
        cfg.TID.STUDENT_META_ARCHITECTURE = student_meta_architecture
    cfg.MODEL.META_ARCHITECTURE = "TIDDistiller"
    cfg.MODEL.DEVICE = device
    cfg.VIS_PERIOD = int(vis_period)
    cfg.freeze()
    return cfg


def _meta_architecture(model: nn.Module) -> str:
    """The name of the model's class, or of its nearest base registered as a meta-architecture."""
    for klass in type(model).__mro__:
        if klass.__name__ in META_ARCH_REGISTRY:
            return klass.__name__
    return type(model).__name__


def build_lazy_distiller(
    student: nn.Module,
    tid: Optional[Mapping] = None,
    student_input_format: str = "BGR",
    vis_period: int = 0,
) -> TIDDistiller:
    """A :class:`TIDDistiller` from LazyConfig parts: ``L(build_lazy_distiller)(student=...,
    tid=dict(...))``.

    Args:
        student: the (instantiated) student detector, any detectron2 meta-architecture with a
            probe (RetinaNet, FCOS, GeneralizedRCNN, ...).
        tid: the TID settings, the keys of the yacs ``TID`` node in lower case (see
            :func:`tid_cfg_from_lazy`); ``tid.teacher`` names the teacher's config and weights.
        student_input_format: "BGR" or "RGB", the format of the images the student reads (in a
            LazyConfig ``"${..dataloader.train.mapper.image_format}"``).
        vis_period: put significance pictures into the event storage every this many
            iterations (0: never; the yacs ``VIS_PERIOD``).
    """
    cfg = tid_cfg_from_lazy(
        tid,
        student_meta_architecture=_meta_architecture(student),
        device=str(student.device),
        vis_period=vis_period,
    )
    validate_tid_cfg(cfg)
    teacher, teacher_cfg, teacher_format = None, None, None
    if cfg.TID.MODE != "none":
        teacher, teacher_cfg, teacher_format = build_teacher_from_tid(cfg)
    return TIDDistiller(
        student=student,
        student_cfg=None,
        teacher=teacher,
        teacher_cfg=teacher_cfg,
        student_input_format=student_input_format,
        teacher_input_format=teacher_format,
        **distiller_kwargs(cfg),
    )


# ------------------------------------------------------------------------------- the teacher
def is_lazy_config(path: str) -> bool:
    """Whether ``path`` is a LazyConfig file: a ``.py`` file, or a ``.yaml`` written by
    ``LazyConfig.save`` (a top-level lower-case ``model:`` with a ``_target_``). yacs files,
    whose keys are upper-case, are not."""
    ext = os.path.splitext(str(path))[1]
    if ext == ".py":
        return True
    if ext not in (".yaml", ".yml") or not os.path.isfile(path):
        return False
    with open(path) as f:
        text = f.read()
    return bool(re.search(r"^model:", text, re.M)) and "_target_:" in text


def load_lazy_config(path: str, opts: Sequence[str] = ()) -> DictConfig:
    """``LazyConfig.load(path)`` with ``a.b=c`` overrides applied."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file '{path}' does not exist")
    cfg = LazyConfig.load(path)
    return LazyConfig.apply_overrides(cfg, list(opts))


def _target_name(node: Any) -> str:
    target = node.get("_target_") if isinstance(node, (DictConfig, dict)) else None
    if target is None or isinstance(target, str):
        return target or ""
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"


def is_lazy_tid_config(cfg: DictConfig) -> bool:
    """Whether a LazyConfig's ``model`` is ``L(build_lazy_distiller)(...)``."""
    return "model" in cfg and _target_name(cfg.model) == _LAZY_DISTILLER


def lazy_input_format(cfg: DictConfig, model: Optional[nn.Module] = None) -> str:
    """A LazyConfig model's input format: ``dataloader.train.mapper.image_format``, else the
    model's ``input_format`` attribute, else "BGR"."""
    fmt = OmegaConf.select(cfg, "dataloader.train.mapper.image_format", default=None)
    if fmt is None and model is not None:
        fmt = getattr(model, "input_format", None)
    return fmt or "BGR"


def _visit(node: Any, fn) -> None:
    if isinstance(node, DictConfig):
        fn(node)
        for value in node.values():
            _visit(value, fn)
    elif isinstance(node, ListConfig):
        for value in node:
            _visit(value, fn)


def _no_imagenet_init(node: DictConfig) -> None:
    # The teacher's weights come from tid.teacher.weights (MobileNetV2's imagenet_init would load
    # ImageNet weights only to overwrite them), as teacher_cfg_from does for yacs teachers.
    if "imagenet_init" in node:
        node.imagenet_init = False


def build_teacher_from_tid(cfg: CfgNode) -> Tuple[nn.Module, Optional[CfgNode], str]:
    """Build, strictly load and freeze the teacher of ``cfg.TID.TEACHER``.

    Returns:
        (teacher in eval mode without gradients, its yacs config or None for a LazyConfig
        teacher, its input format)
    """
    t = cfg.TID.TEACHER
    path = t.CONFIG_FILE
    if not path:
        raise ValueError(
            "tid.teacher.config_file is empty: set it to the teacher detector's config file "
            "(a LazyConfig .py or a yacs .yaml)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tid.teacher.config_file '{path}' does not exist. Point it at the config the "
            "teacher was trained with (paths are relative to the working directory)."
        )
    if not t.WEIGHTS:
        raise ValueError(
            "tid.teacher.weights is empty: train the teacher first and set it to the teacher's "
            "model_final.pth."
        )
    if "://" not in t.WEIGHTS and not os.path.isfile(t.WEIGHTS):
        raise FileNotFoundError(
            f"tid.teacher.weights '{t.WEIGHTS}' does not exist. Train the teacher (config "
            f"{path}) or fix the path."
        )
    if not is_lazy_config(path):
        teacher, tcfg = build_teacher(cfg)
        return teacher, tcfg, tcfg.INPUT.FORMAT
    tlazy = load_lazy_config(path, list(t.OPTS))
    if "model" not in tlazy:
        raise ValueError(f"tid.teacher.config_file '{path}' has no 'model'")
    if is_lazy_tid_config(tlazy):
        raise ValueError(
            f"tid.teacher.config_file '{path}' is itself a TID config; the teacher must be a "
            "plain detector config (RetinaNet, FCOS, GeneralizedRCNN, ...)."
        )
    _visit(tlazy.model, _no_imagenet_init)
    teacher = instantiate(tlazy.model)
    teacher.to(torch.device(cfg.MODEL.DEVICE))
    freeze_teacher(teacher, t.WEIGHTS, cfg.TID.ALLOW_PICKLE_WEIGHTS)
    logger.info(
        "Teacher loaded strictly from %s (%s, LazyConfig %s)",
        t.WEIGHTS,
        type(teacher).__name__,
        path,
    )
    return teacher, None, lazy_input_format(tlazy, teacher)


# ------------------------------------------------------------------------------- optimizer
def clipped_optimizer(
    params: Any,
    *,
    optimizer_class: Union[type, str] = torch.optim.SGD,
    clip_type: str = "norm",
    clip_value: float = 1.0,
    norm_type: float = 2.0,
    enabled: bool = True,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_class(params, **kwargs)`` with detectron2's gradient clipping, the yacs
    ``SOLVER.CLIP_GRADIENTS`` (each parameter's gradient clipped on its own, before every step),
    for LazyConfig: ``L(clipped_optimizer)(params=L(get_default_optimizer_params)(...), lr=...,
    clip_value=10.0)``; ``optimizer.params.model`` is set by the training script as usual."""
    if isinstance(optimizer_class, str):
        optimizer_class = locate(optimizer_class)
    optimizer = optimizer_class(params, **kwargs)
    clip = CfgNode(
        {
            "SOLVER": {
                "CLIP_GRADIENTS": {
                    "ENABLED": bool(enabled),
                    "CLIP_TYPE": clip_type,
                    "CLIP_VALUE": float(clip_value),
                    "NORM_TYPE": float(norm_type),
                }
            }
        }
    )
    return maybe_add_gradient_clipping(clip, optimizer)


def dataset_names(names: Union[None, str, Sequence[str]]) -> List[str]:
    """A LazyConfig's ``dataset.names`` (a name or a list of names) as a list."""
    if not names:
        return []
    if isinstance(names, str):
        return [names]
    return list(names)
