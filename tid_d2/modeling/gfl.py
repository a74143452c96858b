"""GFL, Generalized Focal Loss (Li et al., NeurIPS 2020), as a yaml-configurable
meta-architecture (``MODEL.META_ARCHITECTURE: "GFL"``); detectron2 ships none.

The ATSS assignment and square anchors of :mod:`tid_d2.modeling.atss` (the anchors serve the
assignment only); a head with the same towers whose class output is a joint class-quality score
(sigmoid = the predicted IoU with the object) and whose box output is, per side (left, top,
right, bottom), a discrete distribution over 0..``REG_MAX`` strides of the level, decoded by its
expectation (:func:`~tid_d2.modeling.gfl_losses.integral_distances`) from the anchor's centre.
A learnable scale per level multiplies the distribution logits. No centerness branch.

Losses (mmdetection's ``GFLHead``, ``mmdet/models/dense_heads/gfl_head.py``, and
``configs/gfl/gfl_r50_fpn_1x_coco.py``), in fp32 with autocast off so AMP works:

* ``loss_gfl_qfl``: Quality Focal Loss (beta 2) over every location and class, the target at a
  positive's class the IoU of its decoded box with its GT (detached), 0 elsewhere; divided by
  the number of positives averaged over processes (at least 1);
* ``loss_gfl_giou``: GIoU loss of the positives' boxes, weight 2; and
* ``loss_gfl_dfl``: Distribution Focal Loss of the positives' sides, weight 0.25, averaged over
  the 4 sides, towards the GT's distances in strides clamped to [0, REG_MAX - 0.1]
  (mmdetection's ``bbox2distance`` eps);

  both weighted per positive by its predicted quality (max over classes of sigmoid(class),
  detached) and divided by the sum of those weights averaged over processes (at least 1).

Inference: score = sigmoid(class) > ``SCORE_THRESH_TEST``, the ``TOPK_CANDIDATES_TEST`` best per
level, per-class NMS at ``NMS_THRESH_TEST``, ``TEST.DETECTIONS_PER_IMAGE`` per image.
"""

from typing import Any, Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.box_regression import Box2BoxTransformLinear
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss
from torch import Tensor, nn

from .atss import (
    Scale,
    assign_batch,
    head_feature_shapes,
    matched_gt,
    reduce_mean,
    square_anchor_generator,
)
from .atss_assigner import ATSSAssignment
from .gfl_losses import distribution_focal_loss, integral_distances, quality_focal_loss

__all__ = ["GFL", "GFLHead"]

# Targets of the DFL stay below REG_MAX by this much (mmdetection's bbox2distance eps).
DFL_TARGET_EPS = 0.1


class GFLHead(RetinaNetHead):
    """detectron2's RetinaNet head with one anchor per location, ``4 * (reg_max + 1)`` box
    outputs and a learnable :class:`~tid_d2.modeling.atss.Scale` per level on them.

    ``forward(features)`` takes per level (N, C, Hi, Wi) and returns two lists over levels:
    class-quality logits (N, K, Hi, Wi) and box-distribution logits (N, 4 * (reg_max + 1), Hi, Wi).
    """

    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        conv_dims: List[int],
        reg_max: int = 16,
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
        self.reg_max = reg_max
        self.bbox_pred = nn.Conv2d(conv_dims[-1], 4 * (reg_max + 1), 3, stride=1, padding=1)
        nn.init.normal_(self.bbox_pred.weight, std=0.01)
        nn.init.constant_(self.bbox_pred.bias, 0.0)
        self.scales = nn.ModuleList(Scale(1.0) for _ in input_shape)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        assert len(features) == self._num_features
        logits, distributions = [], []
        for feature, scale in zip(features, self.scales):
            logits.append(self.cls_score(self.cls_subnet(feature)))
            distributions.append(scale(self.bbox_pred(self.bbox_subnet(feature))))
        return logits, distributions


