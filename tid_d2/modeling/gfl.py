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

from typing import Any, Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.box_regression import Box2BoxTransformLinear
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from fvcore.nn import giou_loss
from torch import Tensor

from .atss import ATSSFamilyDetector, ATSSFamilyHead, reduce_mean
from .atss_assigner import ATSSAssignment
from .gfl_losses import distribution_focal_loss, integral_distances, quality_focal_loss

__all__ = ["GFL", "GFLHead"]

# Targets of the DFL stay below REG_MAX by this much (mmdetection's bbox2distance eps).
DFL_TARGET_EPS = 0.1


class GFLHead(ATSSFamilyHead):
    """detectron2's RetinaNet head with one anchor per location, ``4 * (reg_max + 1)`` box
    outputs and a learnable :class:`~tid_d2.modeling.atss.Scale` per level on them.

    ``forward(features)`` takes per level (N, C, Hi, Wi) and returns two lists over levels:
    class-quality logits (N, K, Hi, Wi) and box-distribution logits (N, 4 * (reg_max + 1), Hi, Wi).
    """

    def __init__(self, *, reg_max: int = 16, **kwargs):
        """
        Args:
            reg_max: n, the last bin of the side distributions (n + 1 bins).
            kwargs: input_shape, num_classes, conv_dims, norm, prior_prob, as
                :class:`~tid_d2.modeling.atss.ATSSFamilyHead`.
        """
        super().__init__(box_dim=4 * (reg_max + 1), **kwargs)
        self.reg_max = reg_max

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, distributions, _ = self._forward_towers(features)
        return logits, distributions


@META_ARCH_REGISTRY.register()
class GFL(ATSSFamilyDetector):
    """GFL, buildable from a yaml config with :func:`detectron2.modeling.build_model`.

    Batched inputs are detectron2's. Training returns ``{"loss_gfl_qfl", "loss_gfl_dfl",
    "loss_gfl_giou"}``; inference ``[{"instances": Instances}]`` with pred_boxes, scores and
    pred_classes.
    """

    config_node = "GFL"
    head_class = GFLHead

    @configurable
    def __init__(
        self,
        *,
        reg_max: int = 16,
        qfl_beta: float = 2.0,
        dfl_weight: float = 0.25,
        giou_weight: float = 2.0,
        **kwargs,
    ):
        """
        Args:
            reg_max: n, the last bin of the side distributions (n + 1 bins).
            qfl_beta, dfl_weight, giou_weight: of the losses.
            kwargs: backbone, head, head_in_features, num_classes, anchor_scale, topk,
                test_score_thresh, test_topk_candidates, test_nms_thresh,
                max_detections_per_image, pixel_mean, pixel_std, as
                :class:`~tid_d2.modeling.atss.ATSSFamilyDetector` (same defaults); ``head`` a
                :class:`GFLHead` of the same ``reg_max``.
        """
        # decodes (l, t, r, b) pixel distances from the anchors' centres
        super().__init__(
            box2box_transform=Box2BoxTransformLinear(normalize_by_size=False), **kwargs
        )
        self.reg_max = reg_max
        self.qfl_beta = qfl_beta
        self.dfl_weight = dfl_weight
        self.giou_weight = giou_weight

    @classmethod
    def head_kwargs(cls, node) -> Dict[str, Any]:
        return {"reg_max": node.REG_MAX}

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        """Constructor arguments from ``cfg.MODEL.GFL``, ``cfg.MODEL.BACKBONE`` and ``cfg.TEST``."""
        c = cfg.MODEL.GFL
        return {
            **super().from_config(cfg),
            "reg_max": c.REG_MAX,
            "qfl_beta": c.QFL_BETA,
            "dfl_weight": c.DFL_WEIGHT,
            "giou_weight": c.GIOU_WEIGHT,
        }

    @property
    def prediction_dims(self) -> List[int]:
        """Class-quality logits K, box-distribution logits 4 * (n + 1)."""
        return [self.num_classes, 4 * (self.reg_max + 1)]

    def decode_distances(self, distribution_logits: Tensor, stride: float) -> Tensor:
        """(..., 4 * (n + 1)) box-distribution logits of one level -> (..., 4) pixel distances
        (l, t, r, b) from the anchor centres."""
        return integral_distances(distribution_logits.float(), self.reg_max) * stride

    # ------------------------------------------------------------------ training

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
            gt_labels, gt_boxes, pos, normalizer = self.positives(assignments, gt_instances)

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

    def image_predictions(
        self, predictions: List[List[Tensor]], i: int
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level, image ``i``'s (Hi*Wi, K) scores sigmoid(class) and (Hi*Wi, 4) pixel
        distances (:meth:`decode_distances`)."""
        logits, distributions = predictions
        scores = [x[i].float().sigmoid() for x in logits]
        distances = [self.decode_distances(d[i], s) for d, s in zip(distributions, self.strides)]
        return scores, distances
