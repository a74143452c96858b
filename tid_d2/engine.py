"""Training and evaluation plumbing: the Trainer used by ``train_net.py``, a crash-safe checkpointer
that refuses untrusted pickles, DDP that also works on the CPU, and the teacher check."""

import glob
import itertools
import logging
import os
import random
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    default_argument_parser,
    hooks,
    launch,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .data import add_dataset_args, ensure_generated
from .modeling.distiller import TIDDistiller, student_cfg_from
from .modeling.teacher import read_checkpoint

__all__ = [
    "Trainer",
    "TIDTrainerMixin",
    "TIDCheckpointer",
    "create_ddp_model",
    "evaluate_teacher",
    "build_student_for_eval",
    "unwrap",
    "verification_image",
    "max_prediction_diff",
    "verified_export",
    "image_dicts",
    "argument_parser",
    "launch_from_command_line",
]

logger = logging.getLogger("tid_d2")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def create_ddp_model(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around ``model`` when running distributed; ``device_ids`` only for CUDA models.

    detectron2's ``create_ddp_model`` always passes ``device_ids``, which CPU (gloo) modules
    reject. The teacher of a TIDDistiller is not a registered submodule, so DDP never wraps it.
    """
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    kwargs = {"broadcast_buffers": False}
    if device.type == "cuda":
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    return ddp


class TIDCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that
    - writes every checkpoint (and ``last_checkpoint``) to a temporary file and renames it into
      place, so a process killed during a save leaves the previous checkpoint valid;
    - refuses ``.pkl`` weights (pickle runs code) unless ``allow_pickle``;
    - reads ``.pth`` files with ``torch.load(weights_only=True)``;
    - ignores the distiller's keys of a TID checkpoint (``tid_adapters.``, ``tid_loss.``) when
      loading into a model that has no such module (e.g. a plain student).
    """

    def __init__(self, model, save_dir="", *, allow_pickle: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_pickle = allow_pickle

    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint '{path}' does not exist: check MODEL.WEIGHTS (or the run folder's "
                "last_checkpoint when resuming)."
            )
        return super().load(path, *args, **kwargs)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        for stale in glob.glob(f"{save_file}.tmp.*"):  # left by a process killed while saving
            os.remove(stale)
        self.logger.info("Saving checkpoint to %s", save_file)
        _atomic_write(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename), "w")

    def _load_file(self, filename: str):
        if filename.endswith(".pkl"):
            read_checkpoint(filename, self.allow_pickle, "weights")  # raises unless allowed
            return super()._load_file(filename)
        if filename.endswith(".pth"):
            try:
                data = torch.load(filename, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(
                    f"checkpoint '{filename}' could not be read ({type(e).__name__}): it is "
                    "truncated, corrupt or not a weights-only PyTorch checkpoint."
                ) from None
            return data if "model" in data else {"model": data}
        return super()._load_file(filename)

    def _load_model(self, checkpoint):
        from .modeling.distiller import is_distiller_key

        # a distiller module (adapters "tid_adapters.", a method's "tid_loss.") that this model
        # lacks: its keys are left out (a plain student loading a TID checkpoint, or a fitnet
        # model loading an FGD one); one the model has must be in the checkpoint (strict resume)
        have = {k.split(".", 1)[0] for k in self.model.state_dict() if is_distiller_key(k)}
        checkpoint["model"] = OrderedDict(
            (k, v)
            for k, v in checkpoint["model"].items()
            if not is_distiller_key(k) or k.split(".", 1)[0] in have
        )
        return super()._load_model(checkpoint)


def _atomic_write(path: str, write, mode: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler that can skip the samples a resumed run already consumed, so
    that a run resumed at iteration k sees the same images, in the same order, as an
    uninterrupted run (random augmentations are re-seeded at resume, not continued)."""

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None):
        super().__init__(size, shuffle, seed)
        self.skip = 0  # samples per rank to skip

    def __iter__(self):
        start = self._rank + self.skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


class TIDTrainerMixin:
    """What tid-d2 adds to detectron2's trainers, for :class:`Trainer` (yacs) and the LazyConfig
    trainers of :mod:`tid_d2.lazy_engine`: TorchScript's graph-executor optimisation off (a
    resumed run repeats an uninterrupted one bit for bit) and the modules' Python training state
    (the running loss normaliser of RetinaNet / FCOS) saved with the checkpoint."""

    # Training state that detectron2 keeps in plain Python attributes, not in state_dict()
    # (RetinaNet / FCOS's running loss normaliser): saved with the trainer for an exact resume.
    _PYTHON_STATE = ("loss_normalizer",)

    def state_dict(self):
        ret = super().state_dict()
        ret["module_python_state"] = {
            f"{name}:{attr}": float(getattr(m, attr))
            for name, m in unwrap(self.model).named_modules()
            for attr in self._PYTHON_STATE
            if isinstance(getattr(m, attr, None), (int, float))
        }
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        model = unwrap(self.model)
        for key, value in state_dict.get("module_python_state", {}).items():
            name, attr = key.rsplit(":", 1)
            setattr(model.get_submodule(name), attr, value)

    def run_step(self):
        """One training step, with TorchScript's graph-executor optimisation off.

        fvcore's focal loss (RetinaNet, FCOS) is a scripted function. Its profiling executor runs
        the first call in a process as plain autograd and later calls through symbolic autodiff,
        which rounds the gradients differently: a run resumed in a new process (or the first run in
        a process) would not repeat the uninterrupted run bit for bit. Unoptimised, every call is
        computed like eager PyTorch (the flag is per thread; the forward runs on this one)."""
        with torch.jit.optimized_execution(False):
            super().run_step()


class Trainer(TIDTrainerMixin, DefaultTrainer):
    """DefaultTrainer with COCOEvaluator, CPU-capable DDP, the crash-safe checkpointer and an
    optional evaluation of the teacher before distilling (``TID.TEACHER.EVAL_BEFORE_TRAIN``)."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__, with our DDP and checkpointer.
        super(DefaultTrainer, self).__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self._sampler: Optional[ResumableTrainingSampler] = None
        if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
            for name in cfg.DATASETS.TRAIN:
                ensure_generated(name)
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN,
                filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                min_keypoints=0,
                proposal_files=(
                    cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None
                ),
            )
            self._sampler = ResumableTrainingSampler(len(dataset))
            data_loader = build_detection_train_loader(cfg, dataset=dataset, sampler=self._sampler)
        else:
            data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = TIDCheckpointer(
            model,
            cfg.OUTPUT_DIR,
            allow_pickle=cfg.TID.ALLOW_PICKLE_WEIGHTS,
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer, with the adapters' learning rate scaled by
        ``TID.ADAPTER_LR_SCALE`` (the distiller's ``tid_adapters``, biases x BIAS_LR_FACTOR as
        well)."""
        scale = cfg.TID.ADAPTER_LR_SCALE
        if scale == 1.0:
            return super().build_optimizer(cfg, model)
        from detectron2.solver.build import get_default_optimizer_params
        from detectron2.solver.build import maybe_add_gradient_clipping

        def groups(module, base_lr):
            return get_default_optimizer_params(
                module,
                base_lr=base_lr,
                weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
            )

        # two calls rather than detectron2's lr_factor_func, which its bias override undoes
        adapters = getattr(model, "tid_adapters", None)
        own = [p for p in adapters.parameters() if p.requires_grad] if adapters else []
        for p in own:  # out of the first call
            p.requires_grad_(False)
        try:
            params = groups(model, cfg.SOLVER.BASE_LR)
        finally:
            for p in own:
                p.requires_grad_(True)
        if own:
            params += groups(adapters, cfg.SOLVER.BASE_LR * scale)
        sgd = torch.optim.SGD(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            foreach=True,
        )
        return maybe_add_gradient_clipping(cfg, sgd)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self._sampler is not None:  # continue the data stream where the checkpoint left it
            self._sampler.skip = self.start_iter * (
                self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            )

    def build_hooks(self):
        ret = super().build_hooks()
        model = unwrap(self.model)
        if (
            isinstance(model, TIDDistiller)
            and model.teacher is not None
            and self.cfg.TID.TEACHER.EVAL_BEFORE_TRAIN
        ):
            ret.insert(0, _TeacherEvalHook(self.cfg, model))
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test`` that leaves every random number generator as it found it.

        Creating a data loader's iterator draws a seed from torch's global generator, so an
        evaluation during training (``TEST.EVAL_PERIOD``, the teacher's before training) would
        otherwise shift every later draw of the training: Faster R-CNN's RPN / ROI sampling, and
        the train loader's worker seeds when it starts after the evaluation. A run's result would
        then depend on whether and how often it was evaluated."""
        with preserved_rng_state():
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        ensure_generated(dataset_name)
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        for name in cfg.DATASETS.TRAIN:
            ensure_generated(name)
        return super().build_train_loader(cfg)


@contextmanager
def preserved_rng_state():
    """Run the block, then restore torch's (CPU and current CUDA device), NumPy's and Python's
    global random states to what they were before it."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _TeacherEvalHook(hooks.HookBase):
    """Evaluate the teacher once before training: catches a teacher that did not learn or load."""

    def __init__(self, cfg, distiller: TIDDistiller):
        self.cfg = cfg
        self.distiller = distiller

    def before_train(self):
        if self.trainer.iter > self.trainer.start_iter or self.trainer.start_iter > 0:
            return
        results = evaluate_teacher(self.cfg, self.distiller.teacher, self.distiller.teacher_cfg)
        if self.distiller.teacher_probe is not None:
            self.distiller.teacher_probe.clear()
        storage = self.trainer.storage
        for name, res in results.items():
            if "bbox" in res:
                storage.put_scalar(f"teacher/{name}/AP", res["bbox"]["AP"], smoothing_hint=False)


def evaluate_teacher(cfg, teacher: torch.nn.Module, teacher_cfg) -> Dict:
    """COCO bbox AP of the teacher on ``cfg.DATASETS.TEST``, read with the teacher's own input
    format and normalisation. Logs a one-line summary per dataset."""
    tcfg = teacher_cfg.clone()
    tcfg.defrost()
    tcfg.DATASETS.TEST = cfg.DATASETS.TEST
    tcfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "teacher_eval")
    tcfg.freeze()
    was_training = teacher.training
    teacher.eval()
    results = Trainer.test(tcfg, teacher)
    teacher.train(was_training)
    if not isinstance(results, dict) or "bbox" in results:
        results = {cfg.DATASETS.TEST[0]: results}
    for name, res in results.items():
        if comm.is_main_process() and "bbox" in res:
            logger.info(
                "Teacher on %s: bbox AP %.2f (AP50 %.2f)",
                name,
                res["bbox"]["AP"],
                res["bbox"]["AP50"],
            )
    return results


def build_student_for_eval(
    cfg, weights: Optional[str] = None, resume: bool = False, output_dir=None
):
    """The student of ``cfg`` as a plain detectron2 model (no teacher), with its weights loaded.

    For a TID config this is the student's own meta-architecture: the TID checkpoint loads into
    it directly, which is also what ``tools/export_student.py`` verifies.
    """
    scfg = student_cfg_from(cfg) if cfg.MODEL.META_ARCHITECTURE == "TIDDistiller" else cfg
    model = build_model(scfg)
    TIDCheckpointer(
        model, output_dir or cfg.OUTPUT_DIR, allow_pickle=cfg.TID.ALLOW_PICKLE_WEIGHTS
    ).resume_or_load(weights if weights is not None else cfg.MODEL.WEIGHTS, resume=resume)
    return model, scfg


# ------------------------------------------------------------------------------- tools
def verification_image(image: Optional[str], dataset: Optional[str] = None) -> np.ndarray:
    """A BGR uint8 image: the file ``image``, or (``image`` None) the first image of the
    registered ``dataset``, generated first if it is a ``tid_shapes`` split (the image an
    exported student is checked on, by ``tools/export_student.py`` for both config kinds)."""
    import cv2
    from detectron2.data import DatasetCatalog

    if image is None:
        ensure_generated(dataset)
        image = DatasetCatalog.get(dataset)[0]["file_name"]
    img = cv2.imread(image, cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read image '{image}'")
    return img


def max_prediction_diff(a, b) -> float:
    """The largest absolute difference between the boxes and scores of two ``Instances``
    predictions of one image; inf when they hold different numbers of detections."""
    if len(a) != len(b):
        return float("inf")
    if len(a) == 0:
        return 0.0
    return max(
        (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max().item(),
        (a.scores - b.scores).abs().max().item(),
    )


def verified_export(weights: str, config: str, pred, ref) -> Dict:
    """The result of ``tools/export_student.py`` (both config kinds): {"weights", "config",
    "max_abs_diff", "num_detections"} of the exported files, whose prediction ``pred`` must match
    the checkpoint's ``ref`` (:func:`max_prediction_diff` at most 1e-4, else RuntimeError)."""
    diff = max_prediction_diff(pred, ref)
    if diff > 1e-4:
        raise RuntimeError(
            f"exported student predicts differently from the checkpoint (max |diff| {diff})"
        )
    return {
        "weights": weights,
        "config": config,
        "max_abs_diff": diff,
        "num_detections": len(pred),
    }


def image_dicts(dataset: str, images: Optional[List[str]], num_images: int) -> List[Dict]:
    """detectron2 dataset dicts: one per image file of ``images`` (no annotations: every location
    then scores as background), else the first ``num_images`` of the registered ``dataset``
    (generated first if it is a ``tid_shapes`` split). Used by ``tools/visualize_significance.py``
    for both config kinds; the dicts still go through the config's test mapper."""
    import cv2
    from detectron2.data import DatasetCatalog

    if images:
        dicts = []
        for path in images:
            img = cv2.imread(path)
            if img is None:
                raise FileNotFoundError(f"cannot read image '{path}'")
            h, w = img.shape[:2]
            dicts.append({"file_name": path, "height": h, "width": w, "annotations": []})
        return dicts
    ensure_generated(dataset)
    return DatasetCatalog.get(dataset)[:num_images]


# ------------------------------------------------------------------------------- command line
def argument_parser():
    """The command line of ``train_net.py`` (yacs) and ``tools/lazy_train_net.py`` (LazyConfig):
    detectron2's ``default_argument_parser`` with ``--dataset`` (``add_dataset_args``)."""
    parser = default_argument_parser()
    add_dataset_args(parser)
    return parser


def launch_from_command_line(main, parser) -> None:
    """Parse the command line with ``parser``, print it and run ``main(args)`` through detectron2's
    ``launch`` (``--num-gpus`` processes per machine, ``--num-machines``, ``--machine-rank``,
    ``--dist-url``): the ``__main__`` of ``train_net.py`` and ``tools/lazy_train_net.py``."""
    args = parser.parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
