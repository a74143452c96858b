"""Teacher: FCOS with MobileNetV2 started from ImageNet weights + FPN 128 (RGB, ImageNet mean /
std), ``configs/shapes/fcos_mnv2_teacher.yaml`` as a LazyConfig:

    python tools/lazy_train_net.py --config-file configs/lazy/shapes/fcos_mnv2_teacher.py
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from tid_d2.modeling.mobilenet import MobileNetV2

from .common import dataloader, lr_multiplier, optimizer, shapes_fcos, train

model = shapes_fcos(
    # build_retinanet_mobilenetv2_fpn_backbone: P6 / P7 from P5
    backbone=L(FPN)(
        bottom_up=L(MobileNetV2)(
            out_features=["mb3", "mb4", "mb5"], norm="BN", imagenet_init=True, freeze_at=0
        ),
        in_features=["mb3", "mb4", "mb5"],
        out_channels=128,
        norm="",
        top_block=L(LastLevelP6P7)(
            in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
        ),
        fuse_type="sum",
    ),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)
dataloader.train.mapper.image_format = "RGB"
train.output_dir = "output/lazy/shapes/fcos_mnv2_teacher"
