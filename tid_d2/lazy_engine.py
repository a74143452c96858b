"""Training, evaluation and tool support for LazyConfig (Python) configs, following detectron2's
``tools/lazyconfig_train_net.py`` with what ``train_net.py`` adds for yacs configs: the
crash-safe :class:`~tid_d2.engine.TIDCheckpointer`, a data stream that resumes where it stopped,
the TID logging (the distiller logs itself into the EventStorage), the teacher's evaluation before
training, and generation of the ``tid_shapes`` datasets on first use.

A LazyConfig used here has detectron2's usual top-level keys: ``model``, ``dataloader.train``,
``dataloader.test``, ``dataloader.evaluator``, ``optimizer``, ``lr_multiplier`` and ``train``
(``detectron2/model_zoo/configs/common/train.py``: output_dir, init_checkpoint, max_iter,
amp.enabled, checkpointer, eval_period, log_period, device, seed).
"""

import copy
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import build_detection_train_loader
from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .data import ensure_generated
from .engine import (
    ResumableTrainingSampler,
    TIDCheckpointer,
    TIDTrainerMixin,
    create_ddp_model,
    image_dicts,
    preserved_rng_state,
    unwrap,
    verification_image,
    verified_export,
)
from .lazy import dataset_names, is_lazy_tid_config, load_lazy_config, tid_cfg_from_lazy
from .modeling.distiller import TIDDistiller, is_distiller_key
from .modeling.teacher import load_weights_strict, read_checkpoint

__all__ = [
    "LazySimpleTrainer",
    "LazyAMPTrainer",
    "LazyTeacherEvalHook",
    "allow_pickle_weights",
    "build_student",
    "build_lazy_train_loader",
    "do_test",
    "do_train",
    "do_eval_only",
    "evaluate_lazy_teacher",
    "build_lazy_tid_teacher",
    "export_lazy_student",
    "lazy_significance_setup",
]

logger = logging.getLogger("tid_d2")


# ------------------------------------------------------------------------------- settings
def _tid(cfg: DictConfig):
    """The yacs TID config of a lazy TID config (defaults merged), else None."""
    return tid_cfg_from_lazy(cfg.model.get("tid")) if is_lazy_tid_config(cfg) else None


def allow_pickle_weights(cfg: DictConfig) -> bool:
    """Whether ``.pkl`` checkpoints may be read: ``model.tid.allow_pickle_weights`` of a TID
    config, ``train.allow_pickle_weights`` of any other (pickles run code when read)."""
    tid = _tid(cfg)
    if tid is not None:
        return bool(tid.TID.ALLOW_PICKLE_WEIGHTS)
    return bool(OmegaConf.select(cfg, "train.allow_pickle_weights", default=False))


def _ensure(names) -> None:
    for name in dataset_names(names):
        ensure_generated(name)


# ------------------------------------------------------------------------------- trainers
class LazySimpleTrainer(TIDTrainerMixin, SimpleTrainer):
    """detectron2's SimpleTrainer with :class:`~tid_d2.engine.TIDTrainerMixin` (what
    :class:`tid_d2.engine.Trainer` adds to detectron2's trainers)."""


class LazyAMPTrainer(TIDTrainerMixin, AMPTrainer):
    """detectron2's AMPTrainer with :class:`~tid_d2.engine.TIDTrainerMixin`."""