@META_ARCH_REGISTRY.register()
class GFL(DenseDetector):
    """GFL, buildable from a yaml config with :func:`detectron2.modeling.build_model`.

    Batched inputs are detectron2's. Training returns ``{"loss_gfl_qfl", "loss_gfl_dfl",
    "loss_gfl_giou"}``; inference ``[{"instances": Instances}]`` with pred_boxes, scores and
    pred_classes.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        num_classes: int,
        reg_max: int = 16,
        anchor_scale: float = 8.0,
        topk: int = 9,
        qfl_beta: float = 2.0,
        dfl_weight: float = 0.25,
        giou_weight: float = 2.0,
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
                :class:`detectron2.modeling.meta_arch.dense_detector.DenseDetector`; ``head`` a
                :class:`GFLHead` of the same ``reg_max``.
            num_classes: K, object classes.
            reg_max: n, the last bin of the side distributions (n + 1 bins).
            anchor_scale, topk: anchor side in strides and k of the ATSS assignment.
            qfl_beta, dfl_weight, giou_weight: of the losses.
            test_score_thresh, test_topk_candidates, test_nms_thresh, max_detections_per_image:
                inference, see the module docstring.
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.num_classes = num_classes
        self.reg_max = reg_max
        shapes = backbone.output_shape()
        self.strides = [shapes[f].stride for f in self.head_in_features]
        self.anchor_generator = square_anchor_generator(self.strides, anchor_scale)
        # decodes (l, t, r, b) pixel distances from the anchors' centres
        self.box2box_transform = Box2BoxTransformLinear(normalize_by_size=False)
        self.topk = topk
        self.qfl_beta = qfl_beta
        self.dfl_weight = dfl_weight
        self.giou_weight = giou_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        """Constructor arguments from ``cfg.MODEL.GFL``, ``cfg.MODEL.BACKBONE`` and ``cfg.TEST``."""
        c = cfg.MODEL.GFL
        backbone = build_backbone(cfg)
        in_features = list(c.IN_FEATURES)
        shapes = head_feature_shapes(backbone, in_features, "MODEL.GFL.IN_FEATURES")
        head = GFLHead(
            input_shape=shapes,
            num_classes=c.NUM_CLASSES,
            conv_dims=[shapes[0].channels] * c.NUM_CONVS,
            reg_max=c.REG_MAX,
            norm=c.HEAD_NORM,
            prior_prob=c.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "num_classes": c.NUM_CLASSES,
            "reg_max": c.REG_MAX,
            "anchor_scale": c.ANCHOR_SCALE,
            "topk": c.TOPK,
            "qfl_beta": c.QFL_BETA,
            "dfl_weight": c.DFL_WEIGHT,
            "giou_weight": c.GIOU_WEIGHT,
            "test_score_thresh": c.SCORE_THRESH_TEST,
            "test_topk_candidates": c.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": c.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def decode_distances(self, distribution_logits: Tensor, stride: float) -> Tensor:
        """(..., 4 * (n + 1)) box-distribution logits of one level -> (..., 4) pixel distances
        (l, t, r, b) from the anchor centres."""
        return integral_distances(distribution_logits.float(), self.reg_max) * stride

    # ------------------------------------------------------------------ training

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        logits, distributions = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4 * (self.reg_max + 1)]
        )
        anchors = self.anchor_generator(features)
        assignments = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, logits, distributions, assignments, gt_instances)

    def label_anchors(
        self, anchors: List[Boxes], gt_instances: List[Instances]
    ) -> List[ATSSAssignment]:
        """The ATSS assignment of every image (anchors: per level, Boxes (Hi*Wi, 4))."""
        return assign_batch(anchors, gt_instances, self.topk)

    def losses(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_distributions: List[Tensor],
        assignments: List[ATSSAssignment],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        """The three GFL losses (see the module docstring), in fp32 with autocast off.

        Args:
            anchors: per level, Boxes (Hi*Wi, 4).
            pred_logits, pred_distributions: per level, (N, Hi*Wi, K), (N, Hi*Wi, 4 * (n + 1)).
            assignments: per image, from :meth:`label_anchors`.
            gt_instances: per image, with gt_boxes and gt_classes.
        """
        with torch.autocast(pred_logits[0].device.type, enabled=False):
            logits = torch.cat(pred_logits, dim=1).float()  # (N, R, K)
            distributions = torch.cat(pred_distributions, dim=1).float()  # (N, R, 4 * (n + 1))
            num_images = len(gt_instances)
            gt_labels, gt_boxes = matched_gt(assignments, gt_instances, self.num_classes)
            pos = gt_labels != self.num_classes  # (N, R)
            num_pos = pos.sum()
            get_event_storage().put_scalar("num_pos_anchors", num_pos.item() / num_images)
            normalizer = reduce_mean(num_pos.float()).clamp(min=1.0)

            all_anchors = Boxes.cat(anchors).tensor.float()  # (R, 4)
            strides = torch.cat(
                [all_anchors.new_full((len(a),), float(s)) for a, s in zip(anchors, self.strides)]
            )  # (R,)
            centers = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2  # (R, 2)
            pos_centers = centers.expand(num_images, -1, -1)[pos]  # (P, 2)
            pos_strides = strides.expand(num_images, -1)[pos]  # (P,)
            pos_gt = gt_boxes[pos]  # (P, 4)
            pos_logits = distributions[pos]  # (P, 4 * (n + 1))
            distances = integral_distances(pos_logits, self.reg_max) * pos_strides[:, None]
            pos_boxes = torch.cat(
                [pos_centers - distances[:, :2], pos_centers + distances[:, 2:]], 1
            )

            # QFL: soft target = IoU of the predicted box with its GT at the positive's class
            quality = matched_pairwise_iou(Boxes(pos_boxes.detach()), Boxes(pos_gt))  # (P,)
            targets = torch.zeros_like(logits)
            image_idx, anchor_idx = pos.nonzero(as_tuple=True)
            targets[image_idx, anchor_idx, gt_labels[image_idx, anchor_idx]] = quality
            loss_qfl = quality_focal_loss(logits, targets, self.qfl_beta).sum() / normalizer

            # GIoU and DFL, weighted by the predicted quality
            weights = logits.detach().sigmoid().amax(dim=-1)[pos]  # (P,)
            weight_normalizer = reduce_mean(weights.sum()).clamp(min=1.0)
            loss_giou = (giou_loss(pos_boxes, pos_gt) * weights).sum() / weight_normalizer
            gt_distances = torch.cat([pos_centers - pos_gt[:, :2], pos_gt[:, 2:] - pos_centers], 1)
            gt_bins = (gt_distances / pos_strides[:, None]).clamp(
                min=0.0, max=self.reg_max - DFL_TARGET_EPS
            )  # (P, 4)
            dfl = distribution_focal_loss(
                pos_logits.reshape(-1, self.reg_max + 1), gt_bins.reshape(-1)
            ).view(-1, 4)
            loss_dfl = (dfl.mean(dim=1) * weights).sum() / weight_normalizer
            return {
                "loss_gfl_qfl": loss_qfl,
                "loss_gfl_dfl": self.dfl_weight * loss_dfl,
                "loss_gfl_giou": self.giou_weight * loss_giou,
            }

    # ------------------------------------------------------------------ inference

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        logits, distributions = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4 * (self.reg_max + 1)]
        )
        anchors = self.anchor_generator(features)
        results = []
        for i, image_size in enumerate(images.image_sizes):
            scores = [x[i].float().sigmoid() for x in logits]
            distances = [
                self.decode_distances(d[i], s) for d, s in zip(distributions, self.strides)
            ]
            results.append(self.inference_single_image(anchors, scores, distances, image_size))
        return results

    def inference_single_image(
        self,
        anchors: List[Boxes],
        scores: List[Tensor],
        distances: List[Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """Detections of one image from per-level (Hi*Wi, K) scores and (Hi*Wi, 4) pixel
        distances: threshold, top-k per level, decoding, per-class NMS."""
        pred = self._decode_multi_level_predictions(
            anchors,
            scores,
            distances,
            self.test_score_thresh,
            self.test_topk_candidates,
            image_size,
        )
        keep = batched_nms(
            pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
        )
        return pred[keep[: self.max_detections_per_image]]
