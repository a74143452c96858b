"""FCOS as a yaml-configurable meta-architecture (``MODEL.META_ARCHITECTURE: "FCOS"``).

detectron2 ships :class:`detectron2.modeling.meta_arch.fcos.FCOS` and ``FCOSHead`` for LazyConfig
only: neither is registered nor has a ``from_config``. The subclass here adds just that; its
forward, matching, losses and inference are detectron2's, unchanged.

Keys (see ``tid_d2.config``): ``MODEL.FCOS.*`` for the head, loss and test settings;
``MODEL.BACKBONE.NAME`` for the backbone, e.g. ``build_retinanet_resnet_fpn_backbone`` or
``build_retinanet_mobilenetv2_fpn_backbone`` (p3..p7 for the default ``MODEL.FCOS.IN_FEATURES``).

Training returns ``{"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}``; inference returns
``[{"instances": Instances}]`` like every detectron2 detector. The one change to detectron2's
training: the losses are computed in fp32, so FCOS trains under AMP (``SOLVER.AMP.ENABLED``).
"""

from typing import Any, Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead

__all__ = ["FCOS", "FCOSHead"]


@META_ARCH_REGISTRY.register()
class FCOS(_D2FCOS):
    """detectron2's FCOS, buildable from a yaml config with :func:`build_model`.

    Takes the same keyword arguments as :class:`detectron2.modeling.meta_arch.fcos.FCOS`, or a
    config (see :meth:`from_config`). Batched inputs are detectron2's: a list of dicts with
    "image" (3, H, W) and, in training, "instances" (gt_boxes, gt_classes).
    """

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def losses(
        self,
        anchors,
        pred_logits: List[torch.Tensor],
        gt_labels,
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes,
        pred_centerness: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """detectron2's FCOS losses on the head's outputs cast to fp32, with autocast off.

        Under AMP the head's outputs (each (N, H*W*A, K), (N, H*W*A, 4), (N, H*W*A, 1)) are fp16
        and detectron2's box loss fails inside fvcore's ``giou_loss``, which writes a float
        product into a half tensor ("Index put requires the source and destination dtypes
        match"; fvcore pull request 114, not merged). Losses gain nothing from fp16; in fp32 the
        results are detectron2's exactly.
        """
        f32 = lambda xs: [x.float() for x in xs]  # noqa: E731
        with torch.autocast(pred_logits[0].device.type, enabled=False):
            return super().losses(
                anchors,
                f32(pred_logits),
                gt_labels,
                f32(pred_anchor_deltas),
                gt_boxes,
                f32(pred_centerness),
            )

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        """Constructor arguments from ``cfg.MODEL.FCOS``, ``cfg.MODEL.BACKBONE`` and ``cfg.TEST``.

        The head's towers have ``MODEL.FCOS.NUM_CONVS`` convs as wide as the backbone features
        of ``MODEL.FCOS.IN_FEATURES``, which must all have the same channels.
        """
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        in_features = list(cfg.MODEL.FCOS.IN_FEATURES)
        missing = [f for f in in_features if f not in backbone_shape]
        if missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES {missing} are not outputs of the backbone "
                f"{cfg.MODEL.BACKBONE.NAME} ({list(backbone_shape)})"
            )
        feature_shapes = [backbone_shape[f] for f in in_features]
        channels = {s.channels for s in feature_shapes}
        if len(channels) != 1:
            raise ValueError(f"FCOS needs features of equal width, got {sorted(channels)}")
        width = feature_shapes[0].channels
        head = FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[width] * cfg.MODEL.FCOS.NUM_CONVS,
            norm=cfg.MODEL.FCOS.HEAD_NORM,
            num_classes=cfg.MODEL.FCOS.NUM_CLASSES,
            prior_prob=cfg.MODEL.FCOS.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": in_features,
            "num_classes": cfg.MODEL.FCOS.NUM_CLASSES,
            "center_sampling_radius": cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS,
            # Loss parameters:
            "focal_loss_alpha": cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA,
            # Inference parameters:
            "test_score_thresh": cfg.MODEL.FCOS.SCORE_THRESH_TEST,
            "test_topk_candidates": cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": cfg.MODEL.FCOS.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }
