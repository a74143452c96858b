"""TID: MobileNetV2-FPN128 teacher (ImageNet-initialised, trained on tid_shapes) -> ResNet-18-FPN64
student trained from scratch, ``configs/shapes/tid_fcos.yaml`` as a LazyConfig. Train the teacher
first:

    python tools/lazy_train_net.py --config-file configs/lazy/shapes/fcos_mnv2_teacher.py
    python tools/lazy_train_net.py --config-file configs/lazy/shapes/tid_fcos.py

Variants: model.tid.mode=fitnet | gt_mask | cls_only | reg_only | no_ldam | none (student alone).
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from tid_d2.lazy import build_lazy_distiller

from .common import dataloader, lr_multiplier, optimizer, shapes_fcos, train

model = L(build_lazy_distiller)(
    student=shapes_fcos(
        # build_retinanet_resnet_fpn_backbone: ResNet-18 (BN, from scratch), P6 / P7 from C5
        backbone=L(FPN)(
            bottom_up=L(ResNet)(
                stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
                stages=L(ResNet.make_default_stages)(depth=18, norm="BN"),
                out_features=["res3", "res4", "res5"],
                freeze_at=0,
            ),
            in_features=["res3", "res4", "res5"],
            out_channels=64,
            norm="",
            top_block=L(LastLevelP6P7)(
                in_channels=512, out_channels="${..out_channels}", in_feature="res5"
            ),
            fuse_type="sum",
        ),
        pixel_mean=[103.53, 116.28, 123.675],
        pixel_std=[1.0, 1.0, 1.0],
    ),
    tid=dict(
        # lambda chosen on tid_shapes_val (see configs/shapes/tid_fcos.yaml)
        loss_weight=0.001,
        teacher=dict(
            config_file="configs/lazy/shapes/fcos_mnv2_teacher.py",
            weights="output/lazy/shapes/fcos_mnv2_teacher/model_final.pth",
            # the teacher's outputs per image (tid_d2/modeling/teacher_cache.py), as the yaml
            cache_mb=2048,
        ),
    ),
    student_input_format="${..dataloader.train.mapper.image_format}",
    vis_period=200,
)
train.output_dir = "output/lazy/shapes/tid_fcos"
