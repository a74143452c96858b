#!/usr/bin/env python
"""Train or evaluate a detector, or distil a teacher into a student with TID.

    python train_net.py --config-file configs/shapes/retinanet_mnv2_teacher.yaml
    python train_net.py --config-file configs/shapes/tid_retinanet.yaml
    python train_net.py --config-file configs/shapes/tid_retinanet.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file ... --dataset mine_train:ann/train.json:images/ DATASETS.TRAIN "('mine_train',)"

With a TID config, MODEL.WEIGHTS / --resume / --eval-only refer to the student; the teacher comes
from TID.TEACHER.*.
"""

from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import tid_d2  # noqa: F401 (registers datasets, backbones, meta-architectures)
from tid_d2.config import get_cfg
from tid_d2.data import register_coco_datasets
from tid_d2.engine import (
    Trainer,
    argument_parser,
    build_student_for_eval,
    launch_from_command_line,
)


def setup(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    register_coco_datasets(args.datasets)
    cfg = setup(args)
    if args.eval_only:
        model, eval_cfg = build_student_for_eval(cfg, resume=args.resume)
        res = Trainer.test(eval_cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    return argument_parser()


if __name__ == "__main__":
    launch_from_command_line(main, get_parser())
