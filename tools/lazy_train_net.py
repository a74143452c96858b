#!/usr/bin/env python
"""Train or evaluate a detector, or distil a teacher into a student with TID, from a LazyConfig
(Python) config: detectron2's ``tools/lazyconfig_train_net.py`` with tid-d2's checkpointer,
resumable data stream, teacher evaluation and dataset generation (``tid_d2.lazy_engine``).

    python tools/lazy_train_net.py --config-file configs/lazy/shapes/fcos_mnv2_teacher.py
    python tools/lazy_train_net.py --config-file configs/lazy/shapes/tid_fcos.py \\
        model.tid.teacher.weights=output/lazy/shapes/fcos_mnv2_teacher/model_final.pth
    python tools/lazy_train_net.py --config-file configs/lazy/shapes/tid_fcos.py --eval-only \\
        train.init_checkpoint=output/lazy/shapes/tid_fcos/model_final.pth
    python tools/lazy_train_net.py --config-file ... --resume
    python tools/lazy_train_net.py --config-file ... --num-gpus 2

Overrides are LazyConfig's ``a.b=c``. With a TID config (``model = L(build_lazy_distiller)``),
``train.init_checkpoint``, ``--resume`` and ``--eval-only`` mean the student; the teacher comes
from ``model.tid.teacher``. yacs configs (``.yaml``) go through ``train_net.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_setup  # noqa: E402

import tid_d2  # noqa: E402,F401 (registers datasets, backbones, meta-architectures)
from tid_d2.data import register_coco_datasets  # noqa: E402
from tid_d2.engine import argument_parser, launch_from_command_line  # noqa: E402
from tid_d2.lazy import load_lazy_config  # noqa: E402
from tid_d2.lazy_engine import do_eval_only, do_train  # noqa: E402


def setup(args):
    """The LazyConfig of ``--config-file`` with the command line's ``a.b=c`` overrides."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    register_coco_datasets(args.datasets)
    cfg = setup(args)
    if args.eval_only:
        return do_eval_only(cfg, resume=args.resume)
    return do_train(cfg, resume=args.resume)


def get_parser():
    return argument_parser()


if __name__ == "__main__":
    launch_from_command_line(main, get_parser())
