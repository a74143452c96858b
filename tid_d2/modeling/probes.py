"""Probes: forward hooks on a detectron2 detector that capture what significance needs, and the
per-family code that turns the captured head outputs into per-location significance maps.

A probe never changes the detector's forward: for the student, the hooks fire during its ordinary
training forward (its losses are computed by detectron2 unmodified); for the teacher,
:meth:`DetectorProbe.run` calls the same modules (backbone, heads) under ``no_grad``, and the
same hooks fire.

Supporting a new detector family = one subclass of :class:`DetectorProbe` that
1. registers hooks on the modules that produce its head outputs (``_attach``),
2. says which FPN levels its head reads (``head_levels``),
3. runs those modules for the teacher (``run``),
4. turns the captured outputs into ``{level: (N, H, W) significance}`` (``significance``),
and registers itself with ``@PROBE_REGISTRY.register()`` under the meta-architecture's class
name. Subclasses of a registered meta-architecture find their parent's probe.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.registry import Registry

from .significance import SigParams, match_to_gt, paint_boxes, significance

__all__ = ["PROBE_REGISTRY", "DetectorProbe", "build_probe", "sig_params_for"]

PROBE_REGISTRY = Registry("TID_PROBE")
PROBE_REGISTRY.__doc__ = """
Significance probes, keyed by the name of the meta-architecture class they support.
"""


def sig_params_for(tid_cfg, iou_thresholds: Tuple[float, float]) -> SigParams:
    """SigParams of one model: its own IoU thresholds unless TID.SIG.IOU_THRESHOLDS overrides."""
    sig = tid_cfg.TID.SIG
    if len(sig.IOU_THRESHOLDS) > 0:
        if len(sig.IOU_THRESHOLDS) != 2:
            raise ValueError(
                f"TID.SIG.IOU_THRESHOLDS must be empty or (t_neg, t_pos), got {sig.IOU_THRESHOLDS}"
            )
        iou_thresholds = tuple(sig.IOU_THRESHOLDS)
    mode = tid_cfg.TID.MODE
    return SigParams(
        iou_thresholds=tuple(float(t) for t in iou_thresholds),
        cls_thresholds=tuple(float(t) for t in sig.CLS_THRESHOLDS),
        values=tuple(float(v) for v in sig.SCORE_VALUES),
        use_cls=mode != "reg_only",
        use_reg=mode != "cls_only",
        ablated_score=float(sig.ABLATED_SCORE),
    )


def _two_thresholds(thresholds, single_neg: float) -> Tuple[float, float]:
    """(t_neg, t_pos) from a matcher's threshold list: [t] -> (single_neg, t); [a, b] -> (a, b)."""
    thresholds = list(thresholds)
    if len(thresholds) == 1:
        return (min(single_neg, thresholds[0]), thresholds[0])
    return (thresholds[0], thresholds[-1])


def _matcher_thresholds(matcher) -> List[float]:
    """The IoU thresholds of a detectron2 ``Matcher``, which stores ``[-inf, t1, ..., inf]``:
    ``[t1, ...]``, what the yacs ``*.IOU_THRESHOLDS`` key held (models built without one)."""
    return [float(t) for t in matcher.thresholds[1:-1]]


