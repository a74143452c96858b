"""Datasets of tid-d2: the embedded synthetic ``tid_shapes`` dataset and ``--dataset`` COCO
registration.

Importing this package registers ``tid_shapes_train``, ``tid_shapes_val`` and ``tid_shapes_test``
with detectron2 (default :class:`ShapesSpec`); nothing is generated until a split is first used.
"""

import warnings

# ``python -m tid_d2.data.shapes`` imports this package (which imports .shapes) before running the
# module as __main__; runpy warns about that. Harmless here: __main__ calls the package's module.
warnings.filterwarnings(
    "ignore",
    message=r"'tid_d2\.data\.shapes' found in sys\.modules",
    category=RuntimeWarning,
)

from .register import add_dataset_args, parse_dataset_spec, register_coco_datasets  # noqa: E402
from .shapes import (  # noqa: E402
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    ShapesSpec,
    ensure_generated,
    generate_shapes,
    register_tid_shapes,
    render_preview,
)

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "ShapesSpec",
    "generate_shapes",
    "register_tid_shapes",
    "ensure_generated",
    "render_preview",
    "register_coco_datasets",
    "add_dataset_args",
    "parse_dataset_spec",
    "DEFAULT_SHAPES_DATASETS",
]

#: Names registered at import: ``tid_shapes_train``, ``tid_shapes_val``, ``tid_shapes_test``.
DEFAULT_SHAPES_DATASETS = register_tid_shapes("tid_shapes", ShapesSpec.from_env())
