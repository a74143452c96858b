#!/usr/bin/env python
"""Gradient norms of the detection loss and of L_tid, separately, on the same training batches:
shows how strongly the imitation term pulls on the student compared with its own task.

For each ``--setting`` ("NAME KEY VALUE ..."), and for the student at initialisation and at each
``--checkpoint``, it runs ``--batches`` training batches of the TID config and prints the mean
of: detection loss, L_tid (lambda included), ||grad detection||, ||grad L_tid|| over all
trainable parameters (student and adapters). Writes ``benchmarks/results/<stem>.md`` / ``.json``.

    python benchmarks/grad_norms.py --teacher-weights output/sweep/teacher/model_final.pth \\
        --checkpoint output/sweep/tid_l0.1/model_0000499.pth \\
        --setting "tid_l0.1 TID.MODE tid TID.LOSS_WEIGHT 0.1" \\
        --setting "fitnet_l1 TID.MODE fitnet TID.LOSS_WEIGHT 1.0"
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tid_d2.runs import (  # noqa: E402
    REPO_ROOT,
    command_line,
    format_table,
    repo_relative,
    write_results,
)


def _norm(grads) -> float:
    import torch

    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def measure(config_file, teacher_weights, opts, checkpoint, batches):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    from tid_d2.config import get_cfg
    from tid_d2.engine import Trainer

    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(
        ["TID.TEACHER.WEIGHTS", teacher_weights, "DATALOADER.NUM_WORKERS", "0", "VIS_PERIOD", "0"]
        + list(opts)
    )
    cfg.freeze()
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    if checkpoint:
        DetectionCheckpointer(model).load(checkpoint)
    model.train()
    loader = iter(Trainer.build_train_loader(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    # iteration past every warm-up, so lambda is the configured one
    it = 10**6
    for _ in range(batches):
        batch = next(loader)
        with EventStorage(it):
            losses = model(batch)
        det = sum(v for k, v in losses.items() if not k.startswith("loss_tid"))
        tid = sum(v for k, v in losses.items() if k.startswith("loss_tid"))
        g_det = torch.autograd.grad(det, params, retain_graph=True, allow_unused=True)
        g_tid = torch.autograd.grad(tid, params, allow_unused=True)
        rows.append((float(det), float(tid), _norm(g_det), _norm(g_tid)))
    return [statistics.mean(c) for c in zip(*rows)]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config-file", default=os.path.join(REPO_ROOT, "configs/shapes/tid_retinanet.yaml")
    )
    p.add_argument("--teacher-weights", required=True)
    p.add_argument("--checkpoint", action="append", default=[], help="student weights (repeatable)")
    p.add_argument("--setting", action="append", required=True, help='"NAME KEY VALUE ..."')
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--stem", default="retinanet_grad_norms")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every setting")
    args = p.parse_args(argv)

    records = []
    for ckpt in [None] + args.checkpoint:
        for setting in args.setting:
            name, *opts = setting.split()
            det, tid, g_det, g_tid = measure(
                args.config_file, args.teacher_weights, list(args.opts) + opts, ckpt, args.batches
            )
            where = "initialisation" if ckpt is None else repo_relative(ckpt)
            rec = {
                "student": where,
                "setting": name,
                "opts": opts,
                "loss_det": det,
                "loss_tid": tid,
                "grad_det": g_det,
                "grad_tid": g_tid,
                "grad_tid / grad_det": g_tid / max(g_det, 1e-12),
            }
            records.append(rec)
            print(rec, flush=True)
    cols = [
        "student",
        "setting",
        "loss_det",
        "loss_tid",
        "grad_det",
        "grad_tid",
        "grad_tid / grad_det",
    ]
    md = (
        f"Gradient norms over all trainable parameters, mean of {args.batches} training batches "
        "(batch 8)\n\n"
        + format_table(records, cols)
        + f"\n\nCommand: `{command_line('benchmarks/grad_norms.py')}`\n"
    )
    write_results(args.results, args.stem, md, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
