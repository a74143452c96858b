"""tid-d2: Task Integration Distillation for detectron2.

Importing the package registers its datasets (``tid_shapes_*``), backbones (MobileNetV2-FPN) and
meta-architectures (``FCOS`` from yaml, ``TIDDistiller``) with detectron2.
"""

from . import data, modeling  # noqa: F401 (registration)
from .config import add_tid_config, get_cfg  # noqa: F401

__version__ = "0.1.0"