# ------------------------------------------------------------------------------- data
def build_lazy_train_loader(
    cfg: DictConfig,
) -> Tuple[torch.utils.data.DataLoader, Optional[ResumableTrainingSampler]]:
    """``instantiate(cfg.dataloader.train)``, its ``tid_shapes`` splits generated first; a
    ``build_detection_train_loader`` without a sampler of its own gets a
    :class:`~tid_d2.engine.ResumableTrainingSampler` (returned, to resume the data stream)."""
    spec = cfg.dataloader.train
    _ensure(OmegaConf.select(spec, "dataset.names", default=None))
    target = spec.get("_target_")
    plain = target is build_detection_train_loader or (
        isinstance(target, str) and target.endswith("build_detection_train_loader")
    )
    if not plain or spec.get("sampler") is not None or "dataset" not in spec:
        return instantiate(spec), None
    dataset = instantiate(spec.dataset)
    sampler = ResumableTrainingSampler(len(dataset))
    kwargs = {k: spec[k] for k in spec if k not in ("dataset", "sampler")}
    return instantiate({**kwargs, "dataset": dataset, "sampler": sampler}), sampler


def do_test(cfg: DictConfig, model: nn.Module) -> Dict:
    """Evaluate ``model`` with ``dataloader.test`` and ``dataloader.evaluator`` (detectron2's
    ``do_test``), leaving every random number generator as it found it (see
    :meth:`tid_d2.engine.Trainer.test`). Returns {} without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    _ensure(OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None))
    with preserved_rng_state():
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def evaluate_lazy_teacher(
    cfg: DictConfig,
    teacher: nn.Module,
    input_format: str,
    dataset: Optional[str] = None,
    output_dir: Optional[str] = None,
) -> Dict[str, Dict]:
    """COCO AP of ``teacher`` with the config's test loader and evaluator, the images read in
    the teacher's own ``input_format``; ``dataset`` replaces the test dataset's name.

    Returns:
        {dataset name: results}
    """
    ecfg = copy.deepcopy(cfg)
    ecfg.dataloader.test.mapper.image_format = input_format
    if dataset:
        ecfg.dataloader.test.dataset.names = dataset
    name = ", ".join(dataset_names(ecfg.dataloader.test.dataset.names))
    out = output_dir or os.path.join(ecfg.train.output_dir, "teacher_eval")
    if "evaluator" in ecfg.dataloader and "output_dir" in ecfg.dataloader.evaluator:
        ecfg.dataloader.evaluator.output_dir = os.path.join(out, "inference", name)
    was_training = teacher.training
    teacher.eval()
    try:
        results = do_test(ecfg, teacher)
    finally:
        teacher.train(was_training)
    if comm.is_main_process() and "bbox" in results:
        logger.info(
            "Teacher on %s: bbox AP %.2f (AP50 %.2f)",
            name,
            results["bbox"]["AP"],
            results["bbox"]["AP50"],
        )
    return {name: results}


class LazyTeacherEvalHook(hooks.HookBase):
    """Evaluate the teacher once before training (``tid.teacher.eval_before_train``) and log
    ``teacher/<dataset>/AP``: catches a teacher that did not learn or load."""

    def __init__(self, cfg: DictConfig, distiller: TIDDistiller):
        self.cfg = cfg
        self.distiller = distiller

    def before_train(self):
        if self.trainer.iter > self.trainer.start_iter or self.trainer.start_iter > 0:
            return
        d = self.distiller
        results = evaluate_lazy_teacher(self.cfg, d.teacher, d.teacher_input_format)
        if d.teacher_probe is not None:
            d.teacher_probe.clear()
        for name, res in results.items():
            if "bbox" in res:
                self.trainer.storage.put_scalar(
                    f"teacher/{name}/AP", res["bbox"]["AP"], smoothing_hint=False
                )


# ------------------------------------------------------------------------------- train / eval
def do_train(cfg: DictConfig, resume: bool = False) -> Dict:
    """Train ``cfg.model`` (detectron2's LazyConfig ``do_train`` with tid-d2's checkpointer,
    resumable data stream and teacher evaluation). Returns the last evaluation's results."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    try:
        optimizer = instantiate(cfg.optimizer)
    finally:  # keep the config a config (it is saved and copied)
        del cfg.optimizer.params.model
    train_loader, sampler = build_lazy_train_loader(cfg)
    model = create_ddp_model(model)
    trainer_cls = LazyAMPTrainer if cfg.train.amp.enabled else LazySimpleTrainer
    trainer = trainer_cls(model, train_loader, optimizer)
    checkpointer = TIDCheckpointer(
        model, cfg.train.output_dir, allow_pickle=allow_pickle_weights(cfg), trainer=trainer
    )
    last_results: Dict = {}

    def test_and_save_results():
        last_results.clear()
        last_results.update(do_test(cfg, model))
        return last_results

    distiller = unwrap(model)
    tid = _tid(cfg)
    main = comm.is_main_process()
    trainer.register_hooks(
        [
            (
                LazyTeacherEvalHook(cfg, distiller)
                if tid is not None
                and tid.TID.TEACHER.EVAL_BEFORE_TRAIN
                and getattr(distiller, "teacher", None) is not None
                else None
            ),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
            hooks.EvalHook(cfg.train.eval_period, test_and_save_results),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # the checkpoint stores the iteration that just finished: start at the next one
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if sampler is not None:  # continue the data stream where the checkpoint left it
        sampler.skip = start_iter * (cfg.dataloader.train.total_batch_size // comm.get_world_size())
    trainer.train(start_iter, cfg.train.max_iter)
    return last_results


def build_student(cfg: DictConfig) -> nn.Module:
    """The model to evaluate or deploy: a TID config's student (a plain detectron2 model, no
    teacher), else ``cfg.model``; on ``train.device``."""
    node = cfg.model.student if is_lazy_tid_config(cfg) else cfg.model
    model = instantiate(node)
    model.to(OmegaConf.select(cfg, "train.device", default="cpu"))
    return model


def do_eval_only(cfg: DictConfig, resume: bool = False) -> Dict:
    """Evaluate the student (a TID config) or the model of ``train.init_checkpoint`` (with
    ``resume``: the run folder's last checkpoint)."""
    model = create_ddp_model(build_student(cfg))
    TIDCheckpointer(
        model, cfg.train.output_dir, allow_pickle=allow_pickle_weights(cfg)
    ).resume_or_load(cfg.train.init_checkpoint, resume=resume)
    return do_test(cfg, model)


# ------------------------------------------------------------------------------- tools
def build_lazy_tid_teacher(cfg: DictConfig) -> Tuple[nn.Module, str, CfgNode]:
    """The teacher of a lazy TID config: (teacher, its input format, the merged yacs TID cfg)."""
    from .lazy import build_teacher_from_tid

    if not is_lazy_tid_config(cfg):
        raise ValueError("not a TID config: its model is not L(build_lazy_distiller)(...)")
    device = OmegaConf.select(cfg, "train.device", default="cpu")
    tid = tid_cfg_from_lazy(cfg.model.get("tid"), device=device)
    teacher, _tcfg, fmt = build_teacher_from_tid(tid)
    return teacher, fmt, tid


def _not_tid(config_file: str, cfg: DictConfig) -> ValueError:
    target = cfg.model.get("_target_") if "model" in cfg else None
    return ValueError(
        f"'{config_file}' is not a TID config (its model is {target!r}, expected "
        "L(tid_d2.lazy.build_lazy_distiller)): pass the config the student was distilled with."
    )


def _predict(model: nn.Module, img_bgr: np.ndarray, cfg: DictConfig):
    """The test mapper's preprocessing (format, augmentations), then the model, in eval."""
    import detectron2.data.transforms as T

    mapper = cfg.dataloader.test.mapper
    img = img_bgr[:, :, ::-1] if mapper.get("image_format", "BGR") == "RGB" else img_bgr
    h, w = img.shape[:2]
    aug_input = T.AugInput(np.ascontiguousarray(img))
    T.AugmentationList(list(instantiate(mapper.augmentations)))(aug_input)
    tensor = torch.as_tensor(aug_input.image.astype("float32").transpose(2, 0, 1))
    model.eval()
    with torch.no_grad():
        return model([{"image": tensor, "height": h, "width": w}])[0]["instances"]


def export_lazy_student(
    config_file: str,
    weights: str,
    output: str,
    image: Optional[str] = None,
    opts: Sequence[str] = (),
) -> Dict:
    """``tools/export_student.py`` for a LazyConfig TID config: the student's weights (no
    teacher, adapters or optimizer state) and its own LazyConfig (``model`` = the student node,
    ``train.init_checkpoint`` = the exported weights), reloaded and checked against the
    checkpoint. Returns {"weights", "config", "max_abs_diff", "num_detections"}."""
    cfg = load_lazy_config(config_file, opts)
    if not is_lazy_tid_config(cfg):
        raise _not_tid(config_file, cfg)
    cfg.train.device = "cpu"
    tid = _tid(cfg)
    state = read_checkpoint(weights, tid.TID.ALLOW_PICKLE_WEIGHTS, "student checkpoint")
    student_state = {k: v for k, v in state.items() if not is_distiller_key(k)}
    student = build_student(cfg)
    os.makedirs(output, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output) as tmp:
        path = os.path.join(tmp, "student.pth")
        torch.save({"model": student_state}, path)
        # strict: a checkpoint of another architecture fails here, naming the keys
        load_weights_strict(student, path, what="student checkpoint")
    out_weights = os.path.join(output, "model_final.pth")
    torch.save({"model": student.state_dict()}, out_weights + ".tmp")
    os.replace(out_weights + ".tmp", out_weights)

    ecfg = copy.deepcopy(cfg)
    ecfg.model = copy.deepcopy(cfg.model.student)
    ecfg.train.init_checkpoint = os.path.abspath(out_weights)
    ecfg.train.output_dir = os.path.abspath(output)
    out_cfg = os.path.join(output, "config.yaml")
    LazyConfig.save(ecfg, out_cfg)
    if os.path.isfile(out_cfg + ".pkl"):  # not serialisable to yaml: LazyConfig pickled it
        out_cfg = out_cfg + ".pkl"

    # Verify: reload the exported files with a fresh config, as a user would.
    vcfg = LazyConfig.load(out_cfg)
    vcfg.train.device = "cpu"
    exported = build_student(vcfg)
    TIDCheckpointer(exported).load(vcfg.train.init_checkpoint)
    test_set = dataset_names(cfg.dataloader.test.dataset.names)[0] if image is None else None
    img = verification_image(image, test_set)
    pred = _predict(exported, img, vcfg)
    ref = _predict(student, img, cfg)
    return {
        **verified_export(out_weights, out_cfg, pred, ref),
        "predictor": "LazyConfig.load + instantiate",
    }


def lazy_significance_setup(
    config_file: str,
    opts: Sequence[str],
    weights: Optional[str],
    dataset: str,
    images: Optional[List[str]],
    num_images: int,
) -> Tuple[TIDDistiller, List[Dict], str, str]:
    """``tools/visualize_significance.py`` for a LazyConfig TID config.

    Returns:
        (distiller with the checkpoint loaded, its inputs with GT, the input format, the mode)
    """
    cfg = load_lazy_config(config_file, opts)
    if not is_lazy_tid_config(cfg):
        raise _not_tid(config_file, cfg)
    if _tid(cfg).TID.MODE == "none":
        cfg.model.tid.mode = "tid"
    model = instantiate(cfg.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    weights = weights if weights is not None else cfg.train.init_checkpoint
    if weights:
        TIDCheckpointer(model, allow_pickle=allow_pickle_weights(cfg)).load(weights)
    mapper = instantiate(cfg.dataloader.test.mapper)
    mapper.is_train = True  # keep the annotations (test-time augmentation, no flips)
    inputs = [mapper(copy.deepcopy(d)) for d in image_dicts(dataset, images, num_images)]
    return model, inputs, mapper.image_format, model.mode
