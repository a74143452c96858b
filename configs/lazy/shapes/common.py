"""tid_shapes data and the CPU-sized schedule of ``configs/Base-Shapes.yaml``, and the FCOS model
of ``configs/shapes/Base-FCOS.yaml``, as LazyConfig parts (``from .common import ...``)."""

import detectron2.data.transforms as T
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import CosineParamScheduler
from omegaconf import OmegaConf

from tid_d2.lazy import clipped_optimizer
from tid_d2.modeling.fcos import FCOS

# ---------------------------------------------------------------------------- data (160 px)
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="tid_shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(160,), max_size=160, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True, vertical=False),
        ],
        image_format="BGR",
        use_instance_mask=False,
    ),
    total_batch_size=8,
    num_workers=2,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="tid_shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=160, max_size=160, sample_style="choice")
        ],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=2,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=("bbox",),
    output_dir="${...train.output_dir}/inference/${..test.dataset.names}",
)

# ---------------------------------------------------------------------------- schedule
# SGD, lr 0.01, momentum 0.9, weight decay 1e-4 (none on norms), each parameter's gradient
# clipped to norm 10 (SOLVER.CLIP_GRADIENTS of the yaml)
optimizer = L(clipped_optimizer)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    optimizer_class=torch.optim.SGD,
    lr=0.01,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    foreach=True,
    clip_type="norm",
    clip_value=10.0,
    norm_type=2.0,
)
# WarmupCosineLR: linear warm-up from 0.001 over the first 100 of 1000 iterations, then cosine
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_factor=0.001,
    warmup_length=100 / 1000,
    warmup_method="linear",
)
train = model_zoo.get_config("common/train.py").train
train.output_dir = "output/lazy/shapes"
train.max_iter = 1000
train.checkpointer = dict(period=500, max_to_keep=None)
train.eval_period = 0
train.log_period = 20
train.device = "cpu"  # sized for 2 CPU cores; cuda works too
train.seed = 0


# ---------------------------------------------------------------------------- FCOS
def shapes_fcos(backbone, pixel_mean, pixel_std):
    """The FCOS of ``configs/shapes/Base-FCOS.yaml`` around ``backbone`` (an FPN node with
    p3..p7): tid_d2's FCOS (detectron2's, with fp32 losses), 6 classes, a head of two GN convs as
    wide as the FPN (``model.backbone.out_channels``)."""
    width = "${...backbone.out_channels}"  # from an element of a list of the head
    return L(FCOS)(
        backbone=backbone,
        head=L(FCOSHead)(
            input_shape=[L(ShapeSpec)(channels="${....backbone.out_channels}") for _ in range(5)],
            conv_dims=[width, width],
            norm="GN",
            num_classes="${..num_classes}",
            prior_prob=0.01,
        ),
        head_in_features=["p3", "p4", "p5", "p6", "p7"],
        num_classes=6,
        center_sampling_radius=1.5,
        focal_loss_alpha=0.25,
        focal_loss_gamma=2.0,
        test_score_thresh=0.2,
        test_topk_candidates=1000,
        test_nms_thresh=0.6,
        max_detections_per_image=100,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
    )
