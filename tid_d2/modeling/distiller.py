"""TIDDistiller: a detectron2 meta-architecture that trains a student detector while imitating a
frozen teacher's FPN features where Task Integration Distillation says it matters.

Checkpoint layout: ``state_dict()`` holds the student under exactly the keys of a plain detectron2
model built from the student's config, plus what the distiller trains besides it under keys that
start with ``tid_`` (:data:`DISTILLER_KEY_PREFIX`): the adapters (``tid_adapters.``) and an
imitation method's own modules (``tid_loss.``, e.g. FGD's GcBlocks). The teacher is not a
registered submodule, so it is neither saved, nor optimised, nor wrapped by DDP.

The distiller is orchestration: which levels, which regions (:mod:`.regions`, from the
significance of :mod:`.probes`), and which loss, one module per method: SFDM
(:class:`~.imitation.RegionImitation`, every mode of the TID family), PKD (:mod:`.pkd`) and FGD
(:mod:`.fgd`).
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils import comm
from detectron2.utils.events import EventStorage, get_event_storage
from torch import nn

from .fgd import FGDImitation, FGDParams, fgd_masks, fgd_params_for
from .imitation import (
    FeatureAdapters,
    LevelImitation,
    LevelInputs,
    RegionImitation,
    check_feature_norm,
    check_region_normalize,
    region_counts,
)
from .pkd import PKDImitation, pkd_default_loss_weight
from .probes import DetectorProbe, build_probe
from .regions import (
    RegionParams,
    gt_mask_regions,
    ldam_regions,
    uniform_regions,
    valid_mask,
)
from .significance import paint_boxes
from .teacher import build_teacher
from .teacher_cache import TeacherOutputCache, run_teacher_cached

__all__ = [
    "TIDDistiller",
    "student_cfg_from",
    "TID_MODES",
    "DISTILLER_KEY_PREFIX",
    "is_distiller_key",
    "method_loss_weight",
    "loss_weight_key",
    "inert_key_groups",
]

logger = logging.getLogger(__name__)

TID_MODES = ("tid", "fitnet", "gt_mask", "cls_only", "reg_only", "no_ldam", "pkd", "fgd", "none")
_SIG_MODES = ("tid", "cls_only", "reg_only", "no_ldam")
# modes with a loss of their own (not SFDM's region loss) and the config subtree of each one's
# hyperparameters (its own LOSS_WEIGHT included): read by that mode only, inert in every other, so
# a run of another mode is the same run whatever they hold
METHOD_KEY_GROUPS = {"pkd": "TID.PKD", "fgd": "TID.FGD"}
_STUDENT = "student."
# state_dict keys of what the distiller trains besides the student (adapters, GcBlocks, ...)
DISTILLER_KEY_PREFIX = "tid_"


def is_distiller_key(key: str) -> bool:
    """Whether a TID checkpoint key belongs to the distiller (adapters, an imitation method's
    modules), not to the student: exports and plain students leave these out."""
    return key.startswith(DISTILLER_KEY_PREFIX)


def inert_key_groups(mode: str) -> Tuple[str, ...]:
    """The :data:`METHOD_KEY_GROUPS` subtrees that ``mode`` never reads, e.g. ``TID.PKD`` and
    ``TID.FGD`` for ``tid`` or ``none``, ``TID.FGD`` for ``pkd``."""
    return tuple(group for owner, group in METHOD_KEY_GROUPS.items() if owner != mode)


def loss_weight_key(mode: str) -> str:
    """The config key of lambda in ``mode``: each method has its own (see method_loss_weight)."""
    return f"{METHOD_KEY_GROUPS.get(mode, 'TID')}.LOSS_WEIGHT"


def method_loss_weight(cfg) -> float:
    """lambda of the configured mode: ``TID.PKD.LOSS_WEIGHT`` (negative: PKD's published value
    for the student's family), ``TID.FGD.LOSS_WEIGHT``, else ``TID.LOSS_WEIGHT``."""
    if cfg.TID.MODE == "pkd":
        w = float(cfg.TID.PKD.LOSS_WEIGHT)
        return w if w >= 0 else pkd_default_loss_weight(cfg.TID.STUDENT_META_ARCHITECTURE)
    if cfg.TID.MODE == "fgd":
        return float(cfg.TID.FGD.LOSS_WEIGHT)
    return float(cfg.TID.LOSS_WEIGHT)


def build_imitation(
    mode: str, feature_norm: str, teacher_channels: Dict[str, int], fgd_params: FGDParams
) -> LevelImitation:
    """The loss module of ``mode`` over the distilled levels ({level: C_T})."""
    if mode == "pkd":
        return PKDImitation()
    if mode == "fgd":
        return FGDImitation(teacher_channels, fgd_params)
    return RegionImitation(feature_norm)


def student_cfg_from(cfg):
    """The student's plain detectron2 config: ``cfg`` with META_ARCHITECTURE = the student's."""
    scfg = cfg.clone()
    scfg.defrost()
    if scfg.MODEL.META_ARCHITECTURE == "TIDDistiller":
        scfg.MODEL.META_ARCHITECTURE = cfg.TID.STUDENT_META_ARCHITECTURE
    if scfg.MODEL.META_ARCHITECTURE == "TIDDistiller":
        raise ValueError("TID.STUDENT_META_ARCHITECTURE cannot be TIDDistiller")
    scfg.freeze()
    return scfg


def validate_tid_cfg(cfg) -> None:
    """Reject impossible TID settings with a message that says what to fix."""
    tid = cfg.TID
    if tid.MODE not in TID_MODES:
        raise ValueError(f"unknown TID.MODE {tid.MODE!r}; choose one of {', '.join(TID_MODES)}")

    def check_unit(name, values, n):
        values = list(values)
        if len(values) != n or any(not (0.0 <= float(v) <= 1.0) for v in values):
            raise ValueError(f"{name} must be {n} number(s) in [0, 1], got {values}")
        if n == 2 and values[0] > values[1]:
            raise ValueError(f"{name} must be (low, high) with low <= high, got {values}")

    check_unit("TID.SIG.CLS_THRESHOLDS", tid.SIG.CLS_THRESHOLDS, 2)
    check_unit("TID.SIG.ANCHOR_FREE_IOU_THRESHOLDS", tid.SIG.ANCHOR_FREE_IOU_THRESHOLDS, 2)
    check_unit("TID.SIG.SINGLE_THRESHOLD_NEG", [tid.SIG.SINGLE_THRESHOLD_NEG], 1)
    check_unit("TID.SIG.ADAPTIVE_NEG_FACTOR", [tid.SIG.ADAPTIVE_NEG_FACTOR], 1)
    if tid.SIG.IOU_RULE not in ("adaptive", "fixed"):
        raise ValueError(
            f"TID.SIG.IOU_RULE must be 'adaptive' or 'fixed', got {tid.SIG.IOU_RULE!r}"
        )
    if len(tid.SIG.IOU_THRESHOLDS):
        check_unit("TID.SIG.IOU_THRESHOLDS", tid.SIG.IOU_THRESHOLDS, 2)
    if tid.LOSS_WEIGHT < 0 or tid.WARMUP_ITERS < 0 or tid.ADAPTER_WARMUP_ITERS < 0:
        raise ValueError(
            "TID.LOSS_WEIGHT, TID.WARMUP_ITERS and TID.ADAPTER_WARMUP_ITERS must be >= 0"
        )
    if tid.FGD.LOSS_WEIGHT < 0:
        raise ValueError("TID.FGD.LOSS_WEIGHT must be >= 0")
    if not tid.ADAPTER_LR_SCALE > 0:
        raise ValueError(
            f"TID.ADAPTER_LR_SCALE must be > 0 (the adapters' LR over SOLVER.BASE_LR), got "
            f"{tid.ADAPTER_LR_SCALE}; to keep the adapters fixed set TID.ADAPTER_TRAIN False"
        )
    if tid.MODE in METHOD_KEY_GROUPS and tid.FEATURE_NORM != "none":
        raise ValueError(
            f"TID.FEATURE_NORM {tid.FEATURE_NORM!r} applies to the SFDM modes; TID.MODE "
            f"{tid.MODE!r} has its own normalisation: set TID.FEATURE_NORM none"
        )
    RegionParams(  # validates rule and weights
        weak_rule=tid.REGION.WEAK_RULE, weights=tuple(float(w) for w in tid.REGION.WEIGHTS)
    )


def distiller_kwargs(cfg) -> Dict:
    """:class:`TIDDistiller` keyword arguments of a TID config other than the two models and
    their configs (shared by ``from_config`` and :mod:`tid_d2.lazy`)."""
    tid = cfg.TID
    return {
        "mode": tid.MODE,
        "in_features": list(tid.IN_FEATURES),
        "loss_weight": method_loss_weight(cfg),
        "warmup_iters": tid.WARMUP_ITERS,
        "adapter_mode": tid.ADAPTER,
        "region_params": RegionParams(
            key_thresh=tid.REGION.KEY_THRESH,
            weak_rule=tid.REGION.WEAK_RULE,
            weak_thresh=tid.REGION.WEAK_THRESH,
            weak_ratio=tid.REGION.WEAK_RATIO,
            weights=tuple(float(w) for w in tid.REGION.WEIGHTS),
        ),
        "vis_period": cfg.VIS_PERIOD,
        "tid_cfg": cfg,
        "feature_norm": tid.FEATURE_NORM,
        "adapter_warmup_iters": tid.ADAPTER_WARMUP_ITERS,
        "region_normalize": tid.REGION.NORMALIZE,
        "adapter_init": tid.ADAPTER_INIT,
        "adapter_train": tid.ADAPTER_TRAIN,
        "fgd_params": fgd_params_for(tid.FGD, tid.STUDENT_META_ARCHITECTURE),
        "teacher_cache_mb": tid.TEACHER.CACHE_MB,
    }


@META_ARCH_REGISTRY.register()
class TIDDistiller(nn.Module):
    """Frozen teacher + trainable student, with the TID feature-imitation loss in training.

    In eval mode (and with ``TID.MODE none``) it is exactly the student.
    """

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        student_cfg,
        teacher: Optional[nn.Module],
        teacher_cfg,
        mode: str,
        in_features: List[str],
        loss_weight: float,
        warmup_iters: int,
        adapter_mode: str,
        region_params: RegionParams,
        vis_period: int,
        tid_cfg,
        feature_norm: str = "none",
        adapter_warmup_iters: int = 0,
        region_normalize: str = "level",
        adapter_init: str = "kaiming",
        adapter_train: bool = True,
        fgd_params: FGDParams = FGDParams(),
        student_input_format: Optional[str] = None,
        teacher_input_format: Optional[str] = None,
        teacher_cache_mb: float = 0.0,
    ):
        """
        Args:
            student, student_cfg: the trainable detector and its plain detectron2 config.
            teacher, teacher_cfg: the frozen detector (None with mode "none") and its config.
            mode: one of TID_MODES.
            in_features: distilled FPN levels (empty = every level the student's heads read).
            loss_weight, warmup_iters: lambda and its linear ramp.
            adapter_mode: "auto" or "conv" (see TID.ADAPTER).
            region_params: kappa, weak rule and alpha weights.
            vis_period: put significance pictures into the event storage every this many iters.
            tid_cfg: the whole config (for the significance thresholds).
            feature_norm: "none" or "channel" (see TID.FEATURE_NORM).
            adapter_warmup_iters: iterations in which L_tid reaches only the adapters (see
                TID.ADAPTER_WARMUP_ITERS).
            region_normalize: "level", "all_levels" or "locations" (see TID.REGION.NORMALIZE).
            adapter_init: "kaiming" or "orthogonal" (see TID.ADAPTER_INIT).
            adapter_train: False keeps the adapters fixed at their start (TID.ADAPTER_TRAIN).
            fgd_params: FGD's temperature and term weights (mode "fgd", see TID.FGD.*).
            student_input_format, teacher_input_format: "BGR" or "RGB"; default: the configs'
                INPUT.FORMAT. Models built without a yacs config (LazyConfig, see
                :mod:`tid_d2.lazy`) pass None configs and their formats here.
            teacher_cache_mb: keep the teacher's outputs per training image, up to this many MB,
                and reuse them when the same image comes again (:mod:`.teacher_cache`); 0 = off.
        """
        super().__init__()
        if mode not in TID_MODES:
            raise ValueError(f"unknown TID.MODE {mode!r}; choose one of {', '.join(TID_MODES)}")
        self.student = student
        self.student_cfg = student_cfg
        self.mode = mode
        self.loss_weight = float(loss_weight)
        self.warmup_iters = int(warmup_iters)
        self.adapter_warmup_iters = int(adapter_warmup_iters)
        self.region_normalize = check_region_normalize(region_normalize)
        self.region_params = region_params
        self.vis_period = vis_period
        self.feature_norm = check_feature_norm(feature_norm)
        # Not registered: kept out of state_dict, parameters(), the optimizer and DDP.
        self.__dict__["teacher"] = teacher
        self.teacher_cfg = teacher_cfg
        self.student_input_format = _input_format(student_input_format, student_cfg)
        self.teacher_input_format = _input_format(teacher_input_format, teacher_cfg)
        self.student_probe: Optional[DetectorProbe] = None
        self.teacher_probe: Optional[DetectorProbe] = None
        self.in_features: List[str] = []
        if mode != "none":
            if teacher is None:
                raise ValueError(f"TID.MODE {mode!r} needs a teacher (TID.TEACHER.*)")
            self.student_probe = build_probe(student, student_cfg, tid_cfg)
            self.teacher_probe = build_probe(teacher, teacher_cfg, tid_cfg)
            self.in_features = self._check_pairing(list(in_features))
            s_shapes = student.backbone.output_shape()
            t_shapes = teacher.backbone.output_shape()
            t_channels = {f: t_shapes[f].channels for f in self.in_features}
            self.tid_adapters = FeatureAdapters(
                {f: s_shapes[f].channels for f in self.in_features},
                t_channels,
                adapter_mode,
                adapter_init,
                adapter_train,
            )
            # the imitation method; its modules (FGD's GcBlocks) are saved under "tid_loss."
            self.tid_loss = build_imitation(mode, self.feature_norm, t_channels, fgd_params)
            self._teacher_flip = self._check_formats(
                self.student_input_format, self.teacher_input_format
            )
            self.tid_adapters.to(self.device)
            self.tid_loss.to(self.device)
        self.teacher_cache = self._build_teacher_cache(float(teacher_cache_mb))
        self._cache_hit_rate = 0.0
        self.register_state_dict_post_hook(_strip_student_prefix)
        self.register_load_state_dict_pre_hook(_add_student_prefix)

    @classmethod
    def from_config(cls, cfg):
        validate_tid_cfg(cfg)
        scfg = student_cfg_from(cfg)
        student = build_model(scfg)
        teacher, tcfg = (None, None) if cfg.TID.MODE == "none" else build_teacher(cfg)
        return {
            "student": student,
            "student_cfg": scfg,
            "teacher": teacher,
            "teacher_cfg": tcfg,
            **distiller_kwargs(cfg),
        }

    def _build_teacher_cache(self, max_mb: float) -> Optional[TeacherOutputCache]:
        if max_mb < 0:
            raise ValueError(f"TID.TEACHER.CACHE_MB must be >= 0 (0 = off), got {max_mb:g}")
        if max_mb == 0 or self.mode == "none":
            return None
        if not self.teacher_probe.cacheable:
            raise ValueError(
                f"TID.TEACHER.CACHE_MB {max_mb:g}: a {self.teacher_probe.family} teacher's outputs "
                "depend on more than the image (Faster R-CNN's ROI head scores the student's boxes, "
                "which change every step), so they cannot be cached; set TID.TEACHER.CACHE_MB 0"
            )
        return TeacherOutputCache(max_mb)

    # ------------------------------------------------------------------------- set-up checks
    def _check_pairing(self, in_features: List[str]) -> List[str]:
        s_probe, t_probe = self.student_probe, self.teacher_probe
        n_s, n_t = s_probe.num_classes(), t_probe.num_classes()
        if n_s != n_t:
            raise ValueError(
                f"teacher and student detect different numbers of classes ({n_t} vs {n_s}): "
                "distil between detectors trained on the same classes (check NUM_CLASSES in both "
                "configs)."
            )
        if not in_features:
            in_features = s_probe.head_levels
        s_shapes = self.student.backbone.output_shape()
        t_shapes = self.teacher.backbone.output_shape()
        for level in in_features:
            for who, shapes in (("student", s_shapes), ("teacher", t_shapes)):
                if level not in shapes:
                    raise ValueError(
                        f"TID.IN_FEATURES level '{level}' is not an output of the {who}'s backbone "
                        f"(it has {sorted(shapes)})."
                    )
            if s_shapes[level].stride != t_shapes[level].stride:
                raise ValueError(
                    f"level '{level}' has stride {s_shapes[level].stride} in the student but "
                    f"{t_shapes[level].stride} in the teacher: paired levels must have the same "
                    "stride (check the FPN/backbone of both configs or TID.IN_FEATURES)."
                )
            if self.mode in _SIG_MODES:
                for who, probe in (("student", s_probe), ("teacher", t_probe)):
                    if level not in probe.head_levels:
                        raise ValueError(
                            f"level '{level}' is distilled but the {who}'s detection head does "
                            f"not read it (its heads read {probe.head_levels}), so it has no "
                            "significance there; remove it from TID.IN_FEATURES."
                        )
        sdiv = self.student.backbone.size_divisibility
        tdiv = self.teacher.backbone.size_divisibility
        if sdiv and tdiv and sdiv % tdiv:
            raise ValueError(
                f"the teacher's backbone needs inputs padded to multiples of {tdiv}, the student's "
                f"pads to {sdiv}; use backbones whose size_divisibility divides the student's."
            )
        return list(in_features)

    @staticmethod
    def _check_formats(student_format: str, teacher_format: str) -> bool:
        if student_format == teacher_format:
            return False
        if {student_format, teacher_format} == {"RGB", "BGR"}:
            return True
        raise ValueError(
            f"the student reads {student_format} images and the teacher {teacher_format}; only "
            "RGB <-> BGR can be converted."
        )

    # ------------------------------------------------------------------------- module plumbing
    @property
    def device(self) -> torch.device:
        return self.student.device

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BN statistics and dropout stay in eval mode
        return self

    # ------------------------------------------------------------------------- forward
    def forward(self, batched_inputs: List[Dict]):
        """detectron2 model interface: losses in training, the student's outputs in eval."""
        if not self.training or self.mode == "none":
            try:
                return self.student(batched_inputs)
            finally:
                self._clear()
        try:
            losses = self.student(batched_inputs)
            losses.update(self._distill(batched_inputs))
            return losses
        finally:
            self._clear()

    def _clear(self):
        for probe in (self.student_probe, self.teacher_probe):
            if probe is not None:
                probe.clear()

    def _teacher_images(self, batched_inputs, padded_hw: Tuple[int, int]):
        """Raw images -> the teacher's format and normalisation, padded like the student's."""
        from detectron2.structures import ImageList

        t = self.teacher
        h, w = padded_hw
        batch = torch.zeros(len(batched_inputs), 3, h, w, device=self.device)
        sizes = []
        for i, x in enumerate(batched_inputs):
            img = x["image"].to(self.device).float()
            if self._teacher_flip:
                img = img.flip(0)
            img = (img - t.pixel_mean) / t.pixel_std
            batch[i, :, : img.shape[1], : img.shape[2]] = img
            sizes.append(tuple(img.shape[1:]))
        return ImageList(batch, sizes)

    def lambda_now(self, iteration: int) -> float:
        """lambda after the linear warm-up."""
        if self.warmup_iters <= 0:
            return self.loss_weight
        return self.loss_weight * min(1.0, (iteration + 1) / self.warmup_iters)

    def _distill(self, batched_inputs) -> Dict[str, torch.Tensor]:
        storage = _storage()
        iteration = storage.iter if storage is not None else 0
        s_feats = self.student_probe.features
        finite = torch.stack([torch.isfinite(s_feats[lv]).all() for lv in self.in_features])
        if not bool(finite.all()):  # one host sync for all levels
            level = self.in_features[int((~finite).nonzero()[0])]
            raise FloatingPointError(
                f"student FPN feature '{level}' has NaN/Inf at iteration {iteration}: the "
                "student diverged (lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS) or an "
                "input image has NaN/Inf. Raised before the optimizer step: weights unchanged."
            )
        maps = self._maps(batched_inputs)
        lam = self.lambda_now(iteration)
        losses = {}
        per_level = [maps["regions"][level] for level in self.in_features]
        counts = region_counts(per_level, self.region_normalize, comm.get_world_size())
        adapters_only = iteration < self.adapter_warmup_iters
        for level, regions, count in zip(self.in_features, per_level, counts):
            student = s_feats[level].detach() if adapters_only else s_feats[level]
            inputs = LevelInputs(
                valid=maps["valid"][level],
                regions=regions,
                counts=count,
                gt_boxes=maps["gt_boxes"],
                gt_batch_idx=maps["gt_batch_idx"],
                stride=maps["strides"][level],
            )
            level_losses = self.tid_loss(
                level, self.tid_adapters(level, student), maps["teacher_features"][level], inputs
            )
            losses.update({name: lam * loss for name, loss in level_losses.items()})
        method_scalars = self.tid_loss.pop_log()  # every step, so nothing accumulates
        if storage is not None:
            self._log(storage, maps, lam, batched_inputs, method_scalars)
        return losses

    @torch.no_grad()
    def _maps(self, batched_inputs) -> Dict:
        """Teacher forward, significance and regions for the student forward that just ran.

        Returns a dict with, per distilled level: "teacher_features" (N, C_T, H, W),
        "valid" (N, H, W) bool, "regions" [(name, (N, H, W) bool, alpha)], and "sig_teacher" /
        "sig_student" (N, H, W) fp32 (None in modes without significance).
        """
        padded = tuple(self.student_probe.captured["input_shape"][-2:])
        images = self._teacher_images(batched_inputs, padded)
        if self.teacher_cache is None:
            self.teacher_probe.run(images, self.student_probe.roi_boxes())
        else:
            keys = [self.teacher_cache.key(x["image"], padded) for x in batched_inputs]
            self._cache_hit_rate = run_teacher_cached(
                self.teacher_probe, self.teacher_cache, images, keys
            )
        return self._maps_from_captured(batched_inputs)

    @torch.no_grad()
    def _maps_from_captured(self, batched_inputs) -> Dict:
        """:meth:`_maps` once both models' forwards have run (significance, regions only)."""
        s_feats = self.student_probe.features
        image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        gt_boxes = torch.cat([g.gt_boxes.tensor for g in gt])
        gt_batch_idx = torch.cat(
            [
                torch.full((len(g),), i, dtype=torch.long, device=self.device)
                for i, g in enumerate(gt)
            ]
        )
        sig_t = sig_s = None
        if self.mode in _SIG_MODES:
            sig_t = self.teacher_probe.significance(gt, image_sizes)
            sig_s = self.student_probe.significance(gt, image_sizes)
        valid, regions, strides = {}, {}, {}
        shapes = self.student.backbone.output_shape()
        for level in self.in_features:
            _, _, h, w = s_feats[level].shape
            strides[level] = stride = shapes[level].stride
            valid[level] = valid_mask(image_sizes, (h, w), stride, self.device)
            regions[level] = self._regions(
                level, valid[level], sig_t, sig_s, gt_boxes, gt_batch_idx, stride
            )
        return {
            "teacher_features": self.teacher_probe.features,
            "valid": valid,
            "regions": regions,
            "strides": strides,
            "gt_boxes": gt_boxes,
            "gt_batch_idx": gt_batch_idx,
            "sig_teacher": sig_t,
            "sig_student": sig_s,
        }

    @torch.no_grad()
    def inspect(self, batched_inputs: List[Dict]) -> Dict:
        """Significance and regions of a batch for pictures and debugging (no training).

        Runs the student's training-mode forward (so that two-stage students sample their ROI
        boxes as in training) with every normalisation layer in eval mode and no gradients, and
        returns :meth:`_maps` without the teacher features. Inputs need "instances".
        """
        if self.mode == "none":
            raise ValueError("TID.MODE none has no teacher: nothing to inspect")
        was_training = self.training
        self.train()
        for m in self.student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        try:
            with _storage_or_new():
                self.student(batched_inputs)
                maps = self._maps(batched_inputs)
            maps.pop("teacher_features")
            return maps
        finally:
            self._clear()
            self.train(was_training)

    def _regions(self, level, valid, sig_t, sig_s, gt_boxes, gt_batch_idx, stride):
        """[(name, (N, H, W) bool mask, alpha)] of one level for the current mode (for PKD and
        FGD, which weight locations themselves, the areas their loss sees, for the logs)."""
        if self.mode in ("fitnet", "pkd"):
            return uniform_regions(valid)
        if self.mode == "fgd":
            fg = fgd_masks(gt_boxes, gt_batch_idx, valid, stride)[0] > 0
            return [("fg", fg, 1.0), ("bg", valid & ~fg, 1.0)]
        if self.mode == "gt_mask":
            ones = torch.ones(len(gt_boxes), device=self.device)
            inside = paint_boxes(gt_boxes, ones, gt_batch_idx, valid.shape, stride)
            return gt_mask_regions(inside > 0, valid, self.region_params)
        return ldam_regions(
            sig_t[level], sig_s[level], valid, self.region_params, use_weak=self.mode != "no_ldam"
        )

    @torch.no_grad()
    def _log(self, storage, maps, lam, batched_inputs, method_scalars=None):
        """Region shares, mean significance and (every vis_period) pictures into the storage."""
        valid, regions = maps["valid"], maps["regions"]
        # every statistic summed on the device and read back at once: one host sync per step
        names = list(dict.fromkeys(name for regs in regions.values() for name, _, _ in regs))
        sums = [torch.stack([v.sum() for v in valid.values()]).sum().float()]
        for name in names:
            masks = [m for regs in regions.values() for n, m, _ in regs if n == name]
            sums.append(torch.stack([m.sum() for m in masks]).sum().float())
        sig_t, sig_s = maps["sig_teacher"], maps["sig_student"]
        whos = [] if sig_t is None else [("teacher", sig_t), ("student", sig_s)]
        for _who, sig in whos:
            sums.append(torch.stack([(sig[lv] * valid[lv]).sum() for lv in self.in_features]).sum())
        total, *values = torch.stack(sums).tolist()
        total = max(total, 1.0)
        scalars = {f"tid/{name}_share": v / total for name, v in zip(names, values)}
        scalars["tid/lambda"] = lam
        scalars.update(method_scalars or {})
        if self.teacher_cache is not None:
            scalars["tid/teacher_cache_hits"] = self._cache_hit_rate  # share of the batch
        for (who, _sig), v in zip(whos, values[len(names) :]):
            scalars[f"tid/sig_{who}_mean"] = v / total
        storage.put_scalars(**scalars, smoothing_hint=True)
        if self.vis_period > 0 and storage.iter % self.vis_period == 0:
            from ..visualization import significance_panel

            level = self.in_features[0]
            panel = significance_panel(
                batched_inputs[0],
                self.student_input_format,
                level,
                sig_t[level][0] if sig_t is not None else None,
                sig_s[level][0] if sig_s is not None else None,
                [(name, m[0]) for name, m, _ in regions[level]],
            )
            image = torch.from_numpy(panel).permute(2, 0, 1).float() / 255.0
            storage.put_image(f"tid/significance_{level}", image)