class DetectorProbe:
    """Base class. ``captured`` holds the tensors the hooks saw during the last forward.

    ``model_cfg`` is the model's yacs config, or None for a model built without one (LazyConfig):
    its matchers' IoU thresholds are then read from the modules."""

    def __init__(self, model: torch.nn.Module, model_cfg, tid_cfg):
        self.model = model
        self.model_cfg = model_cfg
        self.tid_cfg = tid_cfg
        self.captured: Dict[str, object] = {}
        self._handles = []

        def on_backbone(_module, inputs, out):
            self.captured["input_shape"] = tuple(inputs[0].shape)  # (N, 3, H_pad, W_pad)
            self.captured["features"] = out

        self._handles.append(model.backbone.register_forward_hook(on_backbone))
        self._attach()

    # ----------------------------------------------------------------------------- hooks
    def _hook(self, module: torch.nn.Module, key: str, output: bool = True):
        def fn(_module, inputs, out):
            self.captured[key] = out if output else inputs

        self._handles.append(module.register_forward_hook(fn))

    def _attach(self):
        raise NotImplementedError

    def clear(self):
        """Drop references to captured tensors (call after every step)."""
        self.captured.clear()

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    # ----------------------------------------------------------------------------- API
    @property
    def head_levels(self) -> List[str]:
        """FPN levels that the detector's heads read, finest first."""
        raise NotImplementedError

    @property
    def features(self) -> Dict[str, torch.Tensor]:
        """Backbone (FPN) outputs of the last forward: {level: (N, C, H, W)}."""
        if "features" not in self.captured:
            raise RuntimeError("the probe captured no backbone features in this step")
        return self.captured["features"]

    def roi_boxes(self) -> Optional[List[Boxes]]:
        """Boxes the ROI head scored in the last forward (None for dense detectors)."""
        return None

    @torch.no_grad()
    def run(self, images: ImageList, roi_boxes: Optional[List[Boxes]] = None):
        """Teacher side: run backbone and heads (not the losses) so that the hooks fire."""
        raise NotImplementedError

    #: whether a teacher of this family may have its outputs cached per image
    #: (:mod:`.teacher_cache`): only when they depend on nothing but the image
    cacheable = False

    def cached_outputs(self):
        """What :meth:`significance` and the imitation read from the last :meth:`run`, as a
        structure of batched tensors (dim 0 = image) for :mod:`.teacher_cache`."""
        raise NotImplementedError(f"{type(self).__name__} outputs cannot be cached")

    def restore_outputs(self, outputs, input_shape: Tuple[int, ...]):
        """Put :meth:`cached_outputs` of a batch back into ``captured`` as if :meth:`run` had
        run on it (``input_shape``: the batch's (N, 3, H_pad, W_pad))."""
        raise NotImplementedError(f"{type(self).__name__} outputs cannot be cached")

    @torch.no_grad()
    def significance(
        self, gt_instances: List[Instances], image_sizes: List[Tuple[int, int]]
    ) -> Dict[str, torch.Tensor]:
        """{level: (N, H, W) fp32 Sig} from the captured head outputs."""
        raise NotImplementedError

    def num_classes(self) -> int:
        raise NotImplementedError


def _gt_lists(gt_instances: List[Instances]):
    return [g.gt_boxes.tensor for g in gt_instances], [g.gt_classes for g in gt_instances]


def _dense_significance(
    levels: List[str],
    features: Dict[str, torch.Tensor],
    anchors: List[Boxes],
    box_deltas: List[torch.Tensor],
    probs: List[torch.Tensor],
    box2box_transform,
    gt_instances: List[Instances],
    params: SigParams,
    class_agnostic: bool = False,
    gt_iou_thresholds: Optional[List[torch.Tensor]] = None,
    adaptive_neg_factor: float = 0.8,
) -> Dict[str, torch.Tensor]:
    """Significance of a dense head; each location keeps the max over its anchors.

    Args:
        anchors: per level, Boxes of (H*W*A, 4), detectron2's (H, W, A) order.
        box_deltas: per level, (N, A*4, H, W) raw regression outputs (decoded by
            ``box2box_transform.apply_deltas`` against the anchors).
        probs: per level, (N, H*W*A, C) probabilities (sigmoid heads; C = 1 for objectness).
        class_agnostic: match every GT as class 0 (the RPN).
        gt_iou_thresholds: per image, (G_i,) an IoU threshold per GT box (ATSS's adaptive mean +
            std): a prediction's t_pos is that of the GT its box overlaps most, its t_neg
            ``adaptive_neg_factor`` x t_pos; None = ``params.iou_thresholds`` everywhere.
    Returns:
        {level: (N, H, W)}.
    """
    gt_boxes, gt_classes = _gt_lists(gt_instances)
    if class_agnostic:
        gt_classes = [torch.zeros_like(c) for c in gt_classes]
    # all levels at once: one GT matching and one scoring per batch, split back per level
    d = torch.cat([permute_to_N_HWA_K(x.float(), 4) for x in box_deltas], dim=1)  # (N, M, 4)
    n, m = d.shape[:2]
    anc = torch.cat([a.tensor.float() for a in anchors])  # (M, 4)
    boxes = box2box_transform.apply_deltas(d.reshape(-1, 4), anc.repeat(n, 1)).view(n, m, 4)
    iou, cls, idx = match_to_gt(list(boxes.unbind(0)), gt_boxes, gt_classes, return_index=True)
    prob = torch.cat([p.float() for p in probs], dim=1)
    thresholds = None
    if gt_iou_thresholds is not None:
        thresholds = _matched_thresholds(torch.stack(idx), gt_iou_thresholds, adaptive_neg_factor)
    sig = significance(torch.stack(iou), prob, torch.stack(cls), params, "sigmoid", thresholds)
    out = {}
    for level, sig_level in zip(levels, sig.split([len(a) for a in anchors], dim=1)):
        _, _, h, w = features[level].shape
        out[level] = sig_level.reshape(n, h, w, -1).amax(dim=-1)
    return out


