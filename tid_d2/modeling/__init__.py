"""Models of tid-d2; importing registers them with detectron2's registries."""

from . import atss, fcos, gfl, mobilenet  # noqa: F401 (registration)
from .distiller import TID_MODES, TIDDistiller, student_cfg_from  # noqa: F401 (registration)
from .probes import PROBE_REGISTRY, DetectorProbe, build_probe  # noqa: F401