def _input_format(given: Optional[str], cfg) -> str:
    """``given``, else ``cfg.INPUT.FORMAT``, else detectron2's default "BGR" (no config)."""
    if given:
        return given
    return cfg.INPUT.FORMAT if cfg is not None else "BGR"


def _storage():
    try:
        return get_event_storage()
    except AssertionError:  # called outside a trainer (tests, tools)
        return None


def _storage_or_new():
    """The current EventStorage context, or a throw-away one (detectron2 heads log into one)."""
    import contextlib

    return contextlib.nullcontext() if _storage() is not None else EventStorage(0)


def _strip_student_prefix(module, state_dict, prefix, local_metadata):
    """state_dict post-hook: ``student.x`` -> ``x`` so a plain student model loads it as is."""
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix + _STUDENT):
            key = prefix + key[len(prefix) + len(_STUDENT) :]
        state_dict[key] = value
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k.startswith(prefix + _STUDENT)]:
            meta[prefix + key[len(prefix) + len(_STUDENT) :]] = meta.pop(key)


def _add_student_prefix(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
):
    """load_state_dict pre-hook: plain student keys (and old ``student.`` keys) both load."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.startswith(_STUDENT) or is_distiller_key(rest):
            continue
        state_dict[prefix + _STUDENT + rest] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k.startswith(prefix) and len(k) > len(prefix)]:
            rest = key[len(prefix) :]
            if not rest.startswith(_STUDENT) and not is_distiller_key(rest):
                meta[prefix + _STUDENT + rest] = meta[key]