def _matched_thresholds(
    matched_index: torch.Tensor, gt_iou_thresholds: List[torch.Tensor], neg_factor: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-prediction (t_neg, t_pos), each (N, M) fp32, from the matched GT's threshold.

    Args:
        matched_index: (N, M) int64 index of each prediction's best GT in its image, -1 if none.
        gt_iou_thresholds: per image, (G_i,) thresholds.
        neg_factor: t_neg = neg_factor x t_pos.
    A prediction in an image without GT gets t_pos = 1 (its IoU is 0: the low tier anyway).
    """
    from torch.nn.utils.rnn import pad_sequence

    table = pad_sequence(
        [t.float().clamp(0.0, 1.0) for t in gt_iou_thresholds], batch_first=True, padding_value=1.0
    )  # (N, G_max)
    table = torch.cat([table, table.new_ones(table.shape[0], 1)], dim=1)  # last column: no GT
    no_gt = torch.full_like(matched_index, table.shape[1] - 1)
    col = torch.where(matched_index >= 0, matched_index, no_gt)
    t_pos = table.gather(1, col)
    return neg_factor * t_pos, t_pos


@PROBE_REGISTRY.register()
class RetinaNetProbe(DetectorProbe):
    """RetinaNet: sigmoid class scores per anchor, anchors decoded by the model's transform."""

    family = "RetinaNet"

    def _attach(self):
        self._hook(self.model.head, "head")
        self._hook(self.model.anchor_generator, "anchors")

    @property
    def head_levels(self):
        return list(self.model.head_in_features)

    def num_classes(self):
        return self.model.num_classes

    def default_iou_thresholds(self):
        if self.model_cfg is None:
            return _two_thresholds(_matcher_thresholds(self.model.anchor_matcher), 0.0)
        return _two_thresholds(self.model_cfg.MODEL.RETINANET.IOU_THRESHOLDS, 0.0)

    @torch.no_grad()
    def run(self, images, roi_boxes=None):
        feats = self.model.backbone(images.tensor)
        head_in = [feats[f] for f in self.head_levels]
        self.model.head(head_in)
        self.model.anchor_generator(head_in)

    # a dense head's outputs at a location depend only on the image: cacheable per image
    cacheable = True

    def cached_outputs(self):
        """{"features": {level: (N, C, H, W)}, "head": the head's output (lists of (N, K, H, W)
        per level)}; the anchors depend only on the feature sizes and are regenerated."""
        return {"features": dict(self.captured["features"]), "head": self.captured["head"]}

    def restore_outputs(self, outputs, input_shape):
        self.captured["input_shape"] = tuple(input_shape)
        self.captured["features"] = outputs["features"]
        self.captured["head"] = outputs["head"]
        self.model.anchor_generator([outputs["features"][f] for f in self.head_levels])

    def _probs(self, head_out) -> List[torch.Tensor]:
        k = self.model.num_classes
        return [permute_to_N_HWA_K(x.float(), k).sigmoid() for x in head_out[0]]

    @torch.no_grad()
    def significance(self, gt_instances, image_sizes):
        head_out = self.captured["head"]
        params = sig_params_for(self.tid_cfg, self.default_iou_thresholds())
        return _dense_significance(
            self.head_levels,
            self.features,
            self.captured["anchors"],
            head_out[1],
            self._probs(head_out),
            self.model.box2box_transform,
            gt_instances,
            params,
        )


@PROBE_REGISTRY.register()
class FCOSProbe(RetinaNetProbe):
    """FCOS: one point per location; q uses sqrt(sigmoid(cls) * sigmoid(ctrness)) because
    detectron2's FCOS inference scores detections that way."""

    family = "FCOS"

    def default_iou_thresholds(self):
        return tuple(self.tid_cfg.TID.SIG.ANCHOR_FREE_IOU_THRESHOLDS)

    def _probs(self, head_out):
        k = self.model.num_classes
        return [
            torch.sqrt(
                permute_to_N_HWA_K(cls.float(), k).sigmoid()
                * permute_to_N_HWA_K(ctr.float(), 1).sigmoid()
            )
            for cls, ctr in zip(head_out[0], head_out[2])
        ]


@PROBE_REGISTRY.register()
class ATSSProbe(RetinaNetProbe):
    """ATSS (tid_d2/modeling/atss.py): one square anchor per location; q from
    sigmoid(cls) x sigmoid(centerness), the score its inference ranks detections by.

    Score_r follows the detector's own positive rule, ATSS's adaptive IoU threshold, by default
    (``TID.SIG.IOU_RULE adaptive``): t_pos of a location = the mean + std threshold that the ATSS
    assignment computes for the GT its predicted box overlaps most (from the same anchors and
    GT boxes as the detector's training), t_neg = ``TID.SIG.ADAPTIVE_NEG_FACTOR`` x t_pos (ATSS
    has no ignore band; docs/method.md). ``TID.SIG.IOU_RULE fixed`` uses
    ``TID.SIG.ANCHOR_FREE_IOU_THRESHOLDS`` instead; ``TID.SIG.IOU_THRESHOLDS`` overrides both.
    """

    family = "ATSS"

    def default_iou_thresholds(self):
        return tuple(self.tid_cfg.TID.SIG.ANCHOR_FREE_IOU_THRESHOLDS)

    def _probs(self, head_out):
        k = self.model.num_classes
        return [
            permute_to_N_HWA_K(cls.float(), k).sigmoid()
            * permute_to_N_HWA_K(ctr.float(), 1).sigmoid()
            for cls, ctr in zip(head_out[0], head_out[2])
        ]

    def _box_outputs(self, head_out) -> List[torch.Tensor]:
        """Per level, (N, 4, H, W) outputs that ``model.box2box_transform`` decodes."""
        return head_out[1]

    def adaptive_thresholds(self, gt_instances) -> Optional[List[torch.Tensor]]:
        """Per image, (G_i,) ATSS thresholds of its GT boxes; None when the fixed rule is set."""
        sig = self.tid_cfg.TID.SIG
        if sig.IOU_RULE == "fixed" or len(sig.IOU_THRESHOLDS) > 0:
            return None
        from .atss import assign_batch

        assignments = assign_batch(self.captured["anchors"], gt_instances, self.model.topk)
        return [a.gt_iou_thresholds for a in assignments]

    @torch.no_grad()
    def significance(self, gt_instances, image_sizes):
        head_out = self.captured["head"]
        return _dense_significance(
            self.head_levels,
            self.features,
            self.captured["anchors"],
            self._box_outputs(head_out),
            self._probs(head_out),
            self.model.box2box_transform,
            gt_instances,
            sig_params_for(self.tid_cfg, self.default_iou_thresholds()),
            gt_iou_thresholds=self.adaptive_thresholds(gt_instances),
            adaptive_neg_factor=float(self.tid_cfg.TID.SIG.ADAPTIVE_NEG_FACTOR),
        )


@PROBE_REGISTRY.register()
class GFLProbe(ATSSProbe):
    """GFL (tid_d2/modeling/gfl.py): the predicted box of a location is the integral of its side
    distributions (the expectation over 0..REG_MAX strides); q = sigmoid(cls), GFL's joint
    classification-quality score, which its inference ranks by. Score_r as ATSS (same
    assignment)."""

    family = "GFL"

    def _probs(self, head_out):
        k = self.model.num_classes
        return [permute_to_N_HWA_K(cls.float(), k).sigmoid() for cls in head_out[0]]

    def _box_outputs(self, head_out):
        """Per level, (N, 4, H, W) pixel distances (l, t, r, b) from the anchor centres."""
        out = []
        for logits, stride in zip(head_out[1], self.model.strides):
            dist = self.model.decode_distances(logits.float().permute(0, 2, 3, 1), stride)
            out.append(dist.permute(0, 3, 1, 2))
        return out


@PROBE_REGISTRY.register()
class GeneralizedRCNNProbe(DetectorProbe):
    """Faster R-CNN: RPN maps per level (class-agnostic) + ROI-head box scores painted onto the
    level that the ROIPooler assigns each box to; a level keeps the max of both."""

    family = "GeneralizedRCNN"

    def _attach(self):
        rpn = self.model.proposal_generator
        roi = self.model.roi_heads
        if rpn is None or not hasattr(roi, "box_pooler"):
            raise ValueError(
                "TID supports GeneralizedRCNN with an RPN and StandardROIHeads-style box heads "
                "(box_pooler / box_head / box_predictor)."
            )
        self._hook(rpn.rpn_head, "rpn")
        self._hook(rpn.anchor_generator, "anchors")
        self._hook(roi.box_pooler, "roi_in", output=False)
        self._hook(roi.box_predictor, "roi_out")

    @property
    def head_levels(self):
        levels = list(self.model.proposal_generator.in_features)
        levels += [f for f in self.model.roi_heads.box_in_features if f not in levels]
        return levels

    def num_classes(self):
        return self.model.roi_heads.num_classes

    def roi_boxes(self):
        if "roi_in" not in self.captured:
            return None
        return self.captured["roi_in"][1]

    @torch.no_grad()
    def run(self, images, roi_boxes=None):
        feats = self.model.backbone(images.tensor)
        rpn = self.model.proposal_generator
        rpn_in = [feats[f] for f in rpn.in_features]
        rpn.rpn_head(rpn_in)
        rpn.anchor_generator(rpn_in)
        if roi_boxes is not None:
            roi = self.model.roi_heads
            x = roi.box_pooler([feats[f] for f in roi.box_in_features], roi_boxes)
            roi.box_predictor(roi.box_head(x))

    @torch.no_grad()
    def significance(self, gt_instances, image_sizes):
        cfg = self.model_cfg
        rpn = self.model.proposal_generator
        logits, deltas = self.captured["rpn"]
        rpn_thresholds = (
            cfg.MODEL.RPN.IOU_THRESHOLDS
            if cfg is not None
            else _matcher_thresholds(rpn.anchor_matcher)
        )
        rpn_params = sig_params_for(self.tid_cfg, _two_thresholds(rpn_thresholds, 0.0))
        probs = [permute_to_N_HWA_K(x.float(), 1).sigmoid() for x in logits]
        out = _dense_significance(
            list(rpn.in_features),
            self.features,
            self.captured["anchors"],
            deltas,
            probs,
            rpn.box2box_transform,
            gt_instances,
            rpn_params,
            class_agnostic=True,
        )
        if "roi_out" in self.captured:
            for level, roi_map in self._roi_maps(gt_instances).items():
                out[level] = torch.maximum(out[level], roi_map) if level in out else roi_map
        return out

    @torch.no_grad()
    def _roi_maps(self, gt_instances) -> Dict[str, torch.Tensor]:
        """Score the boxes the ROI head saw and paint them onto their pooler level."""
        cfg = self.model_cfg
        roi = self.model.roi_heads
        predictor = roi.box_predictor
        box_lists: List[Boxes] = self.captured["roi_in"][1]
        scores, deltas = self.captured["roi_out"][:2]
        proposals = Boxes.cat(box_lists).tensor.float()
        if proposals.shape[0] == 0:
            return {}
        k = predictor.num_classes
        probs = scores.float().sigmoid() if predictor.use_sigmoid_ce else scores.float().softmax(-1)
        boxes = predictor.box2box_transform.apply_deltas(deltas.float(), proposals)
        boxes = boxes.view(boxes.shape[0], -1, 4)
        if boxes.shape[1] > 1:  # class-specific regression: the box of the top foreground class
            top = probs[:, :k].argmax(dim=1)
            boxes = boxes[torch.arange(boxes.shape[0], device=boxes.device), top]
        else:
            boxes = boxes[:, 0]
        counts = [len(b) for b in box_lists]
        gt_boxes, gt_classes = _gt_lists(gt_instances)
        iou, cls = match_to_gt(list(boxes.split(counts)), gt_boxes, gt_classes)
        roi_thresholds = (
            cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS
            if cfg is not None
            else _matcher_thresholds(roi.proposal_matcher)
        )
        params = sig_params_for(
            self.tid_cfg,
            _two_thresholds(roi_thresholds, self.tid_cfg.TID.SIG.SINGLE_THRESHOLD_NEG),
        )
        sig = significance(torch.cat(iou), probs, torch.cat(cls), params, "softmax")
        pooler = roi.box_pooler
        level_idx = assign_boxes_to_levels(
            box_lists,
            pooler.min_level,
            pooler.max_level,
            pooler.canonical_box_size,
            pooler.canonical_level,
        )
        batch_idx = torch.cat(
            [
                torch.full((c,), i, dtype=torch.long, device=proposals.device)
                for i, c in enumerate(counts)
            ]
        )
        feats = self.features
        out = {}
        for li, level in enumerate(roi.box_in_features):
            sel = level_idx == li
            n, _, h, w = feats[level].shape
            stride = int(round(math.pow(2, pooler.min_level + li)))
            out[level] = paint_boxes(proposals[sel], sig[sel], batch_idx[sel], (n, h, w), stride)
        return out


def build_probe(model: torch.nn.Module, model_cfg, tid_cfg) -> DetectorProbe:
    """The probe registered for ``model``'s class or its nearest registered base class."""
    for klass in type(model).__mro__:
        name = klass.__name__ + "Probe"
        if name in PROBE_REGISTRY:
            return PROBE_REGISTRY.get(name)(model, model_cfg, tid_cfg)
    supported = ", ".join(sorted(k[: -len("Probe")] for k, _ in PROBE_REGISTRY))
    raise ValueError(
        f"TID has no significance probe for detector {type(model).__name__}; supported: "
        f"{supported}. Add a DetectorProbe subclass (see tid_d2/modeling/probes.py)."
    )
