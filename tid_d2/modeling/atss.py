"""ATSS (Zhang et al., CVPR 2020) as a yaml-configurable meta-architecture
(``MODEL.META_ARCHITECTURE: "ATSS"``); detectron2 ships none.

One square anchor per location (side ``MODEL.ATSS.ANCHOR_SCALE`` x stride, 8 by default: 64 px
on p3), assigned by :func:`tid_d2.modeling.atss_assigner.atss_assign`; a RetinaNet-style head
(classification and regression towers of ``NUM_CONVS`` 3x3 convs + GN + ReLU) with a centerness
conv on the regression tower and a learnable scale per level on the box deltas, which are
detectron2's ``Box2BoxTransform`` deltas with weights (10, 10, 5, 5) (mmdetection's
``DeltaXYWHBBoxCoder`` with stds (0.1, 0.1, 0.2, 0.2)).

Losses (mmdetection's ``ATSSHead``, ``mmdet/models/dense_heads/atss_head.py``, and
``configs/atss/atss_r50_fpn_1x_coco.py``), computed in fp32 with autocast off so AMP works:

* ``loss_atss_cls``: sigmoid focal loss (alpha 0.25, gamma 2) summed over every anchor and class,
  divided by the number of positives averaged over processes (at least 1);
* ``loss_atss_box``: GIoU loss of the decoded positive boxes, weight 2, each positive weighted by
  its centerness target, divided by the sum of those targets averaged over processes (at least 1);
* ``loss_atss_ctr``: binary cross-entropy of the positives' centerness, divided like the class loss.

Inference: score = sigmoid(class) * sigmoid(centerness) (mmdetection multiplies, no square
root), kept where sigmoid(class) > ``SCORE_THRESH_TEST`` (mmdetection thresholds before the
centerness factor), the ``TOPK_CANDIDATES_TEST`` best per level, per-class NMS at
``NMS_THRESH_TEST``, ``TEST.DETECTIONS_PER_IMAGE`` per image.

Keys: ``MODEL.ATSS.*`` (see :mod:`tid_d2.config`); the backbone from ``MODEL.BACKBONE.NAME``, e.g.
``build_retinanet_resnet_fpn_backbone`` (p3..p7).
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss, sigmoid_focal_loss_jit
from torch import Tensor, nn

from .atss_assigner import ATSSAssignment, atss_assign

__all__ = [
    "ATSS",
    "ATSSHead",
    "ATSSFamilyDetector",
    "ATSSFamilyHead",
    "Scale",
    "square_anchor_generator",
    "reduce_mean",
    "head_feature_shapes",
    "assign_batch",
    "matched_gt",
    "centerness_targets",
]


class Scale(nn.Module):
    """A learnable scalar (initially ``init``) multiplying its input."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ATSSFamilyHead(RetinaNetHead):
    """detectron2's RetinaNet head with one anchor per location, ``box_dim`` box outputs and a
    learnable :class:`Scale` per level on them: the towers that ATSS and GFL share.

    Subclasses add their own layers in :meth:`_build_extra_layers` (called before the scales are
    made, so the parameter order is: towers, class and box convs, extra layers, scales) and
    implement ``forward`` with :meth:`_forward_towers`.
    """

    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        conv_dims: List[int],
        box_dim: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ):
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            num_anchors=1,
            conv_dims=conv_dims,
            norm=norm,
            prior_prob=prior_prob,
        )
        if box_dim != 4:
            self.bbox_pred = nn.Conv2d(conv_dims[-1], box_dim, 3, stride=1, padding=1)
            nn.init.normal_(self.bbox_pred.weight, std=0.01)
            nn.init.constant_(self.bbox_pred.bias, 0.0)
        self._build_extra_layers(conv_dims[-1])
        self.scales = nn.ModuleList(Scale(1.0) for _ in input_shape)

    def _build_extra_layers(self, channels: int) -> None:
        """Layers on top of the ``channels``-wide towers besides the class and box convs."""

    def _forward_towers(
        self, features: List[Tensor]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level (N, C, Hi, Wi) features -> three lists over levels: class logits
        (N, K, Hi, Wi), scaled box outputs (N, box_dim, Hi, Wi) and the box tower's features
        (N, C, Hi, Wi)."""
        assert len(features) == self._num_features
        logits, boxes, box_features = [], [], []
        for feature, scale in zip(features, self.scales):
            logits.append(self.cls_score(self.cls_subnet(feature)))
            box_feature = self.bbox_subnet(feature)
            boxes.append(scale(self.bbox_pred(box_feature)))
            box_features.append(box_feature)
        return logits, boxes, box_features


class ATSSHead(ATSSFamilyHead):
    """detectron2's RetinaNet head with one anchor per location, a centerness conv on the
    regression tower and a learnable :class:`Scale` per level on the box deltas.

    ``forward(features)`` takes per level (N, C, Hi, Wi) and returns three lists over levels:
    class logits (N, K, Hi, Wi), box deltas (N, 4, Hi, Wi), centerness logits (N, 1, Hi, Wi).
    Constructed as :class:`ATSSFamilyHead` with the default ``box_dim`` 4.
    """

    def _build_extra_layers(self, channels: int) -> None:
        self.centerness = nn.Conv2d(channels, 1, kernel_size=3, stride=1, padding=1)
        nn.init.normal_(self.centerness.weight, std=0.01)
        nn.init.constant_(self.centerness.bias, 0.0)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        logits, deltas, box_features = self._forward_towers(features)
        return logits, deltas, [self.centerness(f) for f in box_features]


def square_anchor_generator(strides: Sequence[int], scale: float) -> DefaultAnchorGenerator:
    """One square anchor of side ``scale * stride`` per location, centred on ``(x, y) * stride``
    (offset 0, as mmdetection's AnchorGenerator)."""
    return DefaultAnchorGenerator(
        sizes=[[float(scale) * s] for s in strides],
        aspect_ratios=[[1.0]],
        strides=list(strides),
        offset=0.0,
    )


def reduce_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over the processes of the job (``x`` itself with one process)."""
    world_size = comm.get_world_size()
    if world_size > 1:
        x = x.detach().clone()
        torch.distributed.all_reduce(x.div_(world_size))
    return x


def head_feature_shapes(backbone: Backbone, in_features: List[str], key: str) -> List[ShapeSpec]:
    """The backbone's ShapeSpecs of ``in_features``, checked to exist and to be equally wide
    (``key`` names the config key in the errors)."""
    backbone_shape = backbone.output_shape()
    missing = [f for f in in_features if f not in backbone_shape]
    if missing:
        raise ValueError(
            f"{key} {missing} are not outputs of the backbone ({list(backbone_shape)})"
        )
    shapes = [backbone_shape[f] for f in in_features]
    channels = {s.channels for s in shapes}
    if len(channels) != 1:
        raise ValueError(f"{key}: the head needs features of equal width, got {sorted(channels)}")
    return shapes


@torch.no_grad()
def assign_batch(
    anchors: List[Boxes], gt_instances: List[Instances], topk: int
) -> List[ATSSAssignment]:
    """:func:`atss_assign` of every image of a batch; ``anchors`` per level, Boxes (Hi*Wi, 4)."""
    counts = [len(a) for a in anchors]
    all_anchors = Boxes.cat(anchors).tensor
    return [atss_assign(all_anchors, counts, i.gt_boxes.tensor, topk=topk) for i in gt_instances]


def matched_gt(
    assignments: List[ATSSAssignment], gt_instances: List[Instances], num_classes: int
) -> Tuple[Tensor, Tensor]:
    """Per-anchor training targets from the ATSS assignments of a batch of N images.

    Returns:
        labels: (N, R) int64, the matched GT's class, ``num_classes`` for background.
        boxes: (N, R, 4) fp32 XYXY, the matched GT's box (zeros for background).
    """
    labels, boxes = [], []
    for assignment, inst in zip(assignments, gt_instances):
        matched = assignment.matched_idxs
        if len(inst) > 0:
            index = matched.clamp(min=0)
            labels_i = torch.where(
                matched >= 0, inst.gt_classes[index], torch.full_like(matched, num_classes)
            )
            boxes_i = inst.gt_boxes.tensor.float()[index] * (matched >= 0)[:, None]
        else:
            labels_i = torch.full_like(matched, num_classes)
            boxes_i = matched.new_zeros((len(matched), 4), dtype=torch.float32)
        labels.append(labels_i)
        boxes.append(boxes_i)
    return torch.stack(labels), torch.stack(boxes)


class ATSSFamilyDetector(DenseDetector):
    """What ATSS and GFL share: square anchors (one per location, for the ATSS assignment), the
    assignment itself (:meth:`label_anchors`), the construction from ``cfg.MODEL.<NODE>``, the
    training and inference loops and the per-image top-k / NMS.

    A subclass sets ``config_node`` (the ``cfg.MODEL`` node) and ``head_class`` (an
    :class:`ATSSFamilyHead`), and implements :attr:`prediction_dims`, :meth:`losses` (called as
    ``losses(anchors, *predictions, assignments, gt_instances)`` with the transposed per-level
    predictions) and :meth:`image_predictions`.
    """

    config_node: str
    head_class: type

    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        num_classes: int,
        box2box_transform: Box2BoxTransform,
        anchor_scale: float = 8.0,
        topk: int = 9,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        max_detections_per_image: int = 100,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ):
        """
        Args:
            backbone, head, head_in_features, pixel_mean, pixel_std: as
                :class:`detectron2.modeling.meta_arch.dense_detector.DenseDetector`.
            num_classes: K, object classes.
            anchor_scale: anchor side in strides.
            topk: k of the ATSS assignment.
            box2box_transform: decodes the head's (per level, made by :meth:`image_predictions`)
                box outputs from the anchors.
            test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image:
                inference: candidates above the score threshold (see
                :meth:`candidate_score_thresh`), the ``test_topk_candidates`` best per level,
                per-class NMS at ``test_nms_thresh``, ``max_detections_per_image`` per image.
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.num_classes = num_classes
        shapes = backbone.output_shape()
        self.strides = [shapes[f].stride for f in self.head_in_features]
        self.anchor_generator = square_anchor_generator(self.strides, anchor_scale)
        self.box2box_transform = box2box_transform
        self.topk = topk
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def head_kwargs(cls, node) -> Dict[str, Any]:
        """Constructor arguments of ``head_class`` from ``cfg.MODEL.<config_node>`` besides
        input_shape, num_classes, conv_dims, norm and prior_prob."""
        return {}

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        """The shared constructor arguments from ``cfg.MODEL.<config_node>``,
        ``cfg.MODEL.BACKBONE`` and ``cfg.TEST``; subclasses add theirs.

        The towers have ``NUM_CONVS`` convs as wide as the backbone features of ``IN_FEATURES``,
        which must all have the same channels.
        """
        c = getattr(cfg.MODEL, cls.config_node)
        backbone = build_backbone(cfg)
        in_features = list(c.IN_FEATURES)
        shapes = head_feature_shapes(backbone, in_features, f"MODEL.{cls.config_node}.IN_FEATURES")
        head = cls.head_class(
            input_shape=shapes,
            num_classes=c.NUM_CLASSES,
            conv_dims=[shapes[0].channels] * c.NUM_CONVS,
            norm=c.HEAD_NORM,
            prior_prob=c.PRIOR_PROB,
            **cls.head_kwargs(c),
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "num_classes": c.NUM_CLASSES,
            "anchor_scale": c.ANCHOR_SCALE,
            "topk": c.TOPK,
            "test_score_thresh": c.SCORE_THRESH_TEST,
            "test_topk_candidates": c.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": c.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def prediction_dims(self) -> List[int]:
        """The channels of each of the head's outputs (per level (N, dim, Hi, Wi))."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        predictions = self._transpose_dense_predictions(predictions, self.prediction_dims)
        anchors = self.anchor_generator(features)
        assignments = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, *predictions, assignments, gt_instances)

    def label_anchors(
        self, anchors: List[Boxes], gt_instances: List[Instances]
    ) -> List[ATSSAssignment]:
        """The ATSS assignment of every image (anchors: per level, Boxes (Hi*Wi, 4))."""
        return assign_batch(anchors, gt_instances, self.topk)

    def positives(
        self, assignments: List[ATSSAssignment], gt_instances: List[Instances]
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The matched targets of a batch of N images (see :func:`matched_gt`), logging the
        number of positives per image as ``num_pos_anchors``.

        Returns:
            gt_labels: (N, R) int64, ``num_classes`` for background.
            gt_boxes: (N, R, 4) fp32 XYXY.
            pos: (N, R) bool, the positives.
            normalizer: () fp32, the number of positives averaged over processes, at least 1.
        """
        gt_labels, gt_boxes = matched_gt(assignments, gt_instances, self.num_classes)
        pos = gt_labels != self.num_classes  # (N, R)
        num_pos = pos.sum()
        get_event_storage().put_scalar("num_pos_anchors", num_pos.item() / len(gt_labels))
        normalizer = reduce_mean(num_pos.float()).clamp(min=1.0)
        return gt_labels, gt_boxes, pos, normalizer

    # ------------------------------------------------------------------ inference

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        predictions = self._transpose_dense_predictions(predictions, self.prediction_dims)
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            scores, boxes = self.image_predictions(predictions, i)
            results.append(self.inference_single_image(anchors, scores, boxes, image_size))
        return results

    def image_predictions(
        self, predictions: List[List[Tensor]], i: int
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Of image ``i`` of the transposed per-level (N, Hi*Wi, dim) ``predictions``, per level
        (Hi*Wi, K) fp32 scores and (Hi*Wi, 4) fp32 box outputs for ``box2box_transform``."""
        raise NotImplementedError

    def candidate_score_thresh(self) -> float:
        """The score that the candidates of :meth:`inference_single_image` must exceed."""
        return self.test_score_thresh

    def inference_single_image(
        self,
        anchors: List[Boxes],
        scores: List[Tensor],
        boxes: List[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """Detections of one image from per-level (Hi*Wi, K) scores and (Hi*Wi, 4) box outputs
        (deltas or distances for ``box2box_transform``): threshold at
        :meth:`candidate_score_thresh`, top-k per level, decoding, per-class NMS."""
        pred = self._decode_multi_level_predictions(
            anchors,
            scores,
            boxes,
            self.candidate_score_thresh(),
            self.test_topk_candidates,
            image_size,
        )
        keep = batched_nms(
            pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
        )
        return pred[keep[: self.max_detections_per_image]]


@META_ARCH_REGISTRY.register()
class ATSS(ATSSFamilyDetector):
    """ATSS, buildable from a yaml config with :func:`detectron2.modeling.build_model`.

    Batched inputs are detectron2's: a list of dicts with "image" (3, H, W) and, in training,
    "instances" (gt_boxes, gt_classes). Training returns ``{"loss_atss_cls", "loss_atss_box",
    "loss_atss_ctr"}``; inference ``[{"instances": Instances}]`` with pred_boxes, scores and
    pred_classes.
    """

    config_node = "ATSS"
    head_class = ATSSHead

    @configurable
    def __init__(
        self,
        *,
        box2box_transform: Optional[Box2BoxTransform] = None,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        box_loss_weight: float = 2.0,
        **kwargs,
    ):
        """
        Args:
            box2box_transform: box delta coding; default weights (10, 10, 5, 5).
            focal_loss_alpha, focal_loss_gamma: of the classification focal loss.
            box_loss_weight: weight of the GIoU loss.
            kwargs: backbone, head, head_in_features, num_classes, anchor_scale, topk,
                test_score_thresh, test_topk_candidates, test_nms_thresh,
                max_detections_per_image, pixel_mean, pixel_std, as
                :class:`ATSSFamilyDetector` (same defaults); ``head`` an :class:`ATSSHead` (or
                anything returning the same three lists).
        """
        if box2box_transform is None:
            box2box_transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
        super().__init__(box2box_transform=box2box_transform, **kwargs)
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.box_loss_weight = box_loss_weight

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        """Constructor arguments from ``cfg.MODEL.ATSS``, ``cfg.MODEL.BACKBONE`` and ``cfg.TEST``.

        The towers have ``MODEL.ATSS.NUM_CONVS`` convs as wide as the backbone features of
        ``MODEL.ATSS.IN_FEATURES``, which must all have the same channels.
        """
        c = cfg.MODEL.ATSS
        return {
            **super().from_config(cfg),
            "focal_loss_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": c.FOCAL_LOSS_GAMMA,
            "box_loss_weight": c.BOX_LOSS_WEIGHT,
        }

    @property
    def prediction_dims(self) -> List[int]:
        """Class logits K, box deltas 4, centerness 1."""
        return [self.num_classes, 4, 1]

    # ------------------------------------------------------------------ training

    def losses(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_deltas: List[Tensor],
        pred_centerness: List[Tensor],
        assignments: List[ATSSAssignment],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        """The three ATSS losses (see the module docstring), in fp32 with autocast off.

        Args:
            anchors: per level, Boxes (Hi*Wi, 4).
            pred_logits, pred_deltas, pred_centerness: per level, (N, Hi*Wi, K), (N, Hi*Wi, 4),
                (N, Hi*Wi, 1).
            assignments: per image, from :meth:`label_anchors`.
            gt_instances: per image, with gt_boxes and gt_classes.
        """
        with torch.autocast(pred_logits[0].device.type, enabled=False):
            logits = torch.cat(pred_logits, dim=1).float()  # (N, R, K)
            deltas = torch.cat(pred_deltas, dim=1).float()  # (N, R, 4)
            centerness = torch.cat(pred_centerness, dim=1).float().squeeze(2)  # (N, R)
            gt_labels, gt_boxes, pos, normalizer = self.positives(assignments, gt_instances)

            targets = F.one_hot(gt_labels, self.num_classes + 1)[..., :-1].to(logits.dtype)
            loss_cls = sigmoid_focal_loss_jit(
                logits,
                targets,
                alpha=self.focal_loss_alpha,
                gamma=self.focal_loss_gamma,
                reduction="sum",
            )

            all_anchors = Boxes.cat(anchors).tensor.float()  # (R, 4)
            pos_anchors = all_anchors.expand(len(gt_labels), -1, -1)[pos]  # (P, 4)
            pos_gt = gt_boxes[pos]  # (P, 4)
            pos_boxes = self.box2box_transform.apply_deltas(deltas[pos], pos_anchors)
            ctr_targets = centerness_targets(pos_anchors, pos_gt)  # (P,)
            ctr_normalizer = reduce_mean(ctr_targets.sum()).clamp(min=1.0)
            loss_box = (giou_loss(pos_boxes, pos_gt) * ctr_targets).sum() / ctr_normalizer
            loss_ctr = F.binary_cross_entropy_with_logits(
                centerness[pos], ctr_targets, reduction="sum"
            )
            return {
                "loss_atss_cls": loss_cls / normalizer,
                "loss_atss_box": self.box_loss_weight * loss_box,
                "loss_atss_ctr": loss_ctr / normalizer,
            }

    # ------------------------------------------------------------------ inference

    def image_predictions(
        self, predictions: List[List[Tensor]], i: int
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level, image ``i``'s (Hi*Wi, K) scores (:meth:`_scores`) and (Hi*Wi, 4) deltas."""
        logits, deltas, centerness = predictions
        scores = [
            self._scores(cls[i].float(), ctr[i].float()) for cls, ctr in zip(logits, centerness)
        ]
        return scores, [d[i].float() for d in deltas]

    def _scores(self, logits: Tensor, centerness: Tensor) -> Tensor:
        """(Hi*Wi, K) detection scores from (Hi*Wi, K) class and (Hi*Wi, 1) centerness logits:
        sigmoid(class) * sigmoid(centerness), 0 where sigmoid(class) <= the score threshold."""
        prob = logits.sigmoid()
        scores = prob * centerness.sigmoid()
        return torch.where(prob > self.test_score_thresh, scores, torch.zeros_like(scores))

    def candidate_score_thresh(self) -> float:
        """0: :meth:`_scores` has already zeroed the scores below the class threshold."""
        return 0.0


def centerness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS centerness of the anchor centres in their GT boxes, both (P, 4) XYXY -> (P,):
    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), the distances l, t, r, b from the centre
    to the sides (all > 0 for ATSS positives)."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    left_top = centers - gt_boxes[:, :2]
    right_bottom = gt_boxes[:, 2:] - centers
    ratio = torch.minimum(left_top, right_bottom) / torch.maximum(left_top, right_bottom)
    return ratio.prod(dim=1).clamp(min=0).sqrt()
